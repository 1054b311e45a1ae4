"""Which candidate to recommend, and whether the performance target is met: the one selection rule,
used by the flow (tasks/evaluate_candidates.py) and `preftune evaluate` (tasks/evaluate.py) alike.

The rule is a paired bootstrap over held-out prompts (seeded, so the same scores give the same
verdict). Each candidate carries ``per_prompt``: prompt hash → [its value, its base's value], where
the value is the pairwise judge's outcome against the base (1, ½, 0; the base's own value is ½) or
a Python evaluator's score of each answer. Then:

1. a candidate *beats its base* when the 95% CI of the mean of (value − base value) over its prompts
   is above 0 (for a judge: the win rate's CI is above 0.5);
2. the candidates are ranked by their mean value (win rate vs base, or mean evaluator score);
3. among those that beat their base the best is *recommended*; it is the *significant winner* when
   the 95% CI of the mean of (its value − the runner-up's value), over the prompts both were rated on,
   is above 0 (or when it is the only candidate). Otherwise the verdict says the best cannot be told
   apart from the runner-up: "no significant winner".

Verdicts: ``significant winner`` / ``best of not significantly different`` / ``none beats base``.
The target is always the win rate vs base (TARGET_NAME).
"""

from __future__ import annotations

import math

import numpy as np

from preftune.judges.stats import DEFAULT_RESAMPLES, bootstrap_ci

TARGET_NAME = "win rate vs base"
SIGNIFICANT = "significant winner"
NOT_APART = "best of not significantly different"
NONE_BEATS = "none beats base"
RULE = ("paired bootstrap over held-out prompts (95% CI): a candidate beats its base when the CI of its "
        "per-prompt difference from the base is above 0; the best is a significant winner when the CI of its "
        "difference from the runner-up is above 0 too")


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


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _paired(diffs: list[float], seed: int, resamples: int) -> dict:
    low, high = bootstrap_ci(diffs, seed=seed, resamples=resamples)
    return {"n": len(diffs), "diff": _mean(diffs), "ci_low": low, "ci_high": high,
            "above": bool(diffs) and math.isfinite(low) and low > 0}


def select(models: dict[str, dict], *, seed: int = 0, resamples: int = DEFAULT_RESAMPLES) -> dict:
    """The verdict of the rule (module docstring) on candidates that carry ``per_prompt``.

    Returns {"verdict", "winner" (significant winner or None), "recommended" (or None), "ranking"
    (names, best first), "value" (name → mean value), "vs_base" (name → paired bootstrap of value −
    base value: n, diff, ci_low, ci_high, above), "top_two" (the best against the runner-up, or None),
    "rule", "seed"}."""
    per = {name: {k: v for k, v in (m.get("per_prompt") or {}).items()} for name, m in models.items()}
    value = {name: _mean([v[0] for v in rows.values()]) for name, rows in per.items()}
    vs_base = {name: _paired([v[0] - v[1] for v in rows.values()], seed, resamples) for name, rows in per.items()}
    # Best first; NaN (nothing rated) last; the name breaks ties, so the order is deterministic.
    ranking = sorted(per, key=lambda n: (-value[n] if math.isfinite(value[n]) else math.inf, n))
    beaters = [n for n in ranking if vs_base[n]["above"]]
    best = beaters[0] if beaters else None
    top_two = None
    if best is not None:
        runner = next((n for n in ranking if n != best), None)
        if runner is not None:
            shared = sorted(set(per[best]) & set(per[runner]))
            top_two = {"first": best, "second": runner,
                       **_paired([per[best][k][0] - per[runner][k][0] for k in shared], seed, resamples)}
    if best is None:
        verdict = NONE_BEATS
    elif top_two is None or top_two["above"]:
        verdict = SIGNIFICANT
    else:
        verdict = NOT_APART
    return {"verdict": verdict, "winner": best if verdict == SIGNIFICANT else None, "recommended": best,
            "ranking": ranking, "value": value, "vs_base": vs_base, "top_two": top_two, "rule": RULE,
            "seed": seed, "resamples": resamples}


def recommended(scores: dict) -> str | None:
    """The candidate the rule recommends (it beats its base), or None."""
    return (scores.get("selection") or {}).get("recommended")


def beats_base(scores: dict, name: str | None) -> bool:
    """Whether the rule found `name` better than its base (False for the base, nothing, or unknown)."""
    return bool(((scores.get("selection") or {}).get("vs_base") or {}).get(name, {}).get("above"))
