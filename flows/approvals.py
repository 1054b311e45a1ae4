"""The human decisions of a run, asked with `pause_flow_run(wait_for_input=...)`.

The question is shown as Markdown above a typed form in the Prefect UI (or answered with
`preftune approve RUN`). Every decision is a required choice with no default, so a bare Submit
decides nothing. An answer is checked before it is recorded: one that does not fit the question
(an unknown job, an evaluator that does not import) is not written to `approvals.jsonl`; the
question is asked again with the problem above it. A headless run with an auto-approval limit
answers by itself only within its limits. Every accepted decision, asked or automatic, is
appended to `approvals.jsonl` with its time and values, so a resumed run does not ask again.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from prefect import get_run_logger, runtime
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import ConfigDict, Field, ValidationError, WithJsonSchema, create_model, field_validator

from preftune.approvals_log import read_approvals
from preftune.files import append_jsonl
from preftune.flows.cards import say, show_markdown
from preftune.forms import plain_optionals
from preftune.workspace import Workspace

T = TypeVar("T", bound=RunInput)


def choice(options: type[StrEnum]) -> Any:
    """The question's one decision, its options inline in the form's JSON schema: the Prefect UI's
    resume form (3.8.8) does not follow a `$ref` to an enum and shows an empty dropdown that cannot be
    answered. Titled, since the replaced schema loses pydantic's title and the V2 UI then labels the
    field by its type ("str")."""
    return Annotated[options, WithJsonSchema({"title": "Decision", "type": "string",
                                              "enum": [o.value for o in options]})]


class PlanChoice(StrEnum):
    approve = "approve"
    reject = "reject"


class PlanDecision(RunInput):
    model_config = ConfigDict(json_schema_extra=plain_optionals)  # the budget: a plain number box

    decision: choice(PlanChoice) = Field(description="Approve the plan and its cost, or reject it (nothing is spent).")
    budget_usd: float | None = Field(None, ge=0, description="Optional budget cap in USD for this run.")
    drop_models: list[str] = Field(default_factory=list, description="Base models (name or path) to drop.")
    drop_betas: list[float] = Field(default_factory=list, description="Beta values to drop from the grid.")
    note: str = Field("", description="Optional note kept in the approvals log.")

    @property
    def approve(self) -> bool:
        return self.decision is PlanChoice.approve


class CatalogueDecision(StrEnum):
    sweep_catalogue = "sweep the catalogue"
    use_base_models = "use the base models I list"
    stop = "stop"


class CatalogueChoice(RunInput):
    decision: choice(CatalogueDecision) = Field(description="No base model was given: sweep the catalogue shown above, "
                                        "use the base models listed below, or stop the run.")
    base_models: list[str] = Field(default_factory=list, description="Base model folders, with "
                                   "'use the base models I list'.")


class EvaluatorKind(StrEnum):
    evaluator = "a Python evaluator"
    judge = "an LLM judge"
    stop = "stop"


class EvaluatorChoice(RunInput):
    decision: choice(EvaluatorKind) = Field(description="How to score the candidates: a Python evaluator (fill "
                                            "'evaluator'), an LLM judge (fill the judge fields), or stop the run.")
    evaluator: str = Field("", description="With 'a Python evaluator': its id `package.module:function` "
                                  "or `file.py:function`; it must import.")
    judge_model: str = Field("", description="With 'an LLM judge': the model name the endpoint serves, "
                                    "or a local model folder (served by preftune).")
    judge_base_url: str = Field("", description="The judge's OpenAI-compatible base URL, e.g. "
                                       "https://api.openai.com/v1. Empty only for a local model folder.")
    judge_api_key_env: str = Field("", description="NAME of the environment variable holding the "
                                          "judge's key (never the key itself).")
    judge_api_key_block: str = Field("", description="Or the name of a Prefect Secret block holding it.")
    rubric: str = Field("", description="Rubric text for the judge (empty: the judge writes one from "
                               "the data).")


    @field_validator("evaluator", "judge_model", "judge_base_url", "judge_api_key_env", "judge_api_key_block",
                     "rubric", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return "" if value is None else value  # answers recorded before these fields were plain text


def comparison_form(jobs: list[str], recommended: str | None) -> type[RunInput]:
    """The deploy choice as a closed list: exactly the finished jobs, 'recommended', 'base', 'none'."""
    what = f"'recommended' is {recommended}" if recommended else "'recommended' deploys nothing: no candidate beat its base"
    choices = tuple(dict.fromkeys([*jobs, "recommended", "base", "none"]))
    return create_model("ComparisonChoice", __base__=RunInput, deploy=(
        Literal[choices], Field(description=f"What to deploy: a finished job, 'recommended', the base model, "
                                           f"or 'none' ({what}).")))


class PromotionChoice(StrEnum):
    deploy = "deploy it"
    hold = "do not deploy"


class PromotionDecision(RunInput):
    decision: choice(PromotionChoice) = Field(description="Deploy the clear winner now, or hold it back.")

    @property
    def promote(self) -> bool:
        return self.decision is PromotionChoice.deploy


class YieldChoice(StrEnum):
    proceed = "continue"
    stop = "stop"


class YieldDecision(RunInput):
    decision: choice(YieldChoice) = Field(description="Continue with what there is, or stop the run here.")


def _log(ws: Workspace, kind: str, by: str, values: dict[str, Any], context: dict[str, Any]) -> None:
    append_jsonl(ws.approvals, {"time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "kind": kind,
                                "by": by, "flow_run_id": str(runtime.flow_run.id or ""), "values": values,
                                "context": context})


def previous_answer(ws: Workspace, kind: str, context: dict[str, Any]) -> dict[str, Any] | None:
    """The last logged answer to the same question (same kind and context, e.g. the same plan
    digest): a resumed run does not ask twice for what was already decided."""
    found = None
    for entry in read_approvals(ws.approvals):  # checked: a line that is not a decision is refused
        if entry["kind"] == kind and entry["context"] == context:
            found = entry
    return found


def spending_cap(ws: Workspace, decision: PlanDecision, spec_budget: float | None,
                 auto_limit: float | None) -> float | None:
    """The most the run may spend on endpoints (held by the ledger as requests are sent): the approval's
    budget, else the spec's; when the plan was approved automatically, the auto-approval limit too."""
    caps = [decision.budget_usd if decision.budget_usd is not None else spec_budget]
    plan = [a for a in read_approvals(ws.approvals) if a["kind"] == "plan"]
    if plan and plan[-1]["by"] == "auto":
        caps.append(auto_limit)
    given = [c for c in caps if c is not None]
    return min(given) if given else None


