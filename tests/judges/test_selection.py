"""The one selection rule (judges/selection.py), and both places that use it giving one verdict."""

from __future__ import annotations

import json

import pytest

from preftune.judges import selection
from preftune.tasks.evaluate import BASE, EvalConfig, score_with_evaluator
from preftune.tasks.evaluate_candidates import _empty, _merge, select_merged

N = 40


def _cand(values: list[float], base: list[float]) -> dict:
    return {"per_prompt": {f"p{i}": [v, b] for i, (v, b) in enumerate(zip(values, base, strict=True))}}


def _judge(wins: int, ties: int = 0, n: int = N) -> dict:
    """A judged candidate: `wins` wins, `ties` ties, the rest losses (the base's value is ½)."""
    values = [1.0] * wins + [0.5] * ties + [0.0] * (n - wins - ties)
    return _cand(values, [0.5] * n)


def test_identical_answers_give_no_significant_winner() -> None:
    """Two candidates whose every per-prompt outcome is the same (identical answers): both beat their
    base (36 of 40 wins), but the paired difference between them is 0 on every prompt, CI [0, 0]."""
    out = selection.select({"b0.1": _judge(36), "b0.5": _judge(36)}, seed=3)
    assert out["verdict"] == selection.NOT_APART and out["winner"] is None
    assert out["recommended"] == "b0.1"  # the name breaks the tie, deterministically
    assert out["top_two"]["ci_low"] == out["top_two"]["ci_high"] == 0.0
    assert out["vs_base"]["b0.5"]["above"] and out["vs_base"]["b0.5"]["diff"] == pytest.approx(0.4)


def test_a_real_difference_is_a_significant_winner_and_seeded() -> None:
    scores = {"strong": _judge(38), "weak": _judge(15, ties=10)}
    out = selection.select(scores, seed=0)
    assert out["verdict"] == selection.SIGNIFICANT and out["winner"] == out["recommended"] == "strong"
    assert out["ranking"] == ["strong", "weak"]
    assert not out["vs_base"]["weak"]["above"]  # 20 of 40: win rate 0.5, CI around it
    assert out["top_two"]["ci_low"] > 0
    assert selection.select(scores, seed=0) == out  # same seed, same verdict and intervals


def test_none_beats_base_recommends_nothing() -> None:
    out = selection.select({"a": _judge(18), "b": _judge(22)})
    assert out["verdict"] == selection.NONE_BEATS and out["recommended"] is None and out["winner"] is None
    assert out["ranking"] == ["b", "a"]


def test_the_best_point_estimate_that_does_not_beat_its_base_is_not_recommended() -> None:
    """Evaluator scores: `x` has the highest mean but its base scores as high; `y` beats its own base."""
    base_hi, base_lo = [0.9] * N, [0.3] * N
    out = selection.select({"x": _cand([0.9] * N, base_hi), "y": _cand([0.6] * N, base_lo)})
    assert out["ranking"] == ["x", "y"] and out["recommended"] == "y"
    assert out["verdict"] == selection.NOT_APART  # y cannot be told better than the runner-up x


def test_evaluate_and_the_flow_agree_on_the_same_judgments(tmp_path, monkeypatch) -> None:
    """The base's scores swing from 0 to 1 across prompts; the candidate scores 0.05 above it on every
    prompt. Before the one rule, `preftune evaluate` compared the mean scores' CIs (overlapping: no
    clear winner) while the flow compared the per-prompt win rate (40 of 40: clear winner `cand`)."""
    monkeypatch.setenv("PREFTUNE_EVALUATOR_DIRS", str(tmp_path))  # the owner's folder of evaluators
    evaluator = tmp_path / "lookup.py"
    evaluator.write_text("def score(messages, completion):\n    return float(completion)\n")
    prompts = [(f"h{i}", [{"role": "user", "content": f"q{i}"}]) for i in range(N)]
    base = [round(i / N * 0.9, 4) for i in range(N)]
    completions = {BASE: [str(b) for b in base], "cand": [str(round(b + 0.05, 4)) for b in base]}
    cfg = EvalConfig(test_data=tmp_path / "t.jsonl", base_model="b", out_dir=tmp_path / "eval",
                     evaluator=f"{evaluator}:score", bootstrap_resamples=1000)
    (tmp_path / "eval").mkdir()
    alone = score_with_evaluator(cfg, prompts, [], completions, [])
    merged = _empty("evaluator")
    _merge(merged, "/models/tiny-llama", {"mode": "evaluator", **alone})
    flow = select_merged(merged)
    assert alone["models"][BASE]["ci_high"] > alone["models"]["cand"]["ci_low"]  # the means' CIs overlap
    assert alone["clear_winner"] == flow["clear_winner"] == "cand"
    assert alone["selection"]["verdict"] == flow["selection"]["verdict"] == selection.SIGNIFICANT
    json.dumps(flow, allow_nan=False)  # strict JSON, as scores.json is written
