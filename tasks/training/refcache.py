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

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from preftune.tasks.training.config import TRAINER_VERSION
from preftune.workspace import file_sha256

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                    "chat_template.json")


def _digest(path: Path, memo: dict) -> str:
    """Content sha256, memoised by (path, size, mtime) so big weight files are read once."""
    st = path.stat()
    tag = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if tag not in memo:
        memo[tag] = file_sha256(path)
    return memo[tag]


def _load_memo(cache: Path) -> dict:
    try:
        return json.loads((cache / "digests.json").read_text())
    except (OSError, ValueError):
        return {}


def _save_memo(cache: Path, memo: dict) -> None:
    _atomic_write(cache / "digests.json", lambda fh: fh.write(json.dumps(memo, indent=1).encode()))


def model_fingerprint(model_dir: Path, memo: dict) -> dict:
    """Content digests of the files that define the model's outputs and its tokenizer."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file())
    weights = {p.name: _digest(p, memo) for p in files if p.suffix in _WEIGHT_SUFFIXES}
    tokenizer = {p.name: _digest(p, memo) for p in files if p.name in _TOKENIZER_FILES}
    config = _digest(Path(model_dir) / "config.json", memo)
    return {"config": config, "weights": weights, "tokenizer": tokenizer}


def reference_key(cache: Path, model_dir: Path, chat_template: str | None, data: Path, max_length: int,
                  max_prompt_length: int | None, precision: str) -> tuple[str, dict]:
    """(hash, the fields it was taken over) — the fields are stored beside the tensors."""
    memo = _load_memo(cache)
    fields = {
        "model": model_fingerprint(model_dir, memo),
        "chat_template": chat_template or "",
        "data": _digest(Path(data), memo),
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "precision": precision,
        "trainer_version": TRAINER_VERSION,
    }
    _save_memo(cache, memo)
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
    return key, fields


def _atomic_write(path: Path, write: Callable) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load_or_compute(cache: Path, key: str, fields: dict, n: int,
                    compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict, str]:
    """({"chosen": (n,), "rejected": (n,)}, "hit" | "miss"); computes and stores on a miss."""
    path = Path(cache) / f"{key}.pt"
    with _locked(Path(cache) / f"{key}.lock"):
        if path.exists():
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored["chosen"].numel() == n:
                return {"chosen": stored["chosen"], "rejected": stored["rejected"]}, "hit"
        chosen, rejected = compute()
        blob = {"chosen": chosen.detach().float().cpu(), "rejected": rejected.detach().float().cpu(),
                "fields": json.dumps(fields, sort_keys=True)}
        _atomic_write(path, lambda fh: torch.save(blob, fh))
        return {"chosen": blob["chosen"], "rejected": blob["rejected"]}, "miss"
