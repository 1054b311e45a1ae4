"""Phase 2's measured generation speed: what the plan's wall time is computed from.

Before the plan is shown, a short calibration times the run's own generation paths on this
machine, on the run's own prompts and lengths:

* pairs — when the strong and the weak generator are both local folders: they are served as the
  pairs phase serves them (transformers serve, the same concurrency) and one wave of prompts is
  completed on both at once. Local CPU time is free; a remote endpoint is never called here (its
  speed is unknown, and a call would spend before approval), so its pair time is not estimated.
  The completions go to the pairs phase's response cache, so that work is not lost.
* evaluation — one batch of held-out prompts generated in-process on each base model, as phase 5
  does (``tasks/generate.py``), plus the model's load time.

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


def measure_eval_generation(spec: RunSpec, ws: Workspace, base_models: list[str]) -> dict:
    """Per base model: its load time and seconds per evaluation prompt (in-process, batched)."""
    from preftune.tasks.generate import generate_with, load_causal_lm

    test = ws.test_data if ws.test_data.exists() else ws.train_data
    prompts = [rec["messages"] for _, rec in _prompts(test, 16)]
    out: dict[str, dict] = {}
    for model in base_models:
        t0 = time.perf_counter()
        net, tok = load_causal_lm(model)
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        if prompts:
            generate_with(net, tok, prompts, max_new_tokens=spec.eval_max_new_tokens)
        wall = time.perf_counter() - t1
        out[model] = {"load_s": round(load_s, 2), "prompts": len(prompts),
                      "seconds_per_prompt": round(wall / max(len(prompts), 1), 4)}
        del net, tok
    return out


def calibrate(spec: RunSpec, ws: Workspace, inspection: dict, base_models: list[str]) -> dict:
    """The measured speeds the plan's wall time uses; measured once per workspace (module docstring)."""
    path = throughput_path(ws)
    if path.exists():
        return read_json(path)
    pairs = measure_pairs(spec, ws) if inspection["format"] == "prompts" else None
    result = {"pairs": pairs, "evaluation": measure_eval_generation(spec, ws, sorted(set(base_models)))}
    write_json_atomic(path, result)
    return result
