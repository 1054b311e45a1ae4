"""Phase 2's measured generation speed: what the plan's wall time is computed from.

Before the plan is shown, a short calibration times the run's own generation paths on this
machine, on the run's own prompts and lengths:

* pairs — when the strong and the weak generator are both local folders: they are served as the
  pairs phase serves them (preftune's batching server, the same concurrency) and one wave of prompts is
  completed on both at once. Local CPU time is free; a remote endpoint is never called here (its
  speed is unknown, and a call would spend before approval), so its pair time is not estimated.
  The completions go to the pairs phase's response cache, so that work is not lost.
* evaluation — one batch of held-out prompts generated in-process on each base model, as phase 5
  does (``tasks/generate.py``), plus the model's load time.
* training — on the same loaded model, one pair of rows at the run's typical trained length
  through the trainer's own log-prob module (``tasks/training/logps.py``, one pair per forward as
  the CPU loop runs it): a no-grad forward (the reference pass) and a forward + backward with
  every weight trainable (full fine-tuning; LoRA skips the weight gradients). Nothing is updated.
  A FLOP count alone was off by 2-25x on the zoo's models, whose steps are mostly overhead.

The figures are written to ``throughput.json`` in the workspace: a resumed run shows the same plan
(its digest is what the approval recorded) and does not calibrate again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from preftune.client import ChatClient
from preftune.files import read_json, write_json_atomic
from preftune.records import iter_records
from preftune.server import resolve_run_endpoints
from preftune.spec import RunSpec
from preftune.workspace import Workspace

CALIBRATION_FILE = "throughput.json"
MIN_PROMPTS = 8  # calibration prompts at the least (a one-at-a-time server gets this many)


def throughput_path(ws: Workspace) -> Path:
    return ws.root / CALIBRATION_FILE


def _prompts(path: Path, n: int) -> list[tuple[int, dict]]:
    out = []
    for line, rec in iter_records(path):
        if "messages" not in rec:
            continue
        out.append((line, {"messages": rec["messages"], **({"tools": rec["tools"]} if rec.get("tools") else {})}))
        if len(out) >= n:
            break
    return out


def measure_pairs(spec: RunSpec, ws: Workspace) -> dict | None:
    """Seconds per prompt (both sides at once) on the local generators; None when one is remote."""
    from preftune.tasks.pairs import complete_all, endpoint_concurrency

    if spec.strong is None or spec.weak is None or not (spec.strong.is_local and spec.weak.is_local):
        return None
    t_load = time.perf_counter()
    with contextlib.ExitStack() as stack:
        strong, weak = resolve_run_endpoints([spec.strong, spec.weak], log_dir=ws.logs_dir, stack=stack)
        load_s = time.perf_counter() - t_load
        conc = max(endpoint_concurrency(strong), endpoint_concurrency(weak))
        records = _prompts(ws.train_data, max(MIN_PROMPTS, conc))
        if not records:
            return None
        cache = ws.pairs_dir / "cache"  # the pairs phase's: these completions are not asked again
        clients = [ChatClient(ep, concurrency=endpoint_concurrency(ep), cache_dir=cache) for ep in (strong, weak)]
        t0 = time.perf_counter()
        outcomes = asyncio.run(complete_all(records, *clients, max_tokens=spec.pair_max_tokens, temperature=0.0))
        wall = time.perf_counter() - t0
    tokens = sum(getattr(o, "completion_tokens", 0) for pair in outcomes for o in pair)
    return {"prompts": len(records), "seconds": round(wall, 3), "seconds_per_prompt": round(wall / len(records), 4),
            "completion_tokens": tokens, "tokens_per_s": round(tokens / max(wall, 1e-9), 1),
            "concurrency": conc, "server_start_s": round(load_s, 1)}


def row_length(spec: RunSpec, inspection: dict, model: str) -> int:
    """The typical trained row (prompt + one answer) of this run, in ``model``'s tokens."""
    stats = inspection.get("token_stats", {}).get(model, {})

    def mean(field: str) -> float:
        return float(stats.get(field, {}).get("mean") or 0.0)

    answer = (mean("preferred") + mean("non_preferred")) / 2 if inspection["format"] == "pairs" \
        else spec.pair_max_tokens / 2
    return int(max(16, min(spec.max_length, mean("prompt") + answer)))


