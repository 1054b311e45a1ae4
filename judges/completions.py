"""The completion cache of phase 5: ``eval/completions/<model-key>.jsonl``, one line per prompt.

A model key names exactly what determines a completion: the model (folder or endpoint), the
adapter's *content* (a retrained adapter in the same folder is a different model), and the
generation settings. Lines are ``{"prompt_hash", "completion", "cut"}`` (``cut``: the answer stopped
at the token limit without ending; absent in caches written before it was recorded); completions are appended chunk by
chunk as they are generated, so an interrupted run keeps what it finished and a re-run generates
only the prompts that are missing. A torn last line (crash mid-write) is ignored.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from preftune.files import append_jsonl

CHUNK = 64  # prompts per generate call: the unit of resumable progress


def model_key(name: str, identity: dict) -> str:
    """``<name>-<12 hex>``: readable, and different whenever ``identity`` differs."""
    blob = json.dumps(identity, sort_keys=True, default=str)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]
    return f"{slug}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


class Conversation(list):
    """A held-out prompt's messages that also carry the dataset's ``tools`` (rendered by the chat
    template at generation, as training renders them); a plain list everywhere else."""

    def __init__(self, messages: list[dict], tools: list | None = None):
        super().__init__(messages)
        self.tools = tools


def read_cut(path: Path) -> set[str]:
    """Prompt hashes whose cached answer was cut at the token limit."""
    if not path.exists():
        return set()
    out = set()
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("cut"):
                out.add(row.get("prompt_hash"))
    return out


def read_cache(path: Path) -> dict[str, str]:
    done: dict[str, str] = {}
    if not path.exists():
        return done
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
                done[row["prompt_hash"]] = row["completion"]
            except (ValueError, KeyError, TypeError):
                continue
    return done


def cached_completions(path: Path, prompts: Sequence[tuple[str, list[dict]]],
                       generate: Callable[[list[list[dict]]], list[str | tuple[str, bool] | None]],
                       *, chunk: int = CHUNK) -> tuple[list[str], int]:
    """Completions for ``prompts`` ((hash, messages) pairs), generating only the missing ones.

    ``generate`` returns per prompt the text, or (text, cut at the token limit), or None when it
    failed: that prompt gets "" this time and is not cached, so a re-run tries it again. Returns
    (completions in prompt order, number generated).
    """
    done = read_cache(path)
    missing = [(h, m) for h, m in dict(prompts).items() if h not in done]
    for start in range(0, len(missing), chunk):
        part = missing[start:start + chunk]
        outs = generate([m for _, m in part])
        for (h, _), text in zip(part, outs, strict=True):
            if text is None:
                continue
            text, cut = text if isinstance(text, tuple) else (text, False)
            done[h] = text
            append_jsonl(path, {"prompt_hash": h, "completion": text, "cut": cut})
    return [done.get(h, "") for h, _ in prompts], len(missing)


