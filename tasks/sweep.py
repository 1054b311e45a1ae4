"""Phase 4: run the job grid with at most N jobs active, and stop starting jobs once one meets
the target.

A job is launched by a `launch(job) -> summary` callable: locally a child process running
`preftune train --config jobs/<id>/job.json`, or a run of the train-job deployment on a work pool
(flows/train_job.py), which reads the same file. Jobs of the same base model are
queued together so the first computes the shared reference log-probs and the rest hit the cache.
A finished job (summary.json with the same config hash) returns at once, so a re-run resumes.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from preftune.errors import RunEnded, UserError
from preftune.files import read_json, write_text_atomic
from preftune.job import TrainConfig, shared_fields, train_command
from preftune.keys import child_environ
from preftune.procs import popen, terminate
from preftune.spec import RunSpec
from preftune.summary import verified_summary, weights_dir
from preftune.tasks.training.health import assess, flag_names, metrics_rows
from preftune.workspace import Workspace


def job_config(spec: RunSpec, ws: Workspace, job: dict, threads: int | None, devices: str | None = None) -> TrainConfig:
    """One job of the grid as a TrainConfig: the spec's training and LoRA fields, the job's loss
    options, beta, base model and data. `threads`: torch threads (None: the worker's own choice);
    `devices`: the CUDA devices the sweep placed it on (preftune/placement.py)."""
    return TrainConfig(**spec.model_dump(include=shared_fields(RunSpec)), **job["loss"], beta=job["beta"],
                       model=job["base_model"], data=job["train_data"], eval_data=job.get("eval_data"),
                       out=ws.job_dir(job["id"]), ref_cache=ws.refcache, num_threads=threads, devices=devices)


def write_job_config(spec: RunSpec, ws: Workspace, job: dict, threads: int | None, devices: str | None = None) -> Path:
    """Write jobs/<id>/job.json (what `preftune train --config` and the work-pool flow read)."""
    path = ws.job_config(job["id"])
    write_text_atomic(path, job_config(spec, ws, job, threads, devices).model_dump_json(indent=2) + "\n")
    return path


def run_job_processes(config: Path, env: dict | None = None) -> dict:
    """Run the job file `config` as a `preftune train` child process (a crash in the job never
    takes the caller down, the OS reclaims its memory, and a job of several processes is launched
    by it); its log goes to train.log beside the file. `env`: what the job gets besides the allow-listed
    environment (preftune.keys.child_environ: never an endpoint's key). Returns its summary."""
    config = Path(config)
    log_path = config.parent / "train.log"
    with open(log_path, "ab") as log:  # the job dies with the caller's process, even on kill -9
        proc = popen(train_command(config), stdout=subprocess.PIPE, stderr=log, env=child_environ(env),
                     death_signal=signal.SIGTERM)
        _RUNNING.add(proc)
        try:
            stdout, _ = proc.communicate()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            _RUNNING.discard(proc)
    if proc.returncode != 0 and _STOPPING.is_set():  # we stopped it: one line in the run's log, no traceback
        raise RunEnded("failed", f"job {config.parent.name} stopped by a signal; a re-run resumes it")
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"job {config.parent.name} exited with {proc.returncode}: " + " | ".join(tail))
    return json.loads(stdout)


# The job processes this process is waiting on (run_sweep stops them when it is interrupted).
_RUNNING: set[subprocess.Popen] = set()
_STOPPING = threading.Event()  # set while an interrupted sweep stops its jobs
# How long an interrupted sweep gives its jobs to checkpoint and exit before killing them: inside
# the 10 s a signalled run has to end, and before the CLI's own exit deadline (7 s) cuts everything off.
JOB_STOP_GRACE_S = 6.0


class ReferenceGate:
    """One reference pass per base model, also when its jobs start together: the first job of a base
    that needs the reference log-probs starts at once; the base's other such jobs wait until it has
    computed them — its metrics.jsonl appears (the reference pass comes before the first step) or it
    ends — and then find them in the cache. The cache's file lock alone leaves which job computes to
    a race, and a job that misses it computes them again."""

    POLL_S = 0.5

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.passes: dict[str, threading.Event] = {}

    @contextlib.contextmanager
    def hold(self, base: str, metrics: Path) -> Iterator[None]:
        with self.lock:
            done = self.passes.get(base)
            first = done is None
            if first:
                done = self.passes[base] = threading.Event()
        if not first:
            done.wait()
            yield
            return
        ended = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(metrics, done, ended), daemon=True)
        watcher.start()
        try:
            yield
        finally:
            ended.set()
            done.set()

    def _watch(self, metrics: Path, done: threading.Event, ended: threading.Event) -> None:
        while not ended.wait(self.POLL_S):
            if metrics.exists():
                done.set()
                return


