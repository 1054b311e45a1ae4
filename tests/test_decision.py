"""One decision, told the same way everywhere (issue #23 item 1): workspaces built from files so the
answer is known, each one a contradiction the demo's reports had, rendered by the real report code.

Scores are a Python evaluator's per-prompt scores, so each row's mean, its win rate against its base
and the selection rule's verdict all follow from the numbers written here."""

from __future__ import annotations

import json

from preftune.files import write_json_atomic
from preftune.judges import decision, selection
from preftune.reports.build import comparison_markdown, verdict_line, write_report
from preftune.reports.changes import shown_candidate
from preftune.tasks.evaluate_candidates import select_merged
from preftune.workspace import Workspace
from tests.test_report import _check_layout

N = 27  # held-out prompts rated, as in the demo


def _wiggle(i: int) -> float:
    return (i % 3 - 1) * 0.01  # -0.01, 0, 0.01: mean 0 over the 27 prompts


def _entry(base: str, values: list[float], base_values: list[float]) -> dict:
    outcomes = ["win" if v > b else "loss" if v < b else "tie" for v, b in zip(values, base_values, strict=True)]
    wins, ties = outcomes.count("win"), outcomes.count("tie")
    mean = sum(values) / len(values)
    return {"base_model": base, "n": len(values), "wins": wins, "ties": ties, "losses": outcomes.count("loss"),
            "invalid": 0, "win_rate": (wins + 0.5 * ties) / len(values), "ci_low": 0.0, "ci_high": 1.0,
            "mean_score": mean, "score_ci_low": mean - 0.05, "score_ci_high": mean + 0.05, "errors": 0,
            "per_prompt": {f"p{i}": [v, b] for i, (v, b) in enumerate(zip(values, base_values, strict=True))}}


def _scores(candidates: dict[str, tuple[str, list[float]]], bases: dict[str, list[float]]) -> dict:
    models = {name: _entry(base, values, bases[base]) for name, (base, values) in candidates.items()}
    merged = {"kind": "evaluator", "models": models, "warnings": [],
              "bases": {b: {"n": N, "mean_score": sum(v) / N, "ci_low": 0.0, "ci_high": 1.0} for b, v in bases.items()}}
    return select_merged(merged)


def _workspace(tmp_path, scores: dict, deployed: str | None, answer: str, by: str = "auto",
               **kw) -> tuple[Workspace, str, dict]:
    """A workspace holding a run's scores, approvals, outcome and decision; returns (ws, report, record)."""
    ws = Workspace(tmp_path / "ws").ensure()
    write_json_atomic(ws.scores, scores)
    record = decision.record(scores, deployed, answer=answer, by=by, **kw)
    write_json_atomic(ws.root / decision.FILE, record)
    write_json_atomic(ws.outcome, {"status": "completed", "deployed": deployed, "clear_winner": scores["clear_winner"]})
    ws.approvals.write_text(json.dumps({"time": "2026-12-02T10:00:00+00:00", "kind": "comparison", "by": by,
                                        "flow_run_id": "00000000-0000-0000-0000-000000000000", "values": {"deploy": answer}, "context": {}}) + "\n")
    write_report(ws)
    return ws, ws.report.read_text(encoding="utf-8"), record


def _const(value: float) -> list[float]:
    return [value + _wiggle(i) for i in range(N)]


def _demo_scores(qwen_gain: float) -> dict:
    """The demo's six rows: tiny-llama (0.701) beats both of its candidates; the tiny-qwen candidates
    are `qwen_gain` above their base (0.55) on every prompt, b0.5 by 0.005 more than b0.1."""
    llama, qwen = _const(0.701), _const(0.55)
    return _scores({"tiny-llama-dpo-b0.1": ("tiny-llama", [v - 0.05 for v in llama]),
                    "tiny-llama-dpo-b0.5": ("tiny-llama", [v - 0.08 for v in llama]),
                    "tiny-qwen-dpo-b0.1": ("tiny-qwen", [v + qwen_gain - 0.005 + 0.03 * (i % 2) for i, v in enumerate(qwen)]),
                    "tiny-qwen-dpo-b0.5": ("tiny-qwen", [v + qwen_gain + 0.03 * ((i + 1) % 2) for i, v in enumerate(qwen)])},
                   {"tiny-llama": llama, "tiny-qwen": qwen})


def _summary_line(report: str) -> str:
    """The Summary section's decision line (under its table)."""
    summary = report[report.index("\n## Summary\n"):report.index("\n## ", report.index("\n## Summary\n") + 1)]
    return next(line for line in summary.splitlines() if line.startswith("**Decision:** "))


