"""Forms a person cannot get wrong: every field of every pause form and of the RunSpec deployment
form has a description, every choice is an inline enum (the Prefect UI's resume form shows an empty
dropdown for an enum behind a `$ref`), defaults keep their descriptions and bounds, and the evaluator
question checks its answer before it is recorded. Schemas are built as Prefect builds them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect._internal.pydantic.v2_schema import create_v2_schema
from prefect.utilities.callables import parameter_schema

from preftune.flows.approvals import (
    CatalogueChoice,
    EvaluatorChoice,
    PlanDecision,
    PromotionDecision,
    YieldDecision,
    _shown_form,
    comparison_form,
)
from preftune.flows.pipeline import preference_learning
from preftune.flows.questions import _evaluator_problem
from preftune.paths import EXAMPLES_DIR
from tests.flow_helpers import answer, question_text, start_flow, wait_for_question
from tests.test_integrity import _approvals, _spec

FORMS = [PlanDecision, CatalogueChoice, EvaluatorChoice, PromotionDecision, YieldDecision,
         comparison_form(["tiny-llama-dpo-b0.1"], "tiny-llama-dpo-b0.1")]


def _saved_schema(form) -> dict:
    """What `pause_flow_run` saves for the UI (prefect.input.run_input.RunInput.save_schema)."""
    defaults = {"budget_usd": 12.5} if form is PlanDecision else {}
    return create_v2_schema(form.__name__, model_base=_shown_form(form, "the question", defaults))


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.__name__)
def test_every_pause_form_field_is_described_and_every_choice_inline(form):
    schema = _saved_schema(form)
    for name, prop in schema["properties"].items():
        assert prop.get("description"), f"{form.__name__}.{name} has no description"
        assert "$ref" not in json.dumps(prop), f"{form.__name__}.{name} hides its options behind a $ref"
    required = [n for n in schema.get("required", []) if "enum" in schema["properties"][n]]
    assert required in (["decision"], ["deploy"]), f"{form.__name__}: its one decision is a required choice"
    choice = schema["properties"][required[0]]
    assert choice["type"] == "string" and len(choice["enum"]) >= 2 and "default" not in choice


def test_a_default_keeps_its_description_and_bounds():
    """Prefect's `with_initial_data` rebuilt a defaulted field from its bare type: the budget lost its
    description and its lower bound in the UI."""
    prop = _saved_schema(PlanDecision)["properties"]["budget_usd"]
    # a plain number box (no `number | None` switch); its empty box keeps the run's budget, named
    assert prop == {"title": "Budget Usd", "type": "number", "minimum": 0,
                    "description": "Optional budget cap in USD for this run. Empty: 12.5."}
    assert PlanDecision.model_fields["budget_usd"].default is None  # None: the spec's budget (spending_cap)


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.__name__)
def test_the_decision_is_titled_and_the_question_is_said_once(form):
    """The V2 UI labels an untitled field by its type ("str"); the question is the dialog's own text,
    not repeated in a field's description (the V2 dialog showed it twice, the second as raw markdown)."""
    schema = _saved_schema(form)
    name = "deploy" if "deploy" in schema["properties"] else "decision"
    assert schema["properties"][name]["title"] == name.title()
    assert not [n for n, p in schema["properties"].items() if "the question" in p.get("description", "")]


def test_the_comparison_offers_exactly_the_finished_jobs_and_the_three_words():
    prop = _saved_schema(comparison_form(["b-job", "a-job"], None))["properties"]["deploy"]
    assert prop["enum"] == ["b-job", "a-job", "recommended", "base", "none"]
    assert "'recommended' deploys nothing" in prop["description"]


def test_every_runspec_form_field_is_described():
    schema = parameter_schema(preference_learning).model_dump()
    described = 0
    for model, definition in schema["definitions"].items():
        for name, prop in definition.get("properties", {}).items():
            assert prop.get("description"), f"{model}.{name} has no description on the RunSpec form"
            described += 1
    assert described > 50  # RunSpec, Endpoint and LossOptions


def test_the_runspec_form_opens_with_the_run_fields_and_ends_with_the_training_options():
    from preftune.job import LoraOptions, TrainingOptions

    order = list(parameter_schema(preference_learning).model_dump()["definitions"]["RunSpec"]["properties"])
    assert order[:3] == ["instruction", "planner", "dataset"]
    inherited = set(TrainingOptions.model_fields) | set(LoraOptions.model_fields)
    assert set(order[-len(inherited):]) == inherited and len(order) > len(inherited)


