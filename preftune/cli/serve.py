"""`preftune serve`: register the flows as deployments and serve them, so a person can start
runs from the Prefect UI with the RunSpec form, answer approvals there and read the artifacts.

Needs a Prefect API (`prefect server start`, then PREFECT_API_URL). `prefect.yaml` describes
the same deployments for `prefect deploy` onto work pools (GPU hosts)."""

from __future__ import annotations

import argparse

from preftune.errors import UserError


def deployments(limit: int | None = None) -> list:
    from preftune.flows.pipeline import preference_learning
    from preftune.flows.train_job import train_job

    return [
        preference_learning.to_deployment(
            name="preftune", description="Inspect → plan and approve → pairs → sweep → evaluate → deploy → report.",
            tags=["preftune"]),
        train_job.to_deployment(name="preftune-train-job", description="One preference-training job.",
                                tags=["preftune"], concurrency_limit=limit),
    ]


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="Serve the flows as deployments for the Prefect UI.")
    p.add_argument("--job-limit", type=int, default=6, help="Training jobs at once (default %(default)s).")
    p.set_defaults(func=run)


def start_serve_loop(job_limit: int, env: dict | None = None):
    """Prefect's serve loop in a child that dies with us (`run` below says why a child)."""
    import signal
    import sys

    from preftune.procs import popen

    return popen([sys.executable, "-m", "preftune.cli.serve", str(job_limit)], env=env, death_signal=signal.SIGTERM)


def run(args: argparse.Namespace) -> int:
    import subprocess

    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise UserError("no Prefect API: start one with `prefect server start` and set PREFECT_API_URL "
                        "(e.g. http://127.0.0.1:4200/api)")
    from preftune.cli.prefect_auth import check_credentials

    check_credentials(PREFECT_API_URL.value())  # a server `preftune up` started asks for its auth string
    print(f"serving deployments 'preference-learning/preftune' and 'train-job/preftune-train-job' "
          f"at {PREFECT_API_URL.value()}; start runs from the UI (Ctrl-C to stop)", flush=True)
    # Prefect's serve loop sits in a child: it installs signal handlers of its own and, once its API
    # has gone, its graceful shutdown waits on that API for ever. This process keeps preftune's
    # handlers, so Ctrl-C or SIGTERM ends the command within its deadline, and the child with it.
    child = start_serve_loop(args.job_limit)
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.terminate()
        try:
            child.wait(timeout=3)
        except subprocess.TimeoutExpired:
            child.kill()
        raise


if __name__ == "__main__":  # the serve loop itself, started by `run` above
    import sys

    from prefect import serve

    serve(*deployments(int(sys.argv[1])))
