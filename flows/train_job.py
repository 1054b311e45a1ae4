"""One sweep job as a flow of its own, so it can run as a deployment on a GPU work pool.

Its parameter is the path of the job's config, `jobs/<id>/job.json` (a `preftune.job.TrainConfig`,
written by the sweep), so a job is the same file wherever it runs; the flow calls the trainer
directly. The workspace must be on storage the workers share (the config's paths point into it).

The launcher side (`deployment_launcher`) keeps a sweep on a pool honest about lost work: a job
already finished in the workspace is not submitted again; a job whose run is still live (its
parent sweep was killed and re-run) is waited on, not started twice into the same folder; and a run
whose worker died with it is marked Crashed by an automation on its heartbeats, so the sweep
reports that job failed instead of waiting for ever.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta

from prefect import flow

from preftune.errors import UserError
from preftune.files import read_json
from preftune.job import TrainConfig
from preftune.spec import RunSpec
from preftune.summary import verified_summary
from preftune.tasks.sweep import job_config, run_job_processes, write_job_config
from preftune.workspace import Workspace

DEPLOYMENT = "train-job/preftune-train-job"
# prefect.yaml sets PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30 (Prefect's minimum) for train-job runs: a run
# silent for SILENT_AFTER is taken for dead (four heartbeats missed: a loaded machine may delay one).
SILENT_AFTER = timedelta(seconds=120)
CRASH_AUTOMATION = "preftune: crash train-job runs that stopped sending heartbeats"
_POLL_S = 5.0


@flow(name="train-job", persist_result=False)
def train_job(config: str) -> dict:
    """Train the job described by the file `config` and return its summary (a job of several
    processes runs as `preftune train`, which launches them)."""
    try:
        cfg = TrainConfig.load(config)
    except FileNotFoundError:
        raise UserError("job file not found on this worker: is the workspace on shared storage?",
                        path=config) from None
    from preftune.placement import claim_devices, inventory

    devices = inventory()
    if devices:  # the sweep's placement rule, per worker: this job's own GPU(s), pinned in a child process
        with claim_devices(devices, cfg.processes) as visible:
            return run_job_processes(config, {**os.environ, "CUDA_VISIBLE_DEVICES": visible})
    if cfg.processes > 1:
        return run_job_processes(config)
    from preftune.tasks.training import run_training

    return run_training(cfg)


def ensure_crash_detection() -> None:
    """Create (once per server) the automation that marks a silent train-job run Crashed.

    A run whose process dies with its worker (a lost machine, `kill -9`) is Running for ever:
    nothing is left to report its end. Its heartbeats stop, though; Prefect's way to catch that is
    a proactive trigger: no heartbeat and no final state within SILENT_AFTER of the run starting or
    of its last heartbeat. (A run lost before it starts stays Pending: a re-run of the sweep
    cancels and replaces it.)"""
    from prefect.automations import Automation, ChangeFlowRunState, EventTrigger, Posture
    from prefect.client.schemas.objects import StateType

    try:
        Automation.read(name=CRASH_AUTOMATION)
        return
    except ValueError:  # not there yet
        pass
    ends = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    Automation(
        name=CRASH_AUTOMATION,
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": "train-job"},
            # armed by Running too: a run killed before its first heartbeat is caught as well
            after={"prefect.flow-run.Running", "prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *ends},
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1, within=SILENT_AFTER),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {SILENT_AFTER.seconds} s: its worker is gone")],
    ).create()


def _live_run(config: str):
    """A train-job run of this job file that has not ended (its sweep was killed), or None."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    live = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=live))),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[DEPLOYMENT.split("/")[1]])),
            sort=FlowRunSort.START_TIME_DESC, limit=200)
    return next((r for r in runs if r.parameters.get("config") == config), None)


def _cancel(run_id) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Cancelled(message="replaced by a re-run of the sweep"), force=True)


def _wait(run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(_POLL_S)


def deployment_launcher(spec: RunSpec, ws: Workspace) -> Callable[[dict], dict]:
    """Launch each job as a run of the train-job deployment on `spec.work_pool`; the pool's
    concurrency limit caps it there, `max_concurrent_jobs` caps it here."""
    from prefect.deployments import run_deployment

    ensure_crash_detection()

    def launch(job: dict) -> dict:
        cfg = job_config(spec, ws, job, threads=None)
        done = verified_summary(cfg.out)
        if done is not None and done.get("config_hash") == cfg.config_hash():
            return done  # finished by an earlier sweep: not submitted again
        config = str(write_job_config(spec, ws, job, threads=None).resolve())  # threads: the worker decides
        live = _live_run(config)
        if live is not None and live.state.is_running():
            run = _wait(live.id)  # the heartbeat automation ends it if its worker is gone
        else:
            if live is not None:  # not started: maybe lost with its worker, which nothing would report
                _cancel(live.id)
            run = run_deployment(DEPLOYMENT, parameters={"config": config}, timeout=None, as_subflow=True)
        if run.state is None or not run.state.is_completed():
            state = f"{run.state.name}: {run.state.message}" if run.state else "without a state"
            raise RuntimeError(f"job {job['id']}: deployment run {run.id} ended {state}")
        return read_json(ws.job_summary(job["id"]))

    return launch