@pytest.mark.parametrize(("values", "problem"), [
    ({"decision": "a Python evaluator"}, "'a Python evaluator' needs its id in 'evaluator'"),
    ({"decision": "a Python evaluator", "evaluator": "no_such_pkg.mod:fn"},
     "evaluator 'no_such_pkg.mod:fn': module not found (no_such_pkg)"),
    ({"decision": "a Python evaluator", "evaluator": "just-a-name"}, "expected package.module:function"),
    ({"decision": "an LLM judge"}, "'an LLM judge' needs 'judge_model'"),
    ({"decision": "an LLM judge", "judge_model": "gpt-4o-mini"},
     "judge_model 'gpt-4o-mini': no such local model folder; a remote judge needs judge_base_url"),
    ({"decision": "an LLM judge", "judge_model": "gpt-4o-mini", "judge_base_url": "api.openai.com/v1"},
     "judge_base_url 'api.openai.com/v1': expected an http(s):// URL"),
    ({"decision": "an LLM judge", "judge_model": "gpt-4o-mini", "judge_base_url": "https://api.openai.com/v1",
      "judge_api_key_env": "sk-live-123"}, "judge_api_key_env: 'sk-live-123' is not an environment variable NAME"),
])
def test_an_evaluator_answer_that_cannot_work_is_named(values, problem):
    found = _evaluator_problem(EvaluatorChoice(**values))
    assert found is not None and problem in found, found


@pytest.mark.parametrize("values", [
    {"decision": "a Python evaluator", "evaluator": "preftune.judges.builtin:answer_quality"},
    {"decision": "an LLM judge", "judge_model": "gpt-4o-mini", "judge_base_url": "https://api.openai.com/v1/",
     "judge_api_key_env": "OPENAI_API_KEY"},
    {"decision": "stop"},
])
def test_an_evaluator_answer_that_works_passes(values):
    assert _evaluator_problem(EvaluatorChoice(**values)) is None


