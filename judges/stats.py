"""Win-rate statistics: counts, seeded bootstrap CIs, length-controlled win rate, clear winner,
mean evaluator scores, and judge validity (agreement with human labels, position consistency).

Outcomes are strings from the candidate's point of view: ``"win"``, ``"tie"``, ``"loss"``,
``"invalid"``. A valid outcome scores 1, ½, 0; invalid ones are counted and left out of every rate.

Length-controlled win rate (after AlpacaEval 2, Dubois et al. 2024): fit
``P(candidate preferred) = σ(θ₀ + θ₁·tanh(Δ/σ_Δ))`` where Δ = candidate length − baseline length
(characters) and σ_Δ its standard deviation over the comparisons, then read the fit off at Δ = 0:
``LC = σ(θ₀)``. Ties are targets of 0.5 (cross-entropy with fractional targets is still convex).
Departures from AlpacaEval's GLM: (1) no instruction-difficulty term — that needs many models
judged on the same instructions, which a single run does not have; (2) a small L2 penalty on θ₁
only (``LC_SLOPE_RIDGE``) so a perfectly length-separated sample still has a finite fit;
(3) fitted per candidate with Newton's method (IRLS) in numpy rather than a joint GLM in
scikit-learn. With equal lengths (or Δ constant, σ_Δ = 0) the feature is 0 and LC equals the raw
win rate exactly, because the unpenalised intercept-only fit reproduces the mean target.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

OUTCOME_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}
LC_SLOPE_RIDGE = 1.0
DEFAULT_RESAMPLES = 2000
LOW_AGREEMENT = 0.6


def outcome_scores(outcomes: Iterable[str]) -> np.ndarray:
    """Scores (1, ½, 0) of the valid outcomes, in order; invalid ones dropped."""
    return np.array([OUTCOME_SCORE[o] for o in outcomes if o in OUTCOME_SCORE], dtype=float)


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, seed: int = 0,
                 resamples: int = DEFAULT_RESAMPLES, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean; (nan, nan) for no data. Same seed → same interval."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    if resamples < 1000:
        raise ValueError("use at least 1,000 bootstrap resamples")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(axis=1)  # (resamples,)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def win_rate(outcomes: Sequence[str], *, seed: int = 0, resamples: int = DEFAULT_RESAMPLES) -> dict:
    """Counts, (wins + ½ ties) / valid, and its bootstrap 95% CI.

    Example: win, win, tie, loss, invalid → valid 4, rate (2 + 0.5)/4 = 0.625.
    """
    counts = {k: sum(1 for o in outcomes if o == k) for k in ("win", "tie", "loss", "invalid")}
    scores = outcome_scores(outcomes)
    rate = float(scores.mean()) if scores.size else float("nan")
    low, high = bootstrap_ci(scores, seed=seed, resamples=resamples)
    return {"n": len(outcomes), "wins": counts["win"], "ties": counts["tie"], "losses": counts["loss"],
            "invalid": counts["invalid"], "win_rate": rate, "ci_low": low, "ci_high": high}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def fit_logistic(x: np.ndarray, y: np.ndarray, *, ridge: float = LC_SLOPE_RIDGE,
                 iters: int = 100) -> tuple[float, float]:
    """(θ₀, θ₁) minimising Σ BCE(y, σ(θ₀+θ₁x)) + ridge/2·θ₁², by Newton steps (IRLS)."""
    X = np.column_stack([np.ones_like(x), x])  # (n, 2)
    theta = np.zeros(2)
    penalty = np.diag([0.0, ridge])
    for _ in range(iters):
        p = _sigmoid(X @ theta)
        grad = X.T @ (p - y) + penalty @ theta
        w = p * (1.0 - p)
        hess = X.T @ (X * w[:, None]) + penalty + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def lc_win_rate(outcomes: Sequence[str], candidate_lengths: Sequence[float],
                baseline_lengths: Sequence[float]) -> float:
    """Length-controlled win rate (module docstring); nan with no valid outcome."""
    keep = [i for i, o in enumerate(outcomes) if o in OUTCOME_SCORE]
    if not keep:
        return float("nan")
    y = np.array([OUTCOME_SCORE[outcomes[i]] for i in keep])
    delta = np.array([candidate_lengths[i] - baseline_lengths[i] for i in keep], dtype=float)
    if np.all(y == y[0]):
        return float(y[0])  # all wins / all losses: the logit is ±∞, the rate is exact
    sd = delta.std()
    x = np.tanh(delta / sd) if sd > 0 else np.zeros_like(delta)
    theta0, _ = fit_logistic(x, y)
    return float(_sigmoid(np.array(theta0)))


def mean_score(scores: Sequence[float | None], *, seed: int = 0,
               resamples: int = DEFAULT_RESAMPLES) -> dict:
    """Mean of the scored items with a bootstrap 95% CI; None entries are errors, counted apart."""
    ok = np.array([s for s in scores if s is not None], dtype=float)
    low, high = bootstrap_ci(ok, seed=seed, resamples=resamples)
    return {"n": len(scores), "scored": int(ok.size), "errors": len(scores) - int(ok.size),
            "mean_score": float(ok.mean()) if ok.size else float("nan"), "ci_low": low, "ci_high": high}


def judge_validity(preference_ab: Sequence[int | None], preference_ba: Sequence[int | None],
                   preferred_longer: Sequence[float] | None = None, *, seed: int = 0,
                   resamples: int = DEFAULT_RESAMPLES) -> dict:
    """Agreement of the judge with the labels, with a bootstrap CI, beside the "longer answer wins"
    baseline on the same pairs, and the judge's position consistency.

    Each labelled pair is judged twice: order AB puts the labelled-PREFERRED response in position
    A, order BA puts it in B. ``preference_*`` are the judge's preferences for position A
    (+2 … −2, None = invalid verdict). A single judgment *agrees* when it prefers the labelled-
    preferred side (a tie does not agree: a label is never a tie).
    agreement = agreeing judgments / valid judgments, over both orders; its 95% CI resamples pairs
    (a pair's two judgments stay together), each pair weighted by its valid judgments.
    ``preferred_longer`` per pair: 1 when the preferred answer is the longer, ½ for equal lengths,
    0 else; its mean is the baseline (AlpacaEval: "always pick the longer answer", 62.2% vs humans).
    position_consistency = pairs whose two orders name the same winner (or both tie) /
    pairs with both orders valid.
    """
    agree = valid = consistent = both_valid = 0
    per_pair: list[tuple[int, int]] = []  # (agreeing, valid) judgments of each pair
    for ab, ba in zip(preference_ab, preference_ba, strict=True):
        pair_agree = pair_valid = 0
        for pref, sign in ((ab, 1), (ba, -1)):
            if pref is not None:
                pair_valid += 1
                pair_agree += int(sign * pref > 0)
        agree, valid = agree + pair_agree, valid + pair_valid
        per_pair.append((pair_agree, pair_valid))
        if ab is not None and ba is not None:
            both_valid += 1
            consistent += int(np.sign(ab) == -np.sign(ba))
    agreement = agree / valid if valid else float("nan")
    low, high = _ratio_ci([p for p in per_pair if p[1]], seed, resamples)
    baseline = float(np.mean(preferred_longer)) if preferred_longer is not None and len(preferred_longer) else float("nan")
    consistency = consistent / both_valid if both_valid else float("nan")
    return {"pairs": len(preference_ab), "judgments_valid": valid, "agreement": agreement,
            "agreement_ci_low": low, "agreement_ci_high": high, "length_baseline": baseline,
            "above_length_baseline": bool(valid) and np.isfinite(baseline) and low > baseline,
            "position_consistency": consistency, "position_pairs": both_valid,
            "low_agreement": bool(valid) and agreement < LOW_AGREEMENT}


def _ratio_ci(pairs: list[tuple[int, int]], seed: int, resamples: int) -> tuple[float, float]:
    """Percentile bootstrap CI of Σ agreeing / Σ valid, resampling pairs."""
    if not pairs:
        return float("nan"), float("nan")
    num, den = np.array(pairs, dtype=float).T  # (pairs,), (pairs,)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(pairs), size=(resamples, len(pairs)))
    ratios = num[idx].sum(axis=1) / den[idx].sum(axis=1)  # every pair here has ≥ 1 valid judgment
    low, high = np.quantile(ratios, [0.025, 0.975])
    return float(low), float(high)
