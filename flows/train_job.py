"""One sweep job as a flow of its own, so it can run as a deployment on a GPU work pool.

Its parameter is the `preftune train` command line the local sweep would run, so a job is the
same wherever it runs. The workspace must be on storage the workers share (its paths are in
the arguments); the summary is read back from `jobs/<id>/summary.json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from prefect import flow

from preftune.spec import RunSpec
from preftune.tasks.sweep import summary_path, train_args
from preftune.workspace import Workspace, read_json

DEPLOYMENT = "train-job/preftune-train-job"


@flow(name="train-job", persist_result=False)
def train_job(argv: list[str]) -> dict:
    """Run `preftune train ARGV` in this process and return its summary."""
    from preftune.cli import main

    if main(argv) != 0:
        raise RuntimeError(f"preftune {' '.join(argv)} failed")
    out = argv[argv.index("--out") + 1]
    return json.loads((Workspace(out).root / "summary.json").read_text())


def deployment_launcher(spec: RunSpec, ws: Workspace) -> Callable[[dict], dict]:
    """Launch each job as a run of the train-job deployment on `spec.work_pool`; the pool's
    concurrency limit caps it there, `max_concurrent_jobs` caps it here."""
    from prefect.deployments import run_deployment

    def launch(job: dict) -> dict:
        run = run_deployment(DEPLOYMENT, parameters={"argv": train_args(spec, ws, job, threads=0)},
                             timeout=None, as_subflow=True)
        if run.state is None or not run.state.is_completed():
            raise RuntimeError(f"job {job['id']}: deployment run {run.id} ended {run.state.name if run.state else '?'}")
        return read_json(summary_path(ws, job["id"]))

    return launch