def test_the_evaluator_question_asks_again_until_the_evaluator_imports(zoo, tmp_path, prefect_api):
    """No evaluator, no judge: the run asks; an evaluator that does not import is not recorded and the
    question comes back with the problem on top; a working one is recorded and the run goes on."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join((EXAMPLES_DIR / "pairs.jsonl").read_text().splitlines()[:40]) + "\n")
    ws = tmp_path / "ws"
    fut = start_flow(_spec(zoo, pairs, ws, evaluator=None))
    # every answer not used comes back with its reason at the top of the dialog's own text
    for values, reason in [
            ({"decision": "a Python evaluator"}, "'a Python evaluator' needs its id in 'evaluator'"),
            ({"decision": "a Python evaluator", "evaluator": "no_such_pkg.mod:fn"},
             "evaluator 'no_such_pkg.mod:fn': module not found (no_such_pkg)")]:
        answer(ws, fut, "judge_model", values)
        run_id, schema = wait_for_question(ws, fut)
        assert "judge_model" in schema["properties"]
        top = f"### ⚠ Your last answer was not used\n\n**{reason}"
        assert question_text(run_id).startswith(top), question_text(run_id)
        assert "Your last answer" not in schema["properties"]["decision"]["description"]
        assert "Property is type" not in json.dumps(schema) and "null" not in json.dumps(schema["properties"])
    assert _approvals(ws) == []
    good = "preftune.judges.builtin:answer_quality"
    answer(ws, fut, "judge_model", {"decision": "a Python evaluator", "evaluator": good})
    answer(ws, fut, "decision", {"decision": "reject", "note": "enough"})  # the plan: nothing is spent
    assert fut.result(timeout=300)["status"] == "rejected"
    assert [(a["kind"], a["values"].get("evaluator")) for a in _approvals(ws)] == [("evaluator", good), ("plan", None)]
    assert Path(ws / "plan.json").exists()


def test_the_runspec_form_has_no_internal_fields_and_optional_text_is_a_plain_text_box():
    """No "Cache Id ... Set by preftune" on the endpoints; an optional text field is a text box, empty
    by default (not a `str | None` switch), and its empty string means "not given"."""
    from preftune.spec import RunSpec

    defs = parameter_schema(preference_learning).model_dump()["definitions"]
    assert "cache_id" not in defs["Endpoint"]["properties"]
    props = defs["RunSpec"]["properties"]
    for name in ("instruction", "test_dataset", "workspace", "evaluator", "rubric", "work_pool"):
        assert {k: props[name].get(k) for k in ("type", "default", "anyOf")} == \
            {"type": "string", "default": None, "anyOf": None}, name
    spec = RunSpec(dataset="d.jsonl", workspace="", evaluator="", rubric="", test_dataset="", work_pool="")
    assert (spec.workspace, spec.evaluator, spec.rubric, spec.test_dataset, spec.work_pool) == (None,) * 5
    assert spec.digest() == RunSpec(dataset="d.jsonl").digest()  # the form's empty boxes: the same run


def test_model_names_resolve_in_the_form_as_in_the_cli(zoo, tmp_path, monkeypatch):
    """`tiny-llama` typed in the form is the zoo's folder, a folder under PREFTUNE_MODEL_DIRS is found by
    its name, and a name nothing knows is one line naming the near matches."""
    from preftune.endpoint import Endpoint
    from preftune.errors import UserError
    from preftune.flows.questions import resolve_model_names
    from preftune.spec import RunSpec

    mine = tmp_path / "models" / "my-model"
    mine.mkdir(parents=True)
    (mine / "config.json").write_text("{}")
    monkeypatch.setenv("PREFTUNE_MODEL_DIRS", str(tmp_path / "models"))
    spec = resolve_model_names(RunSpec(dataset="d.jsonl", base_models=["tiny-llama", "my-model"],
                                       strong=Endpoint(model="tiny-strong"), weak=Endpoint(model=zoo["models"]["tiny-weak"])))
    assert [Path(m).resolve() for m in spec.base_models] == [Path(zoo["models"]["tiny-llama"]).resolve(), mine]
    assert Path(spec.strong.model).resolve() == Path(zoo["models"]["tiny-strong"]).resolve()
    assert spec.weak.model == zoo["models"]["tiny-weak"]
    with pytest.raises(UserError) as err:
        resolve_model_names(RunSpec(dataset="d.jsonl", base_models=["tiny-lama"]))
    assert str(err.value).startswith("base_models: 'tiny-lama' is neither a local folder nor a model preftune knows; "
                                     "did you mean `tiny-llama`")


def test_optional_numbers_are_number_boxes_and_the_training_options_are_one_named_group():
    """#23: `float | None` fields (budget, port, pair budget, target) showed the UI's type switch, and the
    ~20 inherited training fields were not told apart from the run's own. A number box keeps its bounds
    and has no default in the schema (an empty box is not sent: the field's default applies)."""
    from preftune.endpoint import Endpoint
    from preftune.job import LoraOptions, TrainingOptions
    from preftune.spec import RunSpec

    defs = parameter_schema(preference_learning).model_dump()["definitions"]
    props = defs["RunSpec"]["properties"]
    assert {k: props["budget_usd"].get(k) for k in ("type", "minimum", "default", "anyOf")} == \
        {"type": "number", "minimum": 0, "default": None, "anyOf": None}
    assert "default" not in props["budget_usd"] and "default" not in props["deploy_port"]
    assert {k: props["deploy_port"].get(k) for k in ("type", "minimum", "maximum")} == \
        {"type": "integer", "minimum": 1024, "maximum": 65535}
    assert {k: props["target_win_rate"].get(k) for k in ("type", "default", "maximum")} == \
        {"type": "number", "default": None, "maximum": 1.0}
    assert props["target_win_rate"]["description"].endswith("no target, the whole grid. Empty: 0.75.")
    # what Prefect's UI checks a form's values with: a spec pasted from a run.json (its nulls) passes
    from prefect.utilities.schema_tools.validation import validate

    schema = parameter_schema(preference_learning).model_dump()
    pasted = {"spec": {"dataset": "d.jsonl", "workspace": None, "target_win_rate": None, "budget_usd": None,
                       "deploy_port": None, "rubric": None}}
    assert validate(pasted, schema, preprocess=True) == []
    assert not [name for name, p in props.items() if "anyOf" in p and name not in ("planner", "strong", "weak", "judge")]
    for name in set(TrainingOptions.model_fields) | set(LoraOptions.model_fields):
        assert props[name]["title"].startswith("Advanced training · "), name
    assert props["lora_r"]["title"] == "Advanced training · Lora R"
    assert not props["dataset"].get("title", "Dataset").startswith("Advanced")
    ep = defs["Endpoint"]["properties"]
    assert ep["base_url"]["type"] == "string" and ep["price_input_per_m"]["type"] == "number"
    assert Endpoint(model="m", base_url="", api_key_env="") == Endpoint(model="m")
    assert RunSpec(dataset="d.jsonl", target_win_rate=None).target_win_rate is None
    assert RunSpec(dataset="d.jsonl").target_win_rate == 0.75
