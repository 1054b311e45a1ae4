"""The cost ledger: one JSON line per *paid* request, appended when it is paid.

Usage summed from in-memory counters can be lost (a kill before the counters are written) or
double-counted / overwritten (a phase that runs twice, a re-run answered from the cache). The
ledger is the record of money: ``ChatClient`` appends one line per HTTP response that carried
usage (never a cache hit, never a failed request), with one ``write`` on an ``O_APPEND`` file, so
the line is in the file as soon as the request is paid and survives a crash right after.

A line: ``{"time", "phase", "endpoint", "prompt_tokens", "completion_tokens", "usd"}`` where
``endpoint`` is ``model@base_url`` (never a key) and ``usd`` comes from ``Endpoint.cost`` (the one
price rule), ``null`` when the endpoint is unpriced: a phase with any unpriced paid request has an
unknown cost, never $0.

Phases written: ``pairs`` (pair generation), ``completions`` (an endpoint model answering the
held-out prompts), ``rubric`` (the auto rubric) and ``evaluation`` (judge verdicts).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from preftune.endpoint import Endpoint

LEDGER_FILE = "ledger.jsonl"

# The report's cost rows and the ledger phases each one sums (the plan estimates the same: the
# generators, and the judge). "completions" (an endpoint answering held-out prompts, only from
# `preftune evaluate`: the flow's candidates are local) is listed in the report's ledger line.
REPORT_PHASES = {"pair_generation": ("pairs",), "evaluation": ("rubric", "evaluation")}


@dataclass(frozen=True)
class Ledger:
    """Where paid requests are appended, and under which phase."""

    path: Path
    phase: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def with_phase(self, phase: str) -> Ledger:
        return replace(self, phase=phase)

    def record(self, endpoint: Endpoint, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """Append one paid request (one write of one line, O_APPEND) and return the entry."""
        usd = endpoint.cost(prompt_tokens, completion_tokens)
        entry = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "phase": self.phase,
                 "endpoint": str(endpoint), "prompt_tokens": int(prompt_tokens),
                 "completion_tokens": int(completion_tokens), "usd": None if usd is None else round(usd, 9)}
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)  # unbuffered: in the file (the kernel's page cache) when this returns
        finally:
            os.close(fd)
        return entry


def read_ledger(path: str | Path) -> list[dict[str, Any]]:
    """Every complete entry; a line torn by a crash is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "phase" in entry:
            entries.append(entry)
    return entries


def phase_totals(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ledger phase: requests, tokens, and usd (None as soon as one paid request was unpriced)."""
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        t = out.setdefault(e["phase"], {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0,
                                        "unpriced": []})
        t["requests"] += 1
        t["prompt_tokens"] += int(e.get("prompt_tokens") or 0)
        t["completion_tokens"] += int(e.get("completion_tokens") or 0)
        if e.get("usd") is None:
            if e.get("endpoint") not in t["unpriced"]:
                t["unpriced"].append(e.get("endpoint"))
        else:
            t["usd"] += float(e["usd"])
    for t in out.values():
        t["usd"] = None if t["unpriced"] else round(t["usd"], 6)
    return out


def usd_of(entries: list[dict[str, Any]], phases: tuple[str, ...]) -> float | None:
    """USD paid in these phases; None (unknown) when any paid request among them was unpriced."""
    chosen = [e for e in entries if e["phase"] in phases]
    if any(e.get("usd") is None for e in chosen):
        return None
    return round(sum(float(e["usd"]) for e in chosen), 6)
