"""One training job end to end: ``run_training(TrainConfig) -> summary``.

Order: finished? → data → model → reference log-probs (cache) → resume? → loop → eval → save.
Every output lands in ``cfg.out``: metrics.jsonl (per logging step), checkpoint.pt (every
``save_every`` steps, removed when done), adapter/ or model/, and summary.json last — a
summary with the same config hash means the job is finished and is returned without running.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from preftune.errors import UserError
from preftune.files import append_jsonl, read_json, read_jsonl_rows, write_jsonl_atomic
from preftune.hf import load_tokenizer
from preftune.job import SUMMARY_FILE, TrainConfig
from preftune.procs import stop_between_steps, stop_requested
from preftune.summary import verified_summary, write_summary
from preftune.tasks.training.checkpoint import (
    peek_checkpoint,
    remove_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from preftune.tasks.training.data import load_pair_records, tokenize_pairs
from preftune.tasks.training.health import DIVERGED, REMEDIES, assess, divergence, metrics_rows
from preftune.tasks.training.logps import SequenceLogps
from preftune.tasks.training.loop import (
    TrainState,
    dataset_logps,
    evaluate,
    lr_lambda,
    steps_per_epoch,
    train_loop,
)
from preftune.tasks.training.modeling import job_precision, load_policy, pad_id, reference_mode, save_trained
from preftune.tasks.training.refcache import load_or_compute, reference_key

METRICS = "metrics.jsonl"


class TrainingDiverged(UserError):
    """The loss went NaN or exploded: the job stops with this one line (its sweep goes on)."""


def _check_inputs(cfg: TrainConfig) -> None:
    for name in ("data", "eval_data"):
        path = getattr(cfg, name)
        if path is not None and not Path(path).is_file():
            raise UserError(f"{name}: no such file", path=path)
    if not (Path(cfg.model) / "config.json").is_file():
        raise UserError("model: not a Hugging Face model folder (no config.json)", path=cfg.model)


def finished_summary(out: Path, config_hash: str) -> dict | None:
    """The summary of a finished job with this config, or None (none, or one not to be trusted:
    preftune.summary); a different config is an error."""
    summary = verified_summary(out)
    if summary is None:
        return None
    if summary.get("config_hash") != config_hash:
        raise UserError("holds a finished job with a different configuration; choose another --out",
                        path=out)
    return summary


def _tokenized(path: Path, tokenizer, cfg: TrainConfig):
    pairs = tokenize_pairs(load_pair_records(path), tokenizer, cfg.max_length, cfg.max_prompt_length)
    return pairs, sum(p.truncated for p in pairs)


def _references(cfg, acc, module, tokenizer, datasets: dict, precision: str) -> tuple[dict, str]:
    """Reference log-probs per dataset name ({} when the loss needs none) and hit/miss/skipped."""
    if not cfg.needs_reference:
        return {}, "skipped"
    cache = cfg.resolved_ref_cache()
    refs, statuses = {}, []
    for name, (path, pairs) in datasets.items():
        key, fields = reference_key(cache, cfg.model, tokenizer.chat_template, path, cfg.max_length,
                                    cfg.max_prompt_length, precision)

        def compute(idx: list[int] | None, pairs=pairs):
            module.eval()
            subset = pairs if idx is None else [pairs[i] for i in idx]
            with reference_mode(module.lm), acc.autocast():
                return dataset_logps(module, subset, cfg.batch_size * 2, pad_id(tokenizer), acc.device)

        with acc.main_process_first():  # DDP: the main process computes, the others read its file
            refs[name], status = load_or_compute(cache, key, fields, len(pairs), compute, precision)
        statuses.append(status)
    return refs, "hit" if all(s == "hit" for s in statuses) else "miss"


def _metrics_upto(out: Path, step: int) -> None:
    """Drop metrics lines a killed run wrote after its last checkpoint (they will be redone)."""
    path = Path(out) / METRICS
    if path.exists():  # a line a crash tore is dropped with the rest
        write_jsonl_atomic(path, [r for r in read_jsonl_rows(path) if isinstance(r.get("step"), int) and r["step"] <= step])


def _progress(cfg, acc, total: int, done: int):
    if not (cfg.progress and acc.is_main_process):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


def keep_freed_memory() -> None:
    """Let glibc reuse freed activation memory instead of unmapping it after every step.

    glibc serves large blocks with mmap and unmaps them on free until its adaptive threshold has
    seen a big block freed, so early training steps page-fault all their activations in afresh.
    Fixed mmap/trim thresholds (what jemalloc/tcmalloc give PyTorch users) made the training
    steps of a cache-hit job on a zoo model ~20 % faster. Linux/glibc only; elsewhere a no-op.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 256 << 20)
    libc.mallopt(m_trim_threshold, 512 << 20)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _preflight(cfg: TrainConfig) -> tuple[str, dict | None, dict | None]:
    """(config hash, finished summary or None, checkpoint or None); UserError for a bad setup."""
    _check_inputs(cfg)
    config_hash = cfg.config_hash()
    done = finished_summary(Path(cfg.out), config_hash)
    if done is not None:
        return config_hash, done, None
    ckpt = peek_checkpoint(Path(cfg.out))
    if ckpt is not None and ckpt["config_hash"] != config_hash:
        raise UserError("holds a checkpoint of a different configuration; choose another --out", path=cfg.out)
    return config_hash, None, ckpt


