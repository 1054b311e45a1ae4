"""The sweep's concurrency cap and early stop, with real threads and real waiting."""

from __future__ import annotations

import threading
import time

from preftune.spec import LossSetting, RunSpec
from preftune.tasks.plan import job_grid
from preftune.tasks.sweep import run_sweep, train_args
from preftune.workspace import Workspace


def _jobs(n: int) -> list[dict]:
    return [{"id": f"j{i}", "base_model": "m", "beta": 0.1 * (i + 1)} for i in range(n)]


def test_never_more_than_the_cap_active():
    lock = threading.Lock()
    active, peak = 0, 0

    def launch(job):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        with lock:
            active -= 1
        return {"id": job["id"]}

    results = run_sweep(_jobs(10), launch, max_concurrent=3)
    assert peak == 3
    assert [r["status"] for r in results] == ["finished"] * 10


def test_early_stop_starts_no_new_job():
    started = []

    def launch(job):
        started.append(job["id"])
        time.sleep(0.02)
        return {"score": 0.9 if job["id"] == "j1" else 0.1}

    results = run_sweep(_jobs(6), launch, max_concurrent=2, on_finish=lambda job, s: s["score"] >= 0.75)
    statuses = {r["job"]["id"]: r["status"] for r in results}
    # j0 and j1 start together; j1 meets the target, so at most one more (started when j0 finished first).
    assert statuses["j1"] == "finished"
    assert sum(s == "not_started" for s in statuses.values()) >= 3
    assert set(started) == {k for k, v in statuses.items() if v != "not_started"}


def test_a_failed_job_does_not_sink_the_sweep():
    def launch(job):
        if job["id"] == "j1":
            raise RuntimeError("out of memory")
        return {}

    results = run_sweep(_jobs(3), launch, max_concurrent=2)
    assert [r["status"] for r in results] == ["finished", "failed", "finished"]
    assert "out of memory" in results[1]["error"]


def test_grid_and_train_command(tmp_path):
    spec = RunSpec(dataset="d.jsonl", betas=[0.1, 0.5],
                   losses=[LossSetting(), LossSetting(loss="ipo", normalize_by_length=True)])
    jobs = job_grid(spec, ["/models/tiny-llama", "/models/tiny-qwen"])
    assert [j["id"] for j in jobs] == [
        "tiny-llama-dpo-b0.1", "tiny-llama-dpo-b0.5", "tiny-llama-ipo-lnorm-b0.1", "tiny-llama-ipo-lnorm-b0.5",
        "tiny-qwen-dpo-b0.1", "tiny-qwen-dpo-b0.5", "tiny-qwen-ipo-lnorm-b0.1", "tiny-qwen-ipo-lnorm-b0.5"]
    job = {**jobs[2], "train_data": "t.jsonl", "eval_data": "e.jsonl"}
    args = train_args(spec, Workspace(tmp_path), job, threads=1)
    assert args[args.index("--loss") + 1] == "ipo"
    assert args[args.index("--beta") + 1] == "0.1"
    assert "--normalize-by-length" in args and "--reference-free" not in args
    assert args[args.index("--ref-cache") + 1] == str(tmp_path / "refcache")
    assert args[args.index("--out") + 1] == str(tmp_path / "jobs" / "tiny-llama-ipo-lnorm-b0.1")
