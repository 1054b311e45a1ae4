"""The deployment choice after the comparison question: the promotion gate is asked exactly when the
recommended job is the clear winner. Deterministic (scripted scores and answers, no Prefect run),
unlike the end-to-end flow test, whose tiny models may or may not produce a clear winner."""

from __future__ import annotations

import json

import pytest

from preftune.flows import questions
from preftune.judges import selection
from preftune.spec import RunSpec
from preftune.workspace import Workspace


def _model(values: list[float]) -> dict:
    rate = sum(values) / len(values)
    return {"base_model": "base", "win_rate": rate, "ci_low": 0.0, "ci_high": 1.0, "mean_score": rate,
            "wins": values.count(1.0), "ties": values.count(0.5), "losses": values.count(0.0), "invalid": 0,
            "per_prompt": {f"p{i}": [v, 0.5] for i, v in enumerate(values)}}


def _scores(clear: bool) -> dict:
    """Judged on 30 prompts: j-a wins 27; j-b wins 6 (clear) or, like j-a, 26 (not told apart from j-a)."""
    from preftune.tasks.evaluate_candidates import select_merged

    b_wins = 6 if clear else 26
    scores = {"kind": "rubric", "warnings": [], "models": {"j-a": _model([1.0] * 27 + [0.0] * 3),
                                                             "j-b": _model([1.0] * b_wins + [0.0] * (30 - b_wins))}}
    scores = select_merged(scores)
    assert (scores["clear_winner"] == "j-a") is clear and selection.recommended(scores) == "j-a"
    return scores


def _choose(tmp_path, monkeypatch, scores: dict, answers: dict, **spec_kw) -> tuple[str | None, list[tuple]]:
    """Run the choice with `ask` scripted: each question kind gets answers[kind]; return (chosen, asked)."""
    asked: list[tuple] = []

    def ask(ws, kind, markdown, form, *, context=None, defaults=None, auto=None, check=None, timeout_s=0, poll_s=0):
        asked.append((kind, context, auto))
        return form(**(auto if auto is not None else answers[kind]))

    monkeypatch.setattr(questions, "ask", ask)
    data = tmp_path / "pairs.jsonl"
    data.write_text("")
    spec = RunSpec(dataset=str(data), workspace=str(tmp_path / "ws"), base_models=["base"], **spec_kw)
    results = {j: {"job": {"id": j}} for j in scores["models"]}
    chosen = questions.choose_deployment(spec, Workspace(tmp_path / "ws"), scores, results)
    return chosen, asked


def test_clear_winner_recommended_asks_the_gate_and_deploys_on_yes(tmp_path, monkeypatch):
    chosen, asked = _choose(tmp_path, monkeypatch, _scores(True),
                            {"comparison": {"deploy": "recommended"}, "promotion": {"decision": "deploy it"}})
    assert chosen == "j-a"
    assert [a[0] for a in asked] == ["comparison", "promotion"]
    assert asked[1][1]["winner"] == "j-a" and asked[1][2] is None  # asked a person, not answered by itself


def test_clear_winner_gate_answered_no_deploys_nothing(tmp_path, monkeypatch):
    chosen, asked = _choose(tmp_path, monkeypatch, _scores(True),
                            {"comparison": {"deploy": "recommended"}, "promotion": {"decision": "do not deploy"}})
    assert chosen is None
    assert [a[0] for a in asked] == ["comparison", "promotion"]


def test_no_clear_winner_recommended_deploys_the_best_without_the_gate(tmp_path, monkeypatch):
    chosen, asked = _choose(tmp_path, monkeypatch, _scores(False), {"comparison": {"deploy": "recommended"}})
    assert chosen == "j-a"
    assert [a[0] for a in asked] == ["comparison"]


@pytest.mark.parametrize("pick, expected", [("j-b", "j-b"), ("base", "base"), ("none", None)])
def test_an_explicit_choice_skips_the_gate(tmp_path, monkeypatch, pick, expected):
    chosen, asked = _choose(tmp_path, monkeypatch, _scores(True), {"comparison": {"deploy": pick}})
    assert chosen == expected
    assert [a[0] for a in asked] == ["comparison"]


def test_headless_run_passes_the_gate_automatically(tmp_path, monkeypatch):
    chosen, asked = _choose(tmp_path, monkeypatch, _scores(True), {}, auto_approve_max_usd=0.0)
    assert chosen == "j-a"
    assert [(kind, auto) for kind, _, auto in asked] == [("comparison", {"deploy": "recommended"}),
                                                         ("promotion", {"decision": "deploy it"})]
    record = json.loads((tmp_path / "ws" / "decision.json").read_text())
    assert record["deployed"] == "j-a" and record["verdict"] == "significant winner" and record["gate"] == "deploy it"


def test_the_decision_record_names_what_was_held_back(tmp_path, monkeypatch):
    chosen, _ = _choose(tmp_path, monkeypatch, _scores(True),
                        {"comparison": {"deploy": "recommended"}, "promotion": {"decision": "do not deploy"}})
    record = json.loads((tmp_path / "ws" / "decision.json").read_text())
    assert chosen is None and record["deployed"] is None
    assert record["summary"] == ("Nothing was deployed: `j-a` was held back by the person's answer "
                                 "`do not deploy` at the promotion gate.")


def test_deploy_off_asks_no_gate_and_deploys_nothing(tmp_path, monkeypatch):
    chosen, asked = _choose(tmp_path, monkeypatch, _scores(True), {"comparison": {"deploy": "recommended"}},
                            deploy=False)
    assert chosen is None
    assert [a[0] for a in asked] == ["comparison"]


def test_comparison_form_offers_exactly_the_finished_jobs():
    """The deploy answer is a closed list: an unknown job id cannot be submitted at all."""
    from pydantic import ValidationError

    from preftune.flows.approvals import comparison_form

    form = comparison_form(["j-a", "j-b"], "j-a")
    assert form.model_json_schema()["properties"]["deploy"]["enum"] == ["j-a", "j-b", "recommended", "base", "none"]
    assert "'recommended' is j-a" in form.model_json_schema()["properties"]["deploy"]["description"]
    assert "deploy" in form.model_json_schema()["required"]  # no default: a bare Submit decides nothing
    with pytest.raises(ValidationError, match="no-such-job"):
        form(deploy="no-such-job")
