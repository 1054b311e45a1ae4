"""Which candidate to recommend, and whether the performance target is met.

The target is always the win rate vs base: the pairwise judge's, or for a Python evaluator the
per-prompt comparison of its scores (tasks/evaluate_candidates.py puts both in `win_rate`).
"""

from __future__ import annotations

TARGET_NAME = "win rate vs base"


def rated(entry: dict) -> int:
    """Held-out prompts that gave a valid comparison for one candidate (invalid verdicts excluded)."""
    return int(entry.get("n") or 0) - int(entry.get("invalid") or 0)


def target_value(scores: dict, job_id: str) -> float | None:
    value = scores["models"].get(job_id, {}).get("win_rate")
    return None if value is None or value != value else float(value)  # NaN: nothing valid to rate


def target_met(target: float | None, scores: dict) -> bool | None:
    """None when no target was set; else whether any candidate reached it."""
    if target is None:
        return None
    values = [target_value(scores, name) for name in scores["models"]]
    return any(v is not None and v >= target for v in values)


def recommended(scores: dict) -> str | None:
    """The clear winner; otherwise the best candidate that beats its base on the point estimate."""
    if scores.get("clear_winner"):
        return scores["clear_winner"]
    rated = [(target_value(scores, n), n) for n in scores["models"]]
    rated = [(v, n) for v, n in rated if v is not None and v > 0.5]
    return max(rated)[1] if rated else None
