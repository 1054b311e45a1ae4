"""Reference log-probs, computed once per (base model, tokenizer, data, max_length, template).

The reference model is the frozen base model, so its per-sequence log-probs on a dataset never
change during training. They are computed once, before training, and stored as
``<cache>/<key>.pt`` where ``key`` hashes exactly what determines them: the model folder's
config and weight files (content), the tokenizer files, the chat template, the data file
(content), ``max_length`` / ``max_prompt_length`` (truncation) and the compute precision. Every
job of that base model — each beta, each loss that needs a reference, LoRA or full — reuses them.

Concurrent jobs of one base model take a file lock per key: the first computes, the others wait
and then read it (one reference pass for the whole sweep, not one per job; the local sweep also
starts a base's other jobs only once its first has computed them, tasks/sweep.py). A stored file is
never trusted as found: a torn or unreadable one is a miss, and a readable one is used only after a
few pairs recomputed agree with it (``disagreement``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

import torch

from preftune.files import digested_output, file_lock, matches_recorded, recorded_digests, write_json_atomic
from preftune.hf import file_digest, model_identity
from preftune.job import TRAINER_VERSION

log = logging.getLogger("preftune.refcache")


def _load_memo(cache: Path) -> dict:
    try:
        return json.loads((cache / "digests.json").read_text())
    except (OSError, ValueError):
        return {}


def _save_memo(cache: Path, memo: dict) -> None:
    write_json_atomic(cache / "digests.json", memo)


def reference_key(cache: Path, model_dir: Path, chat_template: str | None, data: Path, max_length: int,
                  max_prompt_length: int | None, precision: str) -> tuple[str, dict]:
    """(hash, the fields it was taken over) — the fields are stored beside the tensors."""
    memo = _load_memo(cache)
    fields = {
        "model": model_identity(model_dir, memo),
        "chat_template": chat_template or "",
        "data": file_digest(Path(data), memo),
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "precision": precision,
        "trainer_version": TRAINER_VERSION,
    }
    _save_memo(cache, memo)
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
    return key, fields


# A stored cache is checked on first use against CHECK_PAIRS pairs recomputed, drawn at random each
# time: an edit cannot aim at the pairs left unchecked (a fixed first/middle/last could). The
# tolerance on a summed log-prob: batching and padding move fp32 values by ~1e-4; bf16 by up to ~1 nat
# on long answers. A cache with wrong values (another model's, a stale or doctored file) is off by far more.
CHECK_PAIRS = 3
TOLERANCE = {"fp32": (0.05, 1e-3), "bf16": (1.0, 2e-2)}  # (absolute nats, relative)


_warned: set[tuple[str, str]] = set()


def _warn_once(path: Path, problem: str) -> None:
    """One line per cache and problem: a lookup (the base model's view) and the job that computes the
    cache again would both say it."""
    if (str(path), problem) not in _warned:
        _warned.add((str(path), problem))
        log.warning("reference cache %s %s: computing it again", path.name, problem)


def _digest_file(path: Path) -> Path:
    """Where the sha256 of a stored cache is kept (preftune.files.digested_output, as a checkpoint's): a
    cache whose bytes changed since is not read (the recomputed sample alone would miss a few values
    edited off its pairs)."""
    return path.with_suffix(".sha256")


def _stored(path: Path, n: int) -> dict | None:
    """The stored tensors, or None when the file is absent, truncated, changed since it was written,
    unreadable or of another size."""
    if path.exists() and not matches_recorded(path, _digest_file(path)):
        _warn_once(path, "changed since it was written" if recorded_digests(_digest_file(path))
                   else "has no recorded digest")
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        chosen, rejected = blob["chosen"], blob["rejected"]
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 — a torn or foreign file of any kind is a cache miss
        _warn_once(path, f"unreadable ({type(err).__name__})")
        return None
    if not (isinstance(chosen, torch.Tensor) and isinstance(rejected, torch.Tensor)
            and chosen.shape == rejected.shape == (n,)):
        return None
    return {"chosen": chosen, "rejected": rejected}


def check_indices(n: int) -> list[int]:
    """``CHECK_PAIRS`` distinct pairs of ``n`` (all of them when fewer), in order."""
    return sorted(random.SystemRandom().sample(range(n), min(CHECK_PAIRS, n)))


def disagreement(stored: dict, idx: list[int], fresh: tuple[torch.Tensor, torch.Tensor], precision: str) -> float | None:
    """The largest difference between stored and recomputed log-probs when it is past the tolerance, else None."""
    atol, rtol = TOLERANCE.get(precision, TOLERANCE["bf16"])
    worst = None
    for side, values in zip(("chosen", "rejected"), fresh, strict=True):
        old, new = stored[side][idx].float(), values.detach().float().cpu()
        diff = (old - new).abs()
        bad = ~torch.isfinite(old) | (diff > atol + rtol * new.abs())
        if bad.any():
            worst = max(worst or 0.0, float(diff.nan_to_num(float("inf")).max()))
    return worst


def _checked(path: Path, n: int, compute: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
             precision: str) -> dict | None:
    """The stored tensors when they are readable and ``check_indices`` pairs recomputed agree; else None."""
    stored = _stored(path, n)
    if stored is None:
        return None
    idx = check_indices(n)
    worst = disagreement(stored, idx, compute(idx), precision)
    if worst is not None:
        log.warning("reference cache %s disagrees with %d pairs recomputed (max difference %.4g nats): "
                    "computing it again", path.name, len(idx), worst)
        return None
    return stored


def lookup(cache: Path, key: str, n: int, compute: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
           precision: str = "fp32") -> dict | None:
    """A stored cache, checked as ``load_or_compute`` checks it, without computing it on a miss (None)."""
    with file_lock(Path(cache) / f"{key}.lock"):
        return _checked(Path(cache) / f"{key}.pt", n, compute, precision)


def load_or_compute(cache: Path, key: str, fields: dict, n: int,
                    compute: Callable[[list[int] | None], tuple[torch.Tensor, torch.Tensor]],
                    precision: str = "fp32") -> tuple[dict, str]:
    """({"chosen": (n,), "rejected": (n,)}, "hit" | "miss"); computes and stores on a miss.

    ``compute(indices)`` gives the log-probs of those pairs (None: all n). A stored cache is used
    only after ``check_indices`` pairs recomputed agree with it; otherwise it is computed again whole."""
    path = Path(cache) / f"{key}.pt"
    with file_lock(Path(cache) / f"{key}.lock"):
        stored = _checked(path, n, compute, precision)
        if stored is not None:
            return stored, "hit"
        chosen, rejected = compute(None)
        blob = {"chosen": chosen.detach().float().cpu(), "rejected": rejected.detach().float().cpu(),
                "fields": json.dumps(fields, sort_keys=True)}
        with digested_output(path, _digest_file(path)) as sink:
            torch.save(blob, sink)
        return {"chosen": blob["chosen"], "rejected": blob["rejected"]}, "miss"
