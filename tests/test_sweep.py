"""The sweep's concurrency cap and early stop, with real threads and real waiting."""

from __future__ import annotations

import threading
import time

from preftune.job import LossOptions
from preftune.spec import RunSpec
from preftune.tasks.plan import job_grid
from preftune.tasks.sweep import run_sweep, sweep_rows, write_job_config
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


def test_grid_and_job_config_file(tmp_path):
    """The sweep hands each job over as jobs/<id>/job.json; `preftune train --config` reads exactly
    that TrainConfig back (the same fields the work-pool flow reads)."""
    from preftune.cli import build_parser
    from preftune.cli.train import config_from_args
    from preftune.job import LossType, TrainConfig

    spec = RunSpec(dataset="d.jsonl", betas=[0.1, 0.5], lora_r=4, lr=2e-4, max_length=128,
                   losses=[LossOptions(), LossOptions(loss_type="ipo", normalize_by_length=True)])
    jobs = job_grid(spec, ["/models/tiny-llama", "/models/tiny-qwen"])
    assert [j["id"] for j in jobs] == [
        "tiny-llama-dpo-b0.1", "tiny-llama-dpo-b0.5", "tiny-llama-ipo-lnorm-b0.1", "tiny-llama-ipo-lnorm-b0.5",
        "tiny-qwen-dpo-b0.1", "tiny-qwen-dpo-b0.5", "tiny-qwen-ipo-lnorm-b0.1", "tiny-qwen-ipo-lnorm-b0.5"]
    ws = Workspace(tmp_path)
    job = {**jobs[2], "train_data": "t.jsonl", "eval_data": "e.jsonl"}
    path = write_job_config(spec, ws, job, threads=1)
    assert path == tmp_path / "jobs" / "tiny-llama-ipo-lnorm-b0.1" / "job.json"
    cfg = TrainConfig.load(path)
    assert cfg.loss_type is LossType.IPO and cfg.normalize_by_length and not cfg.reference_free
    assert (cfg.beta, cfg.lora_r, cfg.lr, cfg.max_length, cfg.num_threads) == (0.1, 4, 2e-4, 128, 1)
    assert cfg.ref_cache == tmp_path / "refcache" and cfg.out == tmp_path / "jobs" / "tiny-llama-ipo-lnorm-b0.1"
    assert (str(cfg.model), str(cfg.data), str(cfg.eval_data)) == ("/models/tiny-llama", "t.jsonl", "e.jsonl")
    args = build_parser().parse_args(["train", "--config", str(path), "--beta", "0.3"])
    assert config_from_args(args, progress=False) == cfg.model_copy(update={"beta": 0.3})


def test_the_sweep_table_shows_running_jobs_with_their_latest_loss(tmp_path):
    """Queued, running (latest step and loss from metrics.jsonl; a torn last line skipped),
    finished (its summary), failed (its health flag from its metrics: the NaN row it stopped at)."""
    ws = Workspace(tmp_path)
    jobs = [{"id": f"j{i}", "beta": 0.1, "loss_label": "dpo"} for i in range(4)]
    metrics = ws.job_dir("j1") / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text('{"loss": 0.69, "step": 1}\n{"loss": 0.61, "step": 2}\n{"loss": 0.5')
    ws.job_dir("j3").mkdir()
    (ws.job_dir("j3") / "metrics.jsonl").write_text('{"loss": 0.69, "step": 1}\n{"loss": NaN, "step": 2}\n')
    status = {"j1": {"status": "running"}, "j2": {"status": "finished", "summary": {"train_loss": 0.4, "steps": 8,
                                                                                     "eval_loss": 0.45}},
              "j3": {"status": "failed", "error": "boom"}}
    rows = {r["job"]: r for r in sweep_rows(ws, jobs, status)}
    assert [rows[j]["status"] for j in ("j0", "j1", "j2", "j3")] == ["queued", "running", "finished", "failed"]
    assert (rows["j1"]["step"], rows["j1"]["train_loss"]) == (2, 0.61)
    assert (rows["j2"]["step"], rows["j2"]["train_loss"], rows["j2"]["eval_loss"]) == (8, 0.4, 0.45)
    assert rows["j0"]["train_loss"] is None and rows["j3"]["train_loss"] is None
    assert [rows[j]["health"] for j in ("j0", "j1", "j2", "j3")] == ["", "", "", "diverged (step 2)"]


def test_one_reference_pass_per_base_when_its_jobs_start_together(tmp_path, zoo):
    """A real 2-job sweep of one base model, both jobs started at once (`make demo`'s tiny-llama pair):
    the first computes the reference log-probs (train and eval), the second waits for them and hits
    the cache — one miss per base in the sweep table, one cache file per data file."""
    import json

    from preftune.tasks.sweep import local_launcher
    from tests.training.marker_data import corpus_chats, marker_pair

    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(marker_pair(c)) + "\n" for c in corpus_chats("train")[:12]))
    held.write_text("".join(json.dumps(marker_pair(c)) + "\n" for c in corpus_chats("heldout")[:4]))
    spec = RunSpec(dataset=str(train), betas=[0.1, 0.5], max_length=96, batch_size=4, epochs=1, lora_r=4)
    ws = Workspace(tmp_path / "ws")
    jobs = [{**j, "train_data": str(train), "eval_data": str(held)}
            for j in job_grid(spec, [zoo["models"]["tiny-llama"]])]
    results = run_sweep(jobs, local_launcher(spec, ws, threads=2), max_concurrent=2)
    assert [r["status"] for r in results] == ["finished", "finished"], results
    # which of the two claims the base first is the threads' race; that only one computes is not
    assert sorted(r["summary"]["ref_cache"] for r in results) == ["hit", "miss"]
    assert len(list(ws.refcache.glob("*.pt"))) == 2  # train and eval, each computed once
    rows = sweep_rows(ws, jobs, {r["job"]["id"]: r for r in results})
    assert sorted(r["ref_cache"] for r in rows) == ["hit", "miss"]
