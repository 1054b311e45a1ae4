"""Training health from a job's metrics.jsonl rows: a pure function, no torch.

Three flags, each with the step it was first seen and a remedy, and the KL to the reference:

- ``diverged``: a loss or gradient norm that is not finite, or a loss above ``EXPLODE_FACTOR`` times
  the first logged loss (at least ``EXPLODE_MIN``). The trainer checks every row as it is logged and
  stops the job with this reason; the sweep's other jobs go on.
- ``likelihood displacement`` (Razin et al. 2024, arXiv:2410.08847; Pal et al. 2024 "Smaug"): the
  chosen answers' log-prob falls below the reference's while the reward margin rises — DPO widens
  the margin by pushing both answers down. Measured on the chosen log-ratio (policy − reference
  log-prob of the same batch's chosen answers, in nats per sequence), which unlike the raw log-prob
  does not move with the batch's lengths; without a reference (SimPO, ORPO), on the chosen log-prob
  against its first rows.
- ``accuracy saturated``: reward accuracy ≥ ``SATURATED_AT`` on ``SATURATED_ROWS`` logged rows in a
  row within the first ``EARLY_SHARE`` of training: the pairs are separated almost at once, often on
  a surface cue (see the plan's Data diagnostics) rather than on quality.

The KL is the k3 estimator (exp(x) − 1 − x, x = reference − policy log-prob per token) on the
training pairs' completions, averaged over chosen and rejected rows, as the loop logs it
(``kl/ref``): an estimate on the data's answers, not on samples of the policy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from preftune.files import read_jsonl_rows

DIVERGED, DISPLACEMENT, SATURATED = "diverged", "likelihood displacement", "accuracy saturated"
EXPLODE_FACTOR, EXPLODE_MIN = 10.0, 5.0
DISPLACE_NATS = 1.0  # chosen log-ratio below −this (nats per sequence), with the margin up: displaced
SATURATED_AT, SATURATED_ROWS, EARLY_SHARE = 0.99, 3, 0.25

REMEDIES = {
    DIVERGED: "lower the learning rate (or raise warm-up), keep gradient clipping on (max_grad_norm)",
    DISPLACEMENT: "add an NLL term on the chosen answers (rpo_alpha, e.g. 0.5-1.0), or lower the learning "
                  "rate, or raise beta",
    SATURATED: "the pairs are too easy to tell apart: check the Data diagnostics for a shortcut; raise beta, "
               "lower the learning rate or train fewer steps",
}


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def divergence(row: dict, first_loss: float | None) -> str | None:
    """The reason one logged row shows divergence, or None (what the trainer checks as it logs)."""
    loss, norm = row.get("loss"), row.get("grad_norm")
    if not _finite(loss):
        return f"loss is {loss}"
    if norm is not None and not _finite(norm):
        return f"gradient norm is {norm}"
    if first_loss is not None and loss > max(EXPLODE_MIN, EXPLODE_FACTOR * abs(first_loss)):
        return f"loss {loss:.4g} exploded (first logged loss {first_loss:.4g})"
    return None


def _flag(name: str, step: int, detail: str) -> dict:
    return {"name": name, "step": step, "detail": detail, "remedy": REMEDIES[name]}


def _diverged(rows: Sequence[dict]) -> dict | None:
    first = rows[0].get("loss") if _finite(rows[0].get("loss")) else None
    for row in rows:
        reason = divergence(row, first)
        if reason:
            return _flag(DIVERGED, row["step"], reason)
    return None


def _chosen_ratio(row: dict) -> float | None:
    if row.get("logps/ref_chosen") is None:
        return None
    return row["logps/chosen"] - row["logps/ref_chosen"]


def _displacement(rows: Sequence[dict]) -> dict | None:
    """First step where the chosen answers are down by more than DISPLACE_NATS and the margin is above
    its first value, provided the last row is still displaced (a dip that recovered is not flagged)."""
    if len(rows) < 2 or any("logps/chosen" not in r or "rewards/margins" not in r for r in rows):
        return None  # a metrics file of another trainer version: nothing to read this from
    head = rows[: max(1, len(rows) // 5)]
    start_margin = rows[0]["rewards/margins"]
    with_ref = _chosen_ratio(rows[0]) is not None
    base = 0.0 if with_ref else sum(r["logps/chosen"] for r in head) / len(head)

    def drop(row: dict) -> float:  # how far the chosen answers fell, nats per sequence
        return -(_chosen_ratio(row) or 0.0) if with_ref else base - row["logps/chosen"]

    tail = rows[-max(1, len(rows) // 5):]
    if sum(drop(r) for r in tail) / len(tail) <= DISPLACE_NATS:
        return None
    for row in rows[1:]:
        if drop(row) > DISPLACE_NATS and row["rewards/margins"] > start_margin:
            what = "chosen log-ratio to the reference" if with_ref else "chosen log-prob"
            return _flag(DISPLACEMENT, row["step"],
                         f"{what} down {drop(row):.2f} nats while the margin rose from {start_margin:.3g} "
                         f"to {row['rewards/margins']:.3g} (last row: down {drop(rows[-1]):.2f})")
    return None


def _saturated(rows: Sequence[dict], total_steps: int | None) -> dict | None:
    limit = EARLY_SHARE * (total_steps or rows[-1]["step"])
    run = 0
    for i, row in enumerate(rows):
        run = run + 1 if row.get("rewards/accuracies", 0.0) >= SATURATED_AT else 0
        start = rows[i - run + 1]["step"] if run else None
        if run >= SATURATED_ROWS and start is not None and start <= limit:
            return _flag(SATURATED, start, f"reward accuracy ≥ {SATURATED_AT} from step {start} of "
                                           f"{total_steps or rows[-1]['step']}")
    return None


def assess(rows: Sequence[dict], total_steps: int | None = None) -> dict:
    """{"flags": [{"name", "step", "detail", "remedy"}], "kl": {"last", "max"} | None, "rows"} of a job's
    metrics rows (in step order). ``total_steps``: the job's planned optimizer steps (None: the last row's)."""
    rows = [r for r in rows if "step" in r and "loss" in r]
    if not rows:
        return {"flags": [], "kl": None, "rows": 0}
    diverged = _diverged(rows)
    flags = [diverged] if diverged else [f for f in (_displacement(rows), _saturated(rows, total_steps)) if f]
    kls = [r["kl/ref"] for r in rows if _finite(r.get("kl/ref"))]
    kl = {"last": round(kls[-1], 6), "max": round(max(kls), 6)} if kls else None
    return {"flags": flags, "kl": kl, "rows": len(rows)}


def flag_names(health: dict | None) -> str:
    """The flags as the sweep tables show them: "likelihood displacement (step 12)", "" when healthy."""
    return ", ".join(f"{f['name']} (step {f['step']})" for f in (health or {}).get("flags", []))


def metrics_rows(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl, a line being written (torn) skipped; [] when there is none yet."""
    return read_jsonl_rows(path)  # the append-only reader every JSONL of a job goes through