def test_deployed_without_a_significant_winner_says_so_and_names_the_better_base(tmp_path):
    """Demo: `tiny-qwen-dpo-b0.5` deployed by "recommended" while the summary said "clear winner: none",
    and the base tiny-llama, the best row, went unmentioned."""
    scores = _demo_scores(0.125)
    assert scores["selection"]["verdict"] == selection.NOT_APART
    assert scores["selection"]["recommended"] == "tiny-qwen-dpo-b0.5"
    ws, report, record = _workspace(tmp_path, scores, "tiny-qwen-dpo-b0.5", "recommended")
    assert record["summary"] == (
        "Deployed `tiny-qwen-dpo-b0.5`, the best of candidates that cannot be told apart (no significant winner), "
        "chosen by the headless default (`--yes`: `recommended`) at the comparison question, although the untuned "
        "base `tiny-llama` scores higher (0.701 vs 0.691).")
    # one record, every place: summary, the evaluation section, Approvals, Deployment
    assert record["summary"] in _summary_line(report)
    assert report.count(record["summary"]) == 4
    assert "**Selection:** No significant winner: `tiny-qwen-dpo-b0.5` beats its base but cannot be told apart" in report
    assert "| `tiny-qwen-dpo-b0.5` **deployed** ★ |" in report
    assert "clear winner" not in report.lower()
    _check_layout(report)  # the marks keep every table line within a 1280 px window
    # the UI's comparison question states the same verdict, in the same words
    question = comparison_markdown(scores, selection.recommended(scores))
    assert verdict_line(scores) in question and verdict_line(scores) in report


def test_base_better_than_every_candidate_and_nothing_deployed_after_recommended(tmp_path):
    """Demo: every candidate lost to its base, and "Deployed model: none" with deploy = "recommended" and
    no reason given."""
    scores = _demo_scores(-0.1)
    assert scores["selection"]["verdict"] == selection.NONE_BEATS and scores["selection"]["recommended"] is None
    _, report, record = _workspace(tmp_path, scores, None, "recommended")
    assert record["base_beats_all"] and record["best_row"]["name"] == "tiny-llama"
    summary = record["summary"]
    assert summary.startswith("Nothing was deployed: the headless default (`--yes`: `recommended`) at the comparison "
                              "question deploys only a candidate that beats its base, and no candidate beats its base "
                              "by the paired bootstrap (the best, `tiny-llama-dpo-b0.1`: difference from its base")
    assert summary.endswith("; the untuned base `tiny-llama` scores above every candidate (0.701).")
    assert summary.count(".") == summary.count("0.") + 1  # one sentence (every other full stop is a decimal)
    assert summary in _summary_line(report) and "## Deployment\n\n" + summary in report


def test_the_real_demo_one_candidate_on_four_prompts(tmp_path):
    """--real demo: one candidate, 4 held-out prompts, 3 wins: a win rate of 0.75 whose CI includes 0.5."""
    base = [0.5, 0.5, 0.5, 0.5]
    scores = _scores({"smollm2-dpo-b0.1": ("smollm2", [0.6, 0.7, 0.6, 0.4])}, {"smollm2": base})
    _, report, record = _workspace(tmp_path, scores, None, "recommended", by="user")
    assert record["chosen_by"] == "person"
    assert record["summary"].startswith("Nothing was deployed: the person's answer `recommended` at the comparison "
                                        "question deploys only a candidate that beats its base")
    assert "`smollm2-dpo-b0.1`: difference from its base 0.075, 95% CI [" in record["summary"]


def test_the_best_candidate_shown_is_the_one_with_the_higher_mean(tmp_path):
    """--real demo: "best candidate (not deployed)" was b0.5 though b0.1 had the higher mean score at the
    same win rate; neither beats its base, so nothing is recommended and the ranking decides."""
    base = [0.8, 0.8, 0.8, 0.8]
    scores = _scores({"b0.1": ("m", [0.9, 0.95, 0.7, 0.75]), "b0.5": ("m", [0.85, 0.9, 0.7, 0.75])}, {"m": base})
    assert scores["models"]["b0.1"]["win_rate"] == scores["models"]["b0.5"]["win_rate"] == 0.5
    assert shown_candidate({"deployed": None}, scores, None) == ("b0.1", False)


def test_a_person_deploys_a_candidate_that_lost_to_its_base(tmp_path):
    scores = _demo_scores(0.125)
    _, report, record = _workspace(tmp_path, scores, "tiny-llama-dpo-b0.5", "tiny-llama-dpo-b0.5", by="user")
    assert record["summary"] == (
        "Deployed `tiny-llama-dpo-b0.5`, not the recommended candidate (`tiny-qwen-dpo-b0.5`: the best of candidates "
        "that cannot be told apart (no significant winner)), chosen by the person's answer `tiny-llama-dpo-b0.5` at "
        "the comparison question, although the untuned base `tiny-llama` scores higher (0.701 vs 0.621), and it is "
        "not shown to beat its base.")
    assert "| `tiny-llama-dpo-b0.5` **deployed** |" in report
