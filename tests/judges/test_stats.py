"""Statistics against hand-worked values (derivations in each docstring)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from preftune.judges import stats


def test_win_rate_counts_and_rate() -> None:
    """win, win, tie, loss, invalid: valid = 4, rate = (2 + ½·1) / 4 = 0.625; invalid counted apart."""
    r = stats.win_rate(["win", "win", "tie", "loss", "invalid"], seed=1)
    assert (r["n"], r["wins"], r["ties"], r["losses"], r["invalid"]) == (5, 2, 1, 1, 1)
    assert r["win_rate"] == 0.625
    assert r["ci_low"] <= 0.625 <= r["ci_high"]
    assert 0.0 <= r["ci_low"] < r["ci_high"] <= 1.0


def test_all_invalid_has_no_rate() -> None:
    r = stats.win_rate(["invalid", "invalid"])
    assert r["invalid"] == 2 and math.isnan(r["win_rate"]) and math.isnan(r["ci_low"])


def test_bootstrap_is_seeded_and_contains_the_estimate() -> None:
    rng = np.random.default_rng(7)
    x = rng.integers(0, 3, size=60) / 2.0  # scores in {0, ½, 1}
    a = stats.bootstrap_ci(x, seed=3, resamples=1000)
    b = stats.bootstrap_ci(x, seed=3, resamples=1000)
    c = stats.bootstrap_ci(x, seed=4, resamples=1000)
    assert a == b and a != c
    assert a[0] < x.mean() < a[1]
    # the 95% interval of a mean of 60 items: about ±1.96·sd/√60
    half = 1.96 * x.std() / math.sqrt(60)
    assert abs((a[1] - a[0]) / 2 - half) < 0.25 * half


def test_bootstrap_degenerate_and_minimum_resamples() -> None:
    """Every value 1 → every resample mean is 1 → CI (1, 1)."""
    assert stats.bootstrap_ci([1.0] * 10, seed=0) == (1.0, 1.0)
    with pytest.raises(ValueError):
        stats.bootstrap_ci([1.0, 0.0], resamples=999)


def test_logistic_fit_matches_closed_form() -> None:
    """Two groups at x = −1 and x = +1 with mean targets p₋ = ½ and p₊ = ¾: the unpenalised MLE
    satisfies σ(θ₀ − θ₁) = ½ and σ(θ₀ + θ₁) = ¾, so θ₀ = (logit ½ + logit ¾)/2 = ln3/2 and θ₁ = ln3/2."""
    x = np.array([-1.0] * 4 + [1.0] * 4)
    y = np.array([1, 1, 0, 0, 1, 1, 1, 0], dtype=float)
    t0, t1 = stats.fit_logistic(x, y, ridge=0.0)
    assert t0 == pytest.approx(math.log(3) / 2, abs=1e-9)
    assert t1 == pytest.approx(math.log(3) / 2, abs=1e-9)


def test_fractional_targets_reproduce_the_mean() -> None:
    """Intercept-only fit with targets 1, ½, 0, 1: σ(θ₀) = mean = 0.625 exactly (ties as ½)."""
    t0, _ = stats.fit_logistic(np.zeros(4), np.array([1, 0.5, 0, 1.0]), ridge=0.0)
    assert 1 / (1 + math.exp(-t0)) == pytest.approx(0.625, abs=1e-12)


def test_lc_equals_raw_when_lengths_are_equal() -> None:
    outcomes = ["win", "win", "tie", "loss", "invalid", "win"]
    lengths = [100] * 6
    raw = stats.win_rate(outcomes)["win_rate"]
    assert raw == 0.7
    assert stats.lc_win_rate(outcomes, lengths, lengths) == pytest.approx(raw, abs=1e-12)
    # a constant length difference cannot be told apart from the model effect: LC = raw too
    assert stats.lc_win_rate(outcomes, [150] * 6, lengths) == pytest.approx(raw, abs=1e-12)
    assert stats.lc_win_rate(["win"] * 3, [10, 200, 30], [5, 5, 5]) == 1.0


def test_lc_discounts_a_length_biased_judge() -> None:
    """A judge that prefers the longer answer: the candidate is longer in 7 of 10 comparisons and
    wins 6 of those, and wins only 1 of the 3 where it is shorter. Raw = 7/10. At equal length the
    fit sits between the two groups (unpenalised: σ((logit 6/7 + logit 1/3)/2) = σ(0.549) = 0.634),
    so LC must fall below the raw 0.7; the mirror image (candidate mostly shorter) must rise above."""
    outcomes = ["win"] * 6 + ["loss"] + ["win"] + ["loss"] * 2
    cand = [300] * 7 + [100] * 3
    base = [200] * 10
    raw = stats.win_rate(outcomes)["win_rate"]
    lc = stats.lc_win_rate(outcomes, cand, base)
    assert raw == 0.7
    assert 0.6 < lc < 0.68
    mirrored = ["loss" if o == "win" else "win" for o in outcomes]  # raw 0.3, shorter candidate
    lc_m = stats.lc_win_rate(mirrored, cand, base)
    assert lc_m == pytest.approx(1 - lc, abs=1e-9)
    assert lc_m > 0.3


def test_mean_score_counts_errors_apart() -> None:
    """[1, 0, error, ½]: 3 scored, mean ½, 1 error."""
    r = stats.mean_score([1.0, 0.0, None, 0.5], seed=0)
    assert (r["n"], r["scored"], r["errors"], r["mean_score"]) == (4, 3, 1, 0.5)
    assert r["ci_low"] <= 0.5 <= r["ci_high"]


def test_judge_validity_hand_counts() -> None:
    """Pair 1: AB +1 (prefers A = labelled-preferred: agrees), BA −1 (prefers B = preferred: agrees),
    consistent. Pair 2: AB +2 agrees, BA +1 prefers the NON-preferred: disagrees; inconsistent.
    Pair 3: AB 0 (tie: does not agree), BA invalid. Valid judgments 5, agreeing 3 → 0.6;
    both-valid pairs 2, consistent 1 → 0.5."""
    r = stats.judge_validity([1, 2, 0], [-1, 1, None])
    assert r["judgments_valid"] == 5
    assert r["agreement"] == pytest.approx(0.6)
    assert r["position_consistency"] == pytest.approx(0.5)
    assert r["low_agreement"] is False
    low = stats.judge_validity([1, -1, -1], [1, 1, 1])  # agrees 1 of 6
    assert low["agreement"] == pytest.approx(1 / 6) and low["low_agreement"] is True
