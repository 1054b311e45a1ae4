"""The sweep on a real Prefect work pool: a server of its own, a `process` pool with a concurrency
limit of 2, two `prefect worker start` processes, prefect.yaml's train-job deployment, and the whole
pipeline with `work_pool` set. Everything is checked through the API and the shared workspace.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from preftune.paths import EXAMPLES_DIR
from preftune.spec import RunSpec
from tests.flow_helpers import start_flow
from tests.prefect_processes import deploy_train_job, prefect, prefect_server, start_worker, stop

POOL = "preftune-test-pool"
EVALUATOR = "preftune.judges.builtin:answer_quality"
FLOW_TIMEOUT_S = 1800  # only guards against a hang


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """{"env", "workers": [Popen], "logs": [Path]}: a server, the pool (limit 2), the deployment, 2 workers."""
    root = tmp_path_factory.mktemp("pool")
    with prefect_server(root / "prefect-home") as env:
        prefect("work-pool", "create", POOL, "--type", "process", env=env)
        prefect("work-pool", "set-concurrency-limit", POOL, "2", env=env)
        deploy_train_job(env, POOL)
        logs = [root / f"worker-{i}.log" for i in (1, 2)]
        workers = [start_worker(env, POOL, f"worker-{i}", log) for i, log in zip((1, 2), logs, strict=True)]
        try:
            yield {"env": env, "workers": workers, "logs": logs, "root": root}
        finally:
            for w in workers:
                stop(w)


@pytest.fixture
def api(pool):
    """Point this process's Prefect client (and a flow started from it) at the pool's server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: pool["env"]["PREFECT_API_URL"]}):
        yield


def _post(route: str, body: dict) -> list:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.request("POST", route, json={"limit": 200, "offset": 0, **body}).json()


def _train_job_runs() -> list[dict]:
    return _post("/flow_runs/filter", {"flows": {"name": {"any_": ["train-job"]}}, "sort": "START_TIME_ASC"})


def _max_overlap(runs: list[dict]) -> int:
    """Most runs running at one instant, from their start and end times."""
    edges = []
    for r in runs:
        edges += [(datetime.fromisoformat(r["start_time"]), 1), (datetime.fromisoformat(r["end_time"]), -1)]
    running = peak = 0
    for _, delta in sorted(edges):  # at equal times the end (-1) sorts first
        running += delta
        peak = max(peak, running)
    return peak


def _pairs(tmp_path: Path) -> Path:
    lines = (EXAMPLES_DIR / "pairs.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.usefixtures("api")
def test_sweep_on_a_work_pool_with_two_workers(pool, zoo, tmp_path):
    ws = tmp_path / "ws"  # the "shared storage": workers and flow are on one machine here
    spec = RunSpec(dataset=str(_pairs(tmp_path)), workspace=str(ws), base_models=[zoo["models"]["tiny-llama"]],
                   betas=[0.05, 0.1, 0.3, 0.5], evaluator=EVALUATOR, epochs=1, batch_size=8, max_length=96,
                   eval_max_new_tokens=8, max_eval_prompts=4, target_win_rate=None, deploy=False,
                   work_pool=POOL, max_concurrent_jobs=4,  # the pool's limit (2) is what must cap it
                   auto_approve_max_usd=100.0, approval_poll_s=1)
    outcome = start_flow(spec).result(timeout=FLOW_TIMEOUT_S)
    assert outcome["status"] == "completed", outcome

    runs = _train_job_runs()
    assert len(runs) == 4 and all(r["state_type"] == "COMPLETED" for r in runs), [r["state_name"] for r in runs]
    assert all(r["work_pool_name"] == POOL and r["parent_task_run_id"] for r in runs)  # the pipeline's subflows
    peak = _max_overlap(runs)
    print(f"train-job runs at once, at most: {peak}")
    assert 1 <= peak <= 2
    worker_logs = [log.read_text(errors="replace") for log in pool["logs"]]
    for r in runs:  # each one started by exactly one of the two workers (the other may have tried first)
        started = f"Flow run '{r['name']}' submitted to infrastructure"
        assert sum(started in text for text in worker_logs) == 1, r["name"]

    sweep = json.loads((ws / "jobs/sweep.json").read_text())
    assert [s["status"] for s in sweep] == ["finished"] * 4
    configs = sorted(r["parameters"]["config"] for r in runs)
    assert configs == sorted(str((ws / "jobs" / s["job"]["id"] / "job.json").resolve()) for s in sweep)
    for s in sweep:
        summary = json.loads((ws / "jobs" / s["job"]["id"] / "summary.json").read_text())
        assert summary["steps"] >= 1 and summary["processes"] == 1 and summary["beta"] == s["job"]["beta"]
    report = (ws / "final_report.md").read_text()
    assert all(s["job"]["id"] in report for s in sweep)
    shutil.rmtree(ws)


@pytest.mark.usefixtures("api")
def test_a_worker_that_cannot_see_the_workspace_fails_the_job_in_one_line(pool, tmp_path):
    from prefect.deployments import run_deployment

    from preftune.flows.train_job import DEPLOYMENT

    missing = tmp_path / "not-shared" / "jobs" / "j1" / "job.json"
    run = run_deployment(DEPLOYMENT, parameters={"config": str(missing)}, timeout=FLOW_TIMEOUT_S)
    assert run.state.is_failed()
    message = run.state.message
    assert "\n" not in message
    assert message.endswith(f"{missing}: job file not found on this worker: is the workspace on shared storage?")
