"""An instruction resolved to a RunSpec: explicit fields win, every field has a source, nothing is
guessed; the LLM planner against a real local OpenAI-compatible server (tests/stub_server.py)
answering well, malformed, with auto-approval, with a budget above the instruction's; and the UI
path, where the flow itself resolves the form's `instruction` and asks about what it left open."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.endpoint import Endpoint
from preftune.errors import UserError
from preftune.paths import EXAMPLES_DIR
from preftune.spec import RunSpec
from preftune.tasks.instruction.resolve import plan_rows, resolve
from tests.flow_helpers import question_text, start_flow, wait_for_question
from tests.stub_server import Reply, StubServer


@pytest.fixture
def setting(tmp_path) -> dict:
    models = tmp_path / "models"
    for name in ("Qwen3-32B", "Qwen3-30B-A3B"):
        (models / name).mkdir(parents=True)
        (models / name / "config.json").write_text("{}")
    data = tmp_path / "customer-prefs.jsonl"
    data.write_text((EXAMPLES_DIR / "pairs.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    return {"models": [str(models / "Qwen3-32B"), str(models / "Qwen3-30B-A3B")], "dirs": [str(tmp_path)],
            "data": str(data), "root": tmp_path}


def _resolve(setting, text, explicit=None, planner=None) -> RunSpec:
    return resolve(text, explicit or {}, planner=planner, models=setting["models"], dirs=setting["dirs"])


def test_flags_win_and_every_field_has_its_source(setting):
    spec = _resolve(setting, "Run DPO on accounts/myacct/datasets/customer-prefs using Qwen3 32B with beta 0.1 and "
                    "0.3, under $20, no deploy", {"betas": [0.2], "deploy": True, "epochs": 2})
    assert spec.dataset == setting["data"] and spec.base_models == [setting["models"][0]]
    assert spec.betas == [0.2] and spec.deploy is True and spec.epochs == 2 and spec.budget_usd == 20.0
    assert spec.auto_approve_max_usd is None
    plan = spec.instruction_plan
    assert plan["planner"] == "parser" and plan["unresolved"] == {} and plan["notes"] == []
    assert plan["sources"] == {"dataset": "instruction", "base_models": "instruction", "losses": "instruction",
                               "betas": "explicit", "budget_usd": "instruction", "deploy": "explicit",
                               "epochs": "explicit"}
    rows = {r["field"]: r for r in plan_rows(spec)}
    assert (rows["betas"]["value"], rows["betas"]["source"]) == ("0.2", "explicit")
    assert (rows["budget_usd"]["value"], rows["budget_usd"]["source"], rows["budget_usd"]["words"]) == (
        20.0, "instruction", "$20")
    assert (rows["method"]["value"], rows["method"]["source"]) == ("LoRA r=8 alpha=16", "default")
    assert (rows["target_win_rate"]["value"], rows["target_win_rate"]["source"]) == (0.75, "default")
    assert rows["evaluator"]["source"] == "asked" and "the run asks" in rows["evaluator"]["value"]
    assert rows["epochs"]["source"] == "explicit"
    # The resolved spec is what is computed: the same spec from other words resumes the same workspace.
    same = RunSpec(dataset=setting["data"], base_models=[setting["models"][0]], betas=[0.2], epochs=2,
                   budget_usd=20.0)
    assert spec.digest() == same.digest()


def test_what_nothing_resolves_is_left_open_not_guessed(setting):
    spec = _resolve(setting, "Run DPO on accounts/myacct/datasets/customer-prefs using Qwen3 32B and Llama 3.1 8B. "
                    "Use evaluator accounts/myacct/evaluators/my-rubric.")
    plan = spec.instruction_plan
    assert spec.base_models == [] and spec.evaluator is None  # the run asks for both
    assert set(plan["unresolved"]) == {"base_models", "evaluator"}
    assert "'Llama 3.1 8B'" in plan["unresolved"]["base_models"]
    assert "accounts/myacct/evaluators/my-rubric" in plan["unresolved"]["evaluator"]
    rows = {r["field"]: r for r in plan_rows(spec, asked={"base_models": [setting["models"][0]]})}
    assert rows["base_models"]["source"] == "asked" and rows["base_models"]["value"] == setting["models"][0]


def test_an_instruction_value_out_of_bounds_is_one_line_naming_its_words(setting):
    with pytest.raises(UserError, match=r"the instruction \('beta 200'\): betas.0: Input should be less than"):
        _resolve(setting, "train on customer-prefs.jsonl with beta 200")


# -- the LLM planner -------------------------------------------------------------------------------
GOOD = {"dataset": "accounts/myacct/datasets/customer-prefs", "base_models": None, "betas": [0.1, 0.3],
        "losses": [{"loss_type": "ipo", "normalize_by_length": True}], "target_win_rate": 0.8, "budget_usd": 15}
SENTENCE = ("Run IPO, length-normalized, on accounts/myacct/datasets/customer-prefs with Qwen3 32B, betas 0.1 and "
            "0.3; stop at 80% win rate; under $20")


def _planner(srv: StubServer) -> Endpoint:
    return Endpoint(model="planner-model", base_url=srv.base_url)


def test_a_good_planner_answer_is_used_and_checked(setting):
    answer = dict(GOOD, dataset=setting["data"], base_models=[setting["models"][0], "/nowhere/Qwen3-235B"])
    with StubServer(lambda req: Reply(text=json.dumps(answer))) as srv:
        spec = _resolve(setting, SENTENCE, {"epochs": 3}, planner=_planner(srv))
    assert len(srv.requests) == 1
    body = srv.requests[0]
    assert body["model"] == "planner-model" and body["response_format"]["type"] == "json_schema"
    schema = body["response_format"]["json_schema"]["schema"]
    assert "betas" in schema["properties"] and "auto_approve_max_usd" not in schema["properties"]
    prompt = body["messages"][0]["content"]
    assert SENTENCE in prompt and setting["models"][1] in prompt  # the catalogue is in its context
    assert '"examples": 306' in prompt and '"format": "openai"' in prompt  # and the dataset's summary
    assert spec.instruction_plan["planner"] == "llm"
    assert spec.betas == [0.1, 0.3] and spec.losses[0].label == "ipo-lnorm" and spec.target_win_rate == 0.8
    assert spec.budget_usd == 15 and spec.epochs == 3 and spec.instruction_plan["sources"]["epochs"] == "explicit"
    # A model the planner named that nothing here matches is asked about, not trusted.
    assert spec.base_models == [] and "/nowhere/Qwen3-235B" in spec.instruction_plan["unresolved"]["base_models"]


@pytest.mark.parametrize(("reply", "why"), [
    ("I would run IPO with two betas.", "malformed: not a JSON object"),
    (json.dumps({"betas": "lots"}), "malformed: betas"),
    (json.dumps({"bogus_field": 1}), "malformed: unknown field(s) bogus_field"),
    (json.dumps(dict(GOOD, auto_approve_max_usd=100)), "refused: it set auto_approve_max_usd=100"),
    (json.dumps(dict(GOOD, budget_usd=50)), "refused: it set budget_usd=50, above what the instruction said ($20)"),
])
def test_a_bad_planner_answer_falls_back_to_the_parser_and_asks(setting, reply, why):
    with StubServer(lambda req: Reply(text=reply)) as srv:
        spec = _resolve(setting, SENTENCE + ". Use evaluator accounts/myacct/evaluators/my-rubric.",
                        planner=_planner(srv))
    assert len(srv.requests) == 1
    plan = spec.instruction_plan
    assert plan["planner"] == "parser" and len(plan["notes"]) == 1 and why in plan["notes"][0]
    assert spec.auto_approve_max_usd is None and spec.budget_usd == 20.0  # the parser's reading
    assert spec.base_models == [setting["models"][0]] and spec.betas == [0.1, 0.3]
    assert "evaluator" in plan["unresolved"]  # ... and what it leaves open is asked


def test_an_unreachable_planner_falls_back_too(setting):
    with StubServer(lambda req: Reply(status=400, text="no such model")) as srv:
        spec = _resolve(setting, SENTENCE, planner=_planner(srv))
    assert spec.instruction_plan["planner"] == "parser"
    assert "the planner endpoint failed" in spec.instruction_plan["notes"][0] and "HTTP 400" in spec.instruction_plan[
        "notes"][0]


# -- the UI path: the flow resolves the form's instruction -----------------------------------------
@pytest.mark.usefixtures("prefect_api")
def test_the_flow_resolves_a_form_instruction_and_asks_what_it_left_open(setting, monkeypatch):
    monkeypatch.chdir(setting["root"])  # where a dataset named in an instruction is looked for
    ws = setting["root"] / "ws"
    spec = RunSpec(instruction="Run DPO on customer-prefs.jsonl using Llama 3.1 8B with beta 0.3, no deploy",
                   workspace=str(ws), betas=[0.2], approval_poll_s=1, approval_timeout_s=600)
    fut = start_flow(spec)
    run_id, schema = wait_for_question(ws, fut)
    assert "decision" in schema["properties"] and "base_models" in schema["properties"]
    text = question_text(run_id)
    assert "'Llama 3.1 8B', which match no model" in text and "Sweep the configured catalogue?" in text
    record = json.loads((ws / "run.json").read_text())["spec"]
    assert Path(record["dataset"]).name == "customer-prefs.jsonl" and record["betas"] == [0.2]
    assert record["deploy"] is False and record["instruction_plan"]["sources"]["betas"] == "explicit"
    from prefect.flow_runs import resume_flow_run

    resume_flow_run(run_id, run_input={"decision": "stop"})
    outcome = fut.result(timeout=300)
    assert outcome["status"] == "rejected" and outcome["reason"] == "no base model chosen"


def test_the_ui_form_takes_an_instruction_and_a_planner_but_never_the_resolution():
    """The deployment's parameter form (the flow's one RunSpec parameter): `instruction` and
    `planner` are on it, the dataset may come from the instruction, and the record of a resolution
    is set by preftune only."""
    from prefect.utilities.callables import parameter_schema

    from preftune.flows.pipeline import preference_learning

    schema = parameter_schema(preference_learning).model_dump()
    spec_schema = schema["definitions"]["RunSpec"]
    assert {"instruction", "planner", "dataset"} <= set(spec_schema["properties"])
    assert "instruction_plan" not in spec_schema["properties"]
    assert "dataset" not in spec_schema.get("required", [])
    with pytest.raises(ValueError, match="give a dataset \\(or an instruction that names one\\)"):
        RunSpec()


@pytest.mark.usefixtures("prefect_api")
def test_a_form_instruction_that_names_no_dataset_or_a_bad_value_fails_in_one_line(setting, monkeypatch):
    monkeypatch.chdir(setting["root"])
    no_data = start_flow(RunSpec(instruction="Run DPO using Qwen3 32B", workspace=str(setting["root"] / "a")))
    assert no_data.result(timeout=300) == {"status": "failed", "reason": "the instruction names no dataset",
                                           "workspace": None}
    bad = start_flow(RunSpec(instruction="Run DPO on customer-prefs.jsonl with beta 200",
                             workspace=str(setting["root"] / "b")))
    outcome = bad.result(timeout=300)
    assert outcome["status"] == "failed" and outcome["reason"].startswith(
        "the instruction ('beta 200'): betas.0: Input should be less than or equal to 100")
    assert not (setting["root"] / "a").exists() and not (setting["root"] / "b").exists()
