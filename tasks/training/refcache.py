"""Reference log-probs, computed once per (base model, tokenizer, data, max_length, template).

The reference model is the frozen base model, so its per-sequence log-probs on a dataset never
change during training. They are computed once, before training, and stored as
``<cache>/<key>.pt`` where ``key`` hashes exactly what determines them: the model folder's
config and weight files (content), the tokenizer files, the chat template, the data file
(content), ``max_length`` / ``max_prompt_length`` (truncation) and the compute precision. Every
job of that base model — each beta, each loss that needs a reference, LoRA or full — reuses them.

Concurrent jobs of one base model take a file lock per key: the first computes, the others wait
and then read it (one reference pass for the whole sweep, not one per job).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from preftune.files import atomic_output, file_lock, write_json_atomic
from preftune.hf import file_digest, model_identity
from preftune.job import TRAINER_VERSION


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


def load_or_compute(cache: Path, key: str, fields: dict, n: int,
                    compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict, str]:
    """({"chosen": (n,), "rejected": (n,)}, "hit" | "miss"); computes and stores on a miss."""
    path = Path(cache) / f"{key}.pt"
    with file_lock(Path(cache) / f"{key}.lock"):
        if path.exists():
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored["chosen"].numel() == n:
                return {"chosen": stored["chosen"], "rejected": stored["rejected"]}, "hit"
        chosen, rejected = compute()
        blob = {"chosen": chosen.detach().float().cpu(), "rejected": rejected.detach().float().cpu(),
                "fields": json.dumps(fields, sort_keys=True)}
        with atomic_output(path, "wb") as fh:
            torch.save(blob, fh)
        return {"chosen": blob["chosen"], "rejected": blob["rejected"]}, "miss"
