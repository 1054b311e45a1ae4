"""Real Prefect processes for the scaling tests: a server of their own (not the session harness,
because workers in other processes need its URL), a `process` work pool, workers, the deployments
of prefect.yaml. Each is started the way a user starts it, with the `prefect` CLI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from preftune.server import free_port

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 900  # only guards against a hang: a loaded 2-core machine starts Prefect slowly


def prefect(*args: str, env: dict, timeout: float = START_TIMEOUT_S, check: bool = True) -> str:
    """Run one `prefect` CLI command (no prompts) and return its output; fail with it on an error."""
    done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0 or not check, f"prefect {' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout + done.stderr


@contextmanager
def prefect_server(home: Path, extra_env: dict | None = None):
    """`prefect server start` on a free port with its own PREFECT_HOME; yields the environment
    (PREFECT_API_URL set) that clients, workers and the CLI use to reach it."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           # workers look for runs every second, not every 10 s: the tests wait less
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1",
           "PREFECT_LOGGING_LEVEL": "INFO", **(extra_env or {})}
    env.pop("PREFECT_API_KEY", None)
    # the database first, on its own: measured here under load, migrating inside `server start`
    # took minutes before the API answered, and a plain start on a migrated database ~40 s
    prefect("server", "database", "upgrade", "-y", env=env)
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Prefect server did not start"
            try:
                if httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield env
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_worker(env: dict, pool: str, name: str, log_path: Path) -> subprocess.Popen:
    """`prefect worker start` on `pool`, its output in `log_path`; in a process group of its own."""
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                                 "--type", "process", "--name", name], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def deploy_train_job(env: dict, pool: str, max_runs: int | None = None) -> None:
    """Deploy prefect.yaml's train-job deployment onto `pool` (its pull step: this checkout), with
    at most `max_runs` runs at once if given (the deployment's limit, enforced by the server)."""
    out = prefect("deploy", "--name", "preftune-train-job", check=False,
                  env={**env, "PREFTUNE_HOME": str(REPO), "PREFTUNE_GPU_POOL": pool, "PREFTUNE_POOL": pool})
    # Prefect 3.8.8's `deploy` creates the deployment, then lists the pool's workers with a request
    # its own server answers with HTTP 422 (null limit/offset) and exits 1: the deployment is made.
    assert "Deployment 'train-job/preftune-train-job' successfully created" in out, out[-3000:]
    if max_runs is not None:
        deployment = httpx.get(f"{env['PREFECT_API_URL']}/deployments/name/train-job/preftune-train-job",
                               timeout=60).json()
        httpx.patch(f"{env['PREFECT_API_URL']}/deployments/{deployment['id']}",
                    json={"concurrency_limit": max_runs}, timeout=60).raise_for_status()


# Debian's `postgresql` package (15 on bookworm; the Makefile installs it): its newest server
PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name),
             default=Path("/usr/lib/postgresql/15/bin"))


def _as_postgres_user(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` system user."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@contextmanager
def postgres_server():
    """A throw-away PostgreSQL cluster on a free port (initdb, pg_ctl start); yields the async URL
    of an empty `prefect` database, for PREFECT_API_DATABASE_CONNECTION_URL."""
    import shutil
    import tempfile

    # Not pytest's tmp_path: its parents are private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="preftune-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()

    def run(*argv: str) -> None:
        done = subprocess.run(_as_postgres_user([str(PG_BIN / argv[0]), *argv[1:]]), capture_output=True,
                              text=True, timeout=START_TIMEOUT_S)
        assert done.returncode == 0, f"{' '.join(argv)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"

    run("initdb", "-D", str(data), "-U", "preftune", "--auth=trust", "--no-sync")
    # 100 connections (the default) are enough for one server; the socket lives in our folder
    run("pg_ctl", "-D", str(data), "-l", str(root / "postgres.log"), "-w", "-t", str(START_TIMEOUT_S), "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "preftune", "prefect")
        yield f"postgresql+asyncpg://preftune@127.0.0.1:{port}/prefect"
    finally:
        run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


# The pipeline in a process of its own, as `preftune run` and a served run have: two flows in
# threads of one process race on transformers' first imports and model loading (seen here:
# "cannot import name 'AutoTokenizer'", "Cannot copy out of meta tensor").
_DRIVER = ("import sys; from preftune.spec import RunSpec; from preftune.flows.pipeline import preference_learning; "
           "preference_learning(RunSpec.model_validate_json(open(sys.argv[1]).read()))")


class FlowProcess:
    """The pipeline flow of `spec` in a child process (its log in `log`), with the `done()` /
    `result()` that tests/flow_helpers.py waits on: the result is the run's outcome.json."""

    def __init__(self, spec, env: dict, log: Path) -> None:
        self.workspace = Path(spec.workspace)
        spec_file = log.with_suffix(".spec.json")
        spec_file.write_text(spec.model_dump_json())
        self.log = log
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(spec_file)], env=env, stdout=fh,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def done(self) -> bool:
        return self.proc.poll() is not None

    def kill(self) -> None:
        """kill -9 the flow's process (its children die with it: preftune.procs)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def result(self, timeout: float | None = None) -> dict:
        self.proc.wait(timeout=timeout)
        outcome = self.workspace / "outcome.json"
        assert outcome.exists(), self.log.read_text(errors="replace")[-3000:]
        return json.loads(outcome.read_text())