def _problem(form: type[T], values: dict[str, Any], check: Callable[[T], str | None] | None) -> tuple[T | None, str | None]:
    try:
        answer = form(**values)
    except ValidationError as err:
        first = err.errors()[0]
        return None, f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    problem = check(answer) if check is not None else None
    return (None, problem) if problem else (answer, None)


def _shown_form(form: type[T], description: str, defaults: dict[str, Any]) -> type[T]:
    """The form with the question above it and `defaults` filled in. Prefect's `with_initial_data`
    rebuilds each defaulted field from its bare type, so the UI lost its description and bounds.

    The question is the dialog's own text, shown above the form (Prefect's V2 UI, the one a browser
    lands on, gives it the room it needs at 1280x900); it is not repeated in a field."""
    fields = {}
    for key, value in defaults.items():
        info = copy.copy(form.model_fields[key])
        info.default, info.default_factory = value, None
        fields[key] = (form.model_fields[key].annotation, info)
    model = create_model(form.__name__, __base__=form, **fields)
    model._description = description
    return model


def reasked(problem: str, question: str) -> str:
    """The question again with why the last answer was not used as its first line: a heading, which
    the Resume dialog shows at the top (a block quote there rendered with no height at 1280x900)."""
    return f"### ⚠ Your last answer was not used\n\n**{problem}** Answer again below.\n\n{question}"


def ask(ws: Workspace, kind: str, markdown: str, form: type[T], *, context: dict[str, Any] | None = None,
        defaults: dict[str, Any] | None = None, auto: dict[str, Any] | None = None,
        check: Callable[[T], str | None] | None = None, timeout_s: int = 86400, poll_s: int = 10,
        summary: str | None = None) -> T:
    """Ask one question until an answer passes `check` (None: fine; else the problem, shown to the
    person at the top of the question, every time). `auto` answers it without pausing (headless, within
    the limits). The question's card (artifact `approval-KIND`) holds `markdown` in full; the Resume
    dialog shows `summary` when given (a short text to decide from, that fits the dialog)."""
    logger = get_run_logger()
    context = context or {}
    earlier = previous_answer(ws, kind, context) if context else None
    if earlier is not None:
        answer, problem = _problem(form, earlier["values"], check)
        if answer is not None:
            logger.info("%s: already answered at %s (%s); not asking again", kind, earlier["time"], earlier["by"])
            return answer
        logger.warning("%s: the recorded answer no longer fits (%s); asking again", kind, problem)
    if auto is not None:
        answer, problem = _problem(form, auto, check)
        if answer is None:
            raise RuntimeError(f"{kind}: the automatic answer {auto} does not fit: {problem}")
        show_markdown(f"approval-{kind}", markdown, description=f"Question: {kind}")
        _log(ws, kind, "auto", answer.model_dump(mode="json"), context)
        logger.info("%s: answered automatically %s", kind, answer.model_dump(mode="json"))
        return answer
    card, dialog = markdown, summary or markdown
    while True:
        show_markdown(f"approval-{kind}", card, description=f"Question: {kind}")
        say(f"waiting for an answer to '{kind}' (Prefect UI, or `preftune approve {ws.root}`)")
        logger.info("Waiting for '%s': answer in the Prefect UI, or run `preftune approve %s` "
                    "[--reject] [--set FIELD=VALUE]", kind, ws.root)
        raw = pause_flow_run(wait_for_input=_shown_form(form, dialog, defaults or {}),
                             timeout=timeout_s, poll_interval=poll_s)
        answer, problem = _problem(form, raw.model_dump(mode="json"), check)
        if answer is not None:
            _log(ws, kind, "user", answer.model_dump(mode="json"), context)
            if card != markdown:  # answered now: the card no longer says the last answer was not used
                show_markdown(f"approval-{kind}", markdown, description=f"Question: {kind}")
            return answer
        logger.warning("%s: answer not used: %s; asking again", kind, problem)
        card, dialog = reasked(problem, markdown), reasked(problem, summary or markdown)
