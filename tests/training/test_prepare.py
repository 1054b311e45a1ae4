"""The base model's own view at plan time (tasks/training/prepare.py): its margins, the sample that
shrinks to a time budget, and the reference cache it leaves for the sweep to reuse."""

from __future__ import annotations

import numpy as np
import torch

from preftune.tasks.training import run_training
from preftune.tasks.training.prepare import base_view, margin_summary


def test_margin_summary_by_hand():
    """Margins −3, −1, 1, 2, 5: 3 of 5 positive; median 1; p10 by linear interpolation −3 + 0.4·2 = −2.2;
    2 bins over [−3, 5] split at 1: [−3, 1) holds −3, −1; [1, 5] holds 1, 2, 5."""
    out = margin_summary(torch.tensor([-3.0, -1.0, 1.0, 2.0, 5.0]), bins=2, bar=10)
    assert out["pairs"] == 5 and out["preferred_share"] == 0.6
    assert out["quantiles"]["p50"] == 1.0 and out["quantiles"]["p10"] == -2.2
    assert [(b["low"], b["high"], b["count"], b["bar"]) for b in out["histogram"]] == [(-3.0, 1.0, 2, 7),
                                                                                      (1.0, 5.0, 3, 10)]


def test_the_plan_time_pass_is_the_sweeps_reference_cache(small_cfg, tmp_path):
    """All 16 pairs fit the budget: the margins are the cached reference log-probs' differences, and a
    job with the same settings finds that cache (a hit: no second reference pass)."""
    cfg = small_cfg(out=tmp_path / "job", ref_cache=tmp_path / "rc")
    view = base_view(cfg, sample=256, budget_s=600)
    assert view["note"] == "all 16 training pairs" and view["cached"] == "miss" and view["pairs"] == 16
    (stored,) = list((tmp_path / "rc").glob("*.pt"))
    blob = torch.load(stored, weights_only=True)
    margins = (blob["chosen"] - blob["rejected"]).numpy()
    assert view["preferred_share"] == round(float((margins > 0).mean()), 4)
    assert view["quantiles"]["p50"] == round(float(np.quantile(margins, 0.5)), 3)
    assert run_training(cfg)["ref_cache"] == "hit"
    # a re-run (a resumed plan, or the view of generated pairs measured again) reads that cache back:
    # the same figures, nothing scored but the cache's 3 check pairs, nothing written
    before = stored.stat().st_mtime_ns
    again = base_view(cfg, sample=256, budget_s=0.0)  # no budget: only a cache hit can give all 16
    assert again["note"] == "all 16 training pairs, read from the reference cache" and again["cached"] == "hit"
    assert {k: again[k] for k in ("pairs", "preferred_share", "quantiles", "histogram")} == {
        k: view[k] for k in ("pairs", "preferred_share", "quantiles", "histogram")}
    assert stored.stat().st_mtime_ns == before


def test_the_sample_shrinks_to_the_time_budget_and_stores_nothing(small_cfg, tmp_path):
    cfg = small_cfg(out=tmp_path / "job", ref_cache=tmp_path / "rc")
    view = base_view(cfg, sample=256, budget_s=0.0)
    assert view["pairs"] == 2  # one chunk of 2, then the clock says stop
    assert view["note"] == "a sample of 2 of 16 training pairs, cut to fit 0 s" and "cached" not in view
    assert not list((tmp_path / "rc").glob("*.pt"))
