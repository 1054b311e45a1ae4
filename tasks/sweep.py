"""Phase 4: run the job grid with at most N jobs active, and stop starting jobs once one meets
the target.

A job is launched by a `launch(job) -> summary` callable: locally a child process running
`preftune train` (so a crash in one job never takes the flow down, and the OS reclaims its
memory), or a run of the train-job deployment on a work pool. Jobs of the same base model are
queued together so the first computes the shared reference log-probs and the rest hit the cache.
A finished job (summary.json with the same config hash) returns at once, so a re-run resumes.
"""

from __future__ import annotations

import contextvars
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from preftune.spec import RunSpec
from preftune.workspace import Workspace


def train_args(spec: RunSpec, ws: Workspace, job: dict, threads: int) -> list[str]:
    """The `preftune train` command line of one job."""
    loss = job["loss"]
    out = ws.job_dir(job["id"])
    args = ["train", "--data", str(job["train_data"]), "--model", job["base_model"], "--out", str(out),
            "--loss", loss["loss"], "--beta", f"{job['beta']}", "--lr", f"{spec.learning_rate}",
            "--epochs", str(spec.epochs), "--batch-size", str(spec.batch_size),
            "--grad-accum", str(spec.grad_accum), "--max-length", str(spec.max_length),
            "--seed", str(spec.seed), "--ref-cache", str(ws.refcache),
            "--lora-r", str(spec.lora.r), "--lora-alpha", str(spec.lora.alpha),
            "--rpo-alpha", f"{loss['rpo_alpha']}", "--simpo-gamma", f"{loss['simpo_gamma']}",
            "--orpo-lambda", f"{loss['orpo_lambda']}", "--lora-dropout", f"{spec.lora.dropout}", "--json"]
    if threads > 0:  # 0: let the worker's machine decide
        args += ["--threads", str(threads)]
    if job.get("eval_data"):
        args += ["--eval-data", str(job["eval_data"])]
    if loss["normalize_by_length"]:
        args.append("--normalize-by-length")
    if loss["reference_free"]:
        args.append("--reference-free")
    if spec.lora.full:
        args.append("--full")
    return args


def local_launcher(spec: RunSpec, ws: Workspace, threads: int) -> Callable[[dict], dict]:
    """Run each job as a `preftune train` child process; its log goes to jobs/<id>/train.log."""

    def launch(job: dict) -> dict:
        out = ws.job_dir(job["id"])
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "preftune.cli", *train_args(spec, ws, job, threads)]
        with open(out / "train.log", "ab") as log:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, env=env, check=False)
        if proc.returncode != 0:
            tail = (out / "train.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"job {job['id']} exited with {proc.returncode}: " + " | ".join(tail))
        return json.loads(proc.stdout)

    return launch


def run_sweep(jobs: list[dict], launch: Callable[[dict], dict], *, max_concurrent: int,
              on_finish: Callable[[dict, dict], bool] | None = None,
              on_event: Callable[[str, dict], None] | None = None) -> list[dict]:
    """Run `jobs` with at most `max_concurrent` active. `on_finish(job, summary)` returns True
    when the target is met: then no new job starts (active ones finish). Returns one record per
    job: {"job", "status": finished|failed|not_started, "summary"?, "error"?}."""
    results: dict[str, dict] = {}
    pending = list(jobs)
    stop = threading.Event()
    active: dict[Future, dict] = {}
    notify = on_event or (lambda kind, payload: None)
    with ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="sweep") as pool:
        while pending or active:
            while pending and len(active) < max_concurrent and not stop.is_set():
                job = pending.pop(0)
                notify("started", job)
                # The job runs in the submitting thread's context (a Prefect task run inside
                # a pool thread must still see the flow run it belongs to).
                active[pool.submit(contextvars.copy_context().run, launch, job)] = job
            if not active:
                break
            done, _ = wait(list(active), return_when=FIRST_COMPLETED)
            for fut in done:
                job = active.pop(fut)
                try:
                    summary = fut.result()
                except Exception as err:  # one failed job must not sink the sweep
                    results[job["id"]] = {"job": job, "status": "failed", "error": str(err)}
                    notify("failed", results[job["id"]])
                    continue
                results[job["id"]] = {"job": job, "status": "finished", "summary": summary}
                if on_finish is not None and on_finish(job, summary):
                    stop.set()
                notify("finished", results[job["id"]])
    for job in pending:
        results[job["id"]] = {"job": job, "status": "not_started"}
    return [results[j["id"]] for j in jobs]


def job_threads(max_concurrent: int, n_jobs: int) -> int:
    """Threads per child: share the cores instead of oversubscribing them."""
    cores = os.cpu_count() or 1
    return max(1, cores // max(1, min(max_concurrent, n_jobs)))


def summary_path(ws: Workspace, job_id: str) -> Path:
    return ws.job_dir(job_id) / "summary.json"