def local_launcher(spec: RunSpec, ws: Workspace, threads: int, slots: list[tuple[str, ...]] | None = None
                   ) -> Callable[[dict], dict]:
    """Run each job as a `preftune train --config` child process (`run_job_processes`), the
    machine's threads shared between the jobs at once and each job's processes. `slots`: the GPU
    placement's device groups (`Placement.slots`): a job takes a free one, pinned to it with
    CUDA_VISIBLE_DEVICES, and gives it back when it ends; run at most len(slots) jobs at once.
    A base model's reference log-probs are computed by its first job only (`ReferenceGate`)."""
    per_process = max(1, threads // spec.processes)
    gate = ReferenceGate()
    free: queue.SimpleQueue[tuple[str, ...] | None] = queue.SimpleQueue()
    for slot in slots or [None]:
        free.put(slot)

    def launch(job: dict) -> dict:
        if not job_config(spec, ws, job, per_process).needs_reference:
            return pinned(job)
        # a job that resumes has its metrics.jsonl already: it opens the gate at once (its cache exists)
        with gate.hold(job["base_model"], ws.job_dir(job["id"]) / "metrics.jsonl"):
            return pinned(job)

    def pinned(job: dict) -> dict:
        slot = free.get() if slots else None
        try:
            devices = ",".join(slot) if slot else None
            config = write_job_config(spec, ws, job, per_process, devices)
            env = {"OMP_NUM_THREADS": str(per_process), "TOKENIZERS_PARALLELISM": "false",
                   **({"CUDA_VISIBLE_DEVICES": devices} if devices else {})}
            return run_job_processes(config, env)
        finally:
            if slot:
                free.put(slot)

    return launch


def run_sweep(jobs: list[dict], launch: Callable[[dict], dict], *, max_concurrent: int,
              on_finish: Callable[[dict, dict], bool] | None = None,
              on_event: Callable[[str, dict], None] | None = None) -> list[dict]:
    """Run `jobs` with at most `max_concurrent` active. `on_finish(job, summary)` returns True
    when the target is met: then no new job starts (active ones finish). Returns one record per
    job: {"job", "status": finished|failed|not_started, "summary"?, "error"?}."""
    results: dict[str, dict] = {}
    pending = list(jobs)
    _STOPPING.clear()
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
            try:
                done, _ = wait(list(active), return_when=FIRST_COMPLETED)
            except BaseException:  # a signal (SIGTERM arrives as Prefect's TerminationSignal): end the jobs too,
                stop.set()  # or leaving the pool would wait for each of them to finish training
                pending.clear()
                _STOPPING.set()
                terminate(list(_RUNNING), JOB_STOP_GRACE_S)
                raise
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


def trained_weights(ws: Workspace, job_id: str) -> str:
    """The job's LoRA adapter folder, or its full model folder after full fine-tuning: always inside
    the job's folder, and only once its summary is verified (preftune.summary)."""
    summary = verified_summary(ws.job_dir(job_id))
    if summary is None:
        raise UserError("missing or not to be trusted (see the log line above): re-run to train the job again",
                        path=ws.job_summary(job_id))
    return str(weights_dir(ws.job_dir(job_id), bool(summary.get("full"))))


def latest_metrics(ws: Workspace, job_id: str) -> dict | None:
    """The last complete line of a job's metrics.jsonl (None before its first logging step); a line
    being written (torn) is skipped."""
    rows = metrics_rows(ws.job_dir(job_id) / "metrics.jsonl")
    return rows[-1] if rows else None


def job_health(ws: Workspace, job_id: str, record: dict) -> dict:
    """A finished job's health (its summary's), else assessed from its metrics.jsonl so far: a running
    job's flags so far, a failed job's (a diverged one's NaN row is its last)."""
    summary = record.get("summary") or {}
    if summary.get("health") is not None:
        return summary["health"]
    return assess(metrics_rows(ws.job_dir(job_id) / "metrics.jsonl"))


def with_health(ws: Workspace, results: list[dict]) -> list[dict]:
    """The sweep's result records, each with its job's health (what sweep.json and the report show)."""
    return [{**r, "health": job_health(ws, r["job"]["id"], r)} for r in results]


def _device_column(ws: Workspace, job_id: str, summary: dict, running: bool) -> str:
    """Where a job ran or runs: `cuda:<ids>` as pinned (its summary, else a running job's job.json),
    else its summary's device."""
    pinned = summary.get("cuda_visible_devices")
    if pinned is None and running and ws.job_config(job_id).exists():
        pinned = read_json(ws.job_config(job_id)).get("devices")
    return f"cuda:{pinned}" if pinned else summary.get("device", "")


def sweep_rows(ws: Workspace, jobs: list[dict], status: dict[str, dict]) -> list[dict]:
    """One row per job for the sweep table: queued, running (its latest step and loss from
    metrics.jsonl), finished (its summary's metrics), failed or not started. `status` maps a job id to
    its result record so far ({"status", "summary"?}), or {"status": "running"}."""
    rows = []
    for job in jobs:
        record = status.get(job["id"], {"status": "queued"})
        summary = record.get("summary") or {}
        latest = latest_metrics(ws, job["id"]) if record["status"] == "running" else None
        rows.append({"job": job["id"], "status": record["status"], "beta": job["beta"], "loss": job["loss_label"],
                     "step": (latest or {}).get("step", summary.get("steps")),
                     "train_loss": (latest or {}).get("loss", summary.get("train_loss")),
                     "eval_loss": summary.get("eval_loss"), "eval_reward_accuracy": summary.get("eval_reward_accuracy"),
                     "samples_per_s": summary.get("train_samples_per_second"), "ref_cache": summary.get("ref_cache"),
                     "health": flag_names(job_health(ws, job["id"], record)) if record["status"] != "queued" else "",
                     "device": _device_column(ws, job["id"], summary, record["status"] == "running")})
    return rows