def _accelerator(mixed: str) -> Accelerator:
    """The job's Accelerator. Without CUDA it must be told `cpu=True`, or accelerate does not see a
    torchrun launch and every process would train the whole job alone (gloo DDP on CPU)."""
    acc = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if acc.num_processes != launched:
        raise RuntimeError(f"launched as {launched} processes but accelerate sees {acc.num_processes}")
    return acc


def _optimizer(cfg: TrainConfig, module, n_pairs: int, world: int):
    """(trainable params, AdamW, warm-up + decay scheduler, total optimizer steps)."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = steps_per_epoch(n_pairs, cfg.batch_size, cfg.grad_accum, world) * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, cfg.warmup_ratio, cfg.scheduler.value))
    return params, optimizer, scheduler, total_steps


def _hooks(cfg, acc, config_hash: str, module, optimizer, scheduler, total_steps: int, bar):
    """on_log (metrics.jsonl + progress bar) and on_step (checkpoint every save_every steps)."""
    out = Path(cfg.out)
    first_loss: list[float] = []

    def on_log(row: dict) -> None:
        if acc.is_main_process:
            append_jsonl(out / METRICS, row)
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
        reason = divergence(row, first_loss[0] if first_loss else None)  # every process sees the same row
        if reason:
            raise TrainingDiverged(f"{DIVERGED} at step {row['step']}: {reason}; {REMEDIES[DIVERGED]}", path=out)
        first_loss[:1] = first_loss or [row["loss"]]

    def on_step(st: TrainState) -> None:
        if bar is not None:
            bar.update(1)
        stop = stop_requested()  # SIGTERM/SIGINT: checkpoint this step, then end (a re-run resumes here)
        if (stop or st.step % cfg.save_every == 0 and st.step < total_steps) and acc.is_main_process:
            save_checkpoint(out, config_hash, module, optimizer, scheduler, st)
        if stop:
            raise KeyboardInterrupt

    return on_log, on_step


def run_training(cfg: TrainConfig) -> dict:
    """Train one job (or resume it, or return its summary if finished); returns summary.json."""
    t_start = time.perf_counter()
    config_hash, done, ckpt = _preflight(cfg)
    if done is not None:
        return done
    out, settings = Path(cfg.out), cfg  # a TrainConfig is the LossSettings the loss functions take
    out.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    set_seed(cfg.seed)

    precision = job_precision(cfg)  # before the data: a 4-bit job on a CPU fails at once
    acc = _accelerator(precision.mixed)
    if acc.num_processes != cfg.processes:
        raise UserError(f"the job is for {cfg.processes} process(es) but runs on {acc.num_processes}: "
                        "start it with `preftune train`, which launches them", path=cfg.out)
    tokenizer = load_tokenizer(cfg.model)
    pairs, truncated = _tokenized(cfg.data, tokenizer, cfg)
    eval_pairs, eval_truncated = _tokenized(cfg.eval_data, tokenizer, cfg) if cfg.eval_data else ([], 0)
    policy = load_policy(cfg, precision)
    # A 4-bit base is placed on its device as it loads (bitsandbytes' weights cannot be moved after).
    module = SequenceLogps(policy) if precision.weights == "nf4" else SequenceLogps(policy).to(acc.device)

    t_ref = time.perf_counter()  # before any training step: the weights are still the base model's
    datasets = {"train": (cfg.data, pairs)} | ({"eval": (cfg.eval_data, eval_pairs)} if eval_pairs else {})
    refs, ref_status = _references(cfg, acc, module, tokenizer, datasets, precision.key)
    ref_seconds = time.perf_counter() - t_ref

    params, optimizer, scheduler, total_steps = _optimizer(cfg, module, len(pairs), acc.num_processes)
    wrapped, optimizer = acc.prepare(module, optimizer)
    state = TrainState()
    if ckpt is not None:
        state = restore_checkpoint(ckpt, module, optimizer, scheduler)
        if acc.is_main_process:
            _metrics_upto(out, state.step)
    elif acc.is_main_process:
        (out / METRICS).unlink(missing_ok=True)
    resumed_from, ckpt = state.step, None

    ctx = SimpleNamespace(cfg=cfg, accelerator=acc, module=wrapped, optimizer=optimizer, scheduler=scheduler,
                          params=params, pairs=pairs, ref=refs.get("train"), settings=settings,
                          pad_id=pad_id(tokenizer))
    bar = _progress(cfg, acc, total_steps, state.step)
    # One process: a signal ends the job after the step in progress, with a checkpoint. Several: each
    # would stop at its own step, so a signal interrupts them and they resume from the last checkpoint.
    with stop_between_steps() if acc.num_processes == 1 else nullcontext():
        state = train_loop(ctx, state, *_hooks(cfg, acc, config_hash, module, optimizer, scheduler, total_steps, bar))
    if bar is not None:
        bar.close()

    ev = {"eval_loss": None, "eval_reward_accuracy": None, "eval_reward_margin": None, "eval_pairs": 0}
    acc.wait_for_everyone()
    if acc.is_main_process:  # the main process evaluates (on the unwrapped model: no collectives) and writes
        if eval_pairs:
            with acc.autocast():
                ev = evaluate(module, settings, eval_pairs, refs.get("eval"), cfg.batch_size * 2,
                              pad_id(tokenizer), acc.device)
        folder = save_trained(acc.unwrap_model(wrapped).lm, tokenizer, out, cfg.full)
        summary = _summary(cfg, config_hash, state, ev, ref_status, ref_seconds, folder,
                           truncated, eval_truncated, len(pairs), resumed_from, time.perf_counter() - t_start)
        summary["processes"] = acc.num_processes
        summary["health"] = assess(metrics_rows(out / METRICS), total_steps)
        summary["base_weights"] = precision.weights
        write_summary(out, summary)  # last: its presence means "finished"
        remove_checkpoint(out)
    acc.wait_for_everyone()
    return read_json(out / SUMMARY_FILE)


def _summary(cfg, config_hash, state, ev, ref_status, ref_seconds, folder, truncated, eval_truncated,
             n_pairs, resumed_from, wall) -> dict:
    busy = state.seconds + ref_seconds
    return {
        "loss_type": cfg.loss_type.value, "beta": cfg.beta, "base_model": str(Path(cfg.model).resolve()),
        "train_loss": state.last_epoch_loss, **ev,
        "train_samples_per_second": state.samples / busy if busy > 0 else None,
        "train_tokens": state.tokens, "train_pairs": n_pairs, "samples": state.samples,
        "peak_rss_mb": round(peak_rss_mb(), 1), "wall_seconds": round(wall, 3),
        "train_seconds": round(state.seconds, 3), "reference_seconds": round(ref_seconds, 3),
        "ref_cache": ref_status, "config_hash": config_hash, "steps": state.step, "epochs": cfg.epochs,
        "truncated": truncated, "eval_truncated": eval_truncated, "resumed_from_step": resumed_from,
        "full": cfg.full, "adapter_dir": None if cfg.full else str(folder),
        "model_dir": str(folder) if cfg.full else None,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        # where the sweep pinned it (preftune/placement.py): the environment the process really ran in
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "config": cfg.model_dump(mode="json"),
    }
