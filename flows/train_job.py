"""One sweep job as a flow of its own, so it can run as a deployment on a GPU work pool.

Its parameter is the path of the job's config, `jobs/<id>/job.json` (a `preftune.job.TrainConfig`,
written by the sweep), so a job is the same file wherever it runs; the flow calls the trainer
directly. The workspace must be on storage the workers share (the config's paths point into it).
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import flow

from preftune.errors import UserError
from preftune.files import read_json
from preftune.job import TrainConfig
from preftune.spec import RunSpec
from preftune.tasks.sweep import run_job_processes, write_job_config
from preftune.workspace import Workspace

DEPLOYMENT = "train-job/preftune-train-job"


@flow(name="train-job", persist_result=False)
def train_job(config: str) -> dict:
    """Train the job described by the file `config` and return its summary (a job of several
    processes runs as `preftune train`, which launches them)."""
    try:
        cfg = TrainConfig.load(config)
    except FileNotFoundError:
        raise UserError("job file not found on this worker: is the workspace on shared storage?",
                        path=config) from None
    if cfg.processes > 1:
        return run_job_processes(config)
    from preftune.tasks.training import run_training

    return run_training(cfg)


def deployment_launcher(spec: RunSpec, ws: Workspace) -> Callable[[dict], dict]:
    """Launch each job as a run of the train-job deployment on `spec.work_pool`; the pool's
    concurrency limit caps it there, `max_concurrent_jobs` caps it here."""
    from prefect.deployments import run_deployment

    def launch(job: dict) -> dict:
        config = write_job_config(spec, ws, job, threads=None)  # threads: the worker's machine decides
        run = run_deployment(DEPLOYMENT, parameters={"config": str(config.resolve())}, timeout=None,
                             as_subflow=True)
        if run.state is None or not run.state.is_completed():
            raise RuntimeError(f"job {job['id']}: deployment run {run.id} ended {run.state.name if run.state else '?'}")
        return read_json(ws.job_summary(job["id"]))

    return launch
