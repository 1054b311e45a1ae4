"""Targets for the bench scripts: each script lists its own in one ``TARGETS`` constant and calls
``verdict`` at the end, which prints one PASS / FAIL / SKIP line per target, a ``TARGET MISSED:``
line per failure, and returns the exit code (1 when any target was missed).

A target that was not measured counts as missed unless ``skip`` says why (a ``--quick`` run of a
target that only holds at full size, or a mode the caller left out).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

_OPS = {">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class Target:
    name: str  # what is measured, e.g. "validation speed"
    op: str  # ">=" or "<="
    limit: float
    unit: str = ""  # e.g. "examples/s"
    full_size_only: bool = False  # skipped by --quick smoke runs (the target is stated at full size)
    note: str = ""  # where the target comes from / what the measure is

    def describe(self) -> str:
        return f"{self.op} {_num(self.limit)}{(' ' + self.unit) if self.unit else ''}"


def _num(x: float) -> str:
    if float(x).is_integer() and abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.1f}"


def print_targets(targets: list[Target], quick: bool = False) -> None:
    """The targets, up front (so a reader sees what the figures are held to)."""
    print("targets:")
    for t in targets:
        extra = " (full size only: skipped by --quick)" if (t.full_size_only and quick) else ""
        print(f"  {t.name}: {t.describe()}{extra}" + (f"  [{t.note}]" if t.note else ""))


def verdict(targets: list[Target], measured: dict[str, float | None], quick: bool = False,
            skip: dict[str, str] | None = None) -> tuple[int, list[dict]]:
    """Check each target against ``measured[target.name]``; print the table; return (exit code, rows).

    ``skip`` maps a target name to the reason it is not checked in this run (besides --quick)."""
    skip = dict(skip or {})
    rows, missed = [], []
    for t in targets:
        value = measured.get(t.name)
        if t.full_size_only and quick:
            result, why = "SKIP", "--quick smoke run; this target only holds at full size"
        elif t.name in skip:
            result, why = "SKIP", skip[t.name]
        elif value is None:
            result, why = "FAIL", "not measured"
        else:
            ok = _OPS[t.op](value, t.limit)
            result, why = ("PASS" if ok else "FAIL"), ""
        rows.append({"target": t.name, "op": t.op, "limit": t.limit, "unit": t.unit,
                     "value": value, "result": result, "why": why})
        if result == "FAIL":
            missed.append((t, value, why))
    width = max([len(t.name) for t in targets] + [6])
    print(f"\n{'target':<{width}}  {'needs':>18}  {'measured':>12}  result")
    for t, row in zip(targets, rows, strict=True):
        value = "-" if row["value"] is None else _num(row["value"])
        print(f"{t.name:<{width}}  {t.describe():>18}  {value:>12}  {row['result']}"
              + (f" ({row['why']})" if row["why"] else ""))
    for t, value, why in missed:
        got = why if value is None else f"{_num(value)}{(' ' + t.unit) if t.unit else ''}"
        print(f"TARGET MISSED: {t.name}: {got}, needs {t.describe()}")
    if quick and any(t.full_size_only for t in targets):
        print("note: --quick skips the targets that only hold at full size; run without --quick to check them")
    return (1 if missed else 0), rows