def measure_training(net, length: int) -> dict:
    """Seconds per trained token of one pair of ``length``-token rows (module docstring)."""
    import torch

    from preftune.tasks.training.data import TokenizedPair, collate
    from preftune.tasks.training.logps import SequenceLogps, batch_logps

    vocab = net.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2 * length,), generator=gen).tolist()
    prompt = length // 4  # the answer tokens are the ones scored
    pair = TokenizedPair(tuple(ids[:prompt]), tuple(ids[prompt:length]), tuple(ids[length + prompt:]), False)
    batch = collate([pair], [0], 0).to(next(net.parameters()).device)
    module = SequenceLogps(net)
    trainable = [p.requires_grad for p in net.parameters()]
    forward = backward = float("inf")
    try:
        # The fastest of a few rounds: one timing on a busy machine measures the other processes.
        with torch.no_grad():
            batch_logps(module, batch)  # warm-up: first-call allocations are not the steady rate
            for _ in range(3):
                t0 = time.perf_counter()
                batch_logps(module, batch)
                forward = min(forward, time.perf_counter() - t0)
        net.requires_grad_(True)
        for _ in range(2):
            t1 = time.perf_counter()
            batch_logps(module, batch).sum().backward()
            backward = min(backward, time.perf_counter() - t1)
            net.zero_grad(set_to_none=True)
    finally:
        net.zero_grad(set_to_none=True)
        for p, flag in zip(net.parameters(), trainable, strict=True):
            p.requires_grad_(flag)
    tokens = batch.real_tokens
    return {"row_tokens": length, "forward_s_per_token": round(forward / tokens, 8),
            "train_full_s_per_token": round(backward / tokens, 8)}


def measure_models(spec: RunSpec, ws: Workspace, inspection: dict, base_models: list[str]) -> tuple[dict, dict]:
    """Per base model: (its load time and seconds per evaluation prompt, in-process and batched;
    its training speed, ``measure_training``)."""
    from preftune.tasks.generate import generate_with, load_causal_lm
    from preftune.tasks.plan import eval_tokens_estimate

    test = ws.test_data if ws.test_data.exists() else ws.train_data
    prompts = [rec["messages"] for _, rec in _prompts(test, 16)]
    evaluation: dict[str, dict] = {}
    training: dict[str, dict] = {}
    for model in base_models:
        t0 = time.perf_counter()
        net, tok = load_causal_lm(model)
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        if prompts:
            generate_with(net, tok, prompts, max_new_tokens=eval_tokens_estimate(spec, inspection))
        wall = time.perf_counter() - t1
        evaluation[model] = {"load_s": round(load_s, 2), "prompts": len(prompts),
                             "seconds_per_prompt": round(wall / max(len(prompts), 1), 4)}
        training[model] = {"load_s": round(load_s, 2), **measure_training(net, row_length(spec, inspection, model))}
        del net, tok
    return evaluation, training


def calibrate(spec: RunSpec, ws: Workspace, inspection: dict, base_models: list[str]) -> dict:
    """The measured speeds the plan's wall time uses; measured once per workspace (module docstring)."""
    path = throughput_path(ws)
    if path.exists():
        return read_json(path)
    pairs = measure_pairs(spec, ws) if inspection["format"] == "prompts" else None
    evaluation, training = measure_models(spec, ws, inspection, sorted(set(base_models)))
    result = {"pairs": pairs, "evaluation": evaluation, "training": training}
    write_json_atomic(path, result)
    return result
