"""The four human decisions of a run, asked with `pause_flow_run(wait_for_input=...)`.

The question is shown as Markdown above a typed form in the Prefect UI (or answered with
`preftune approve RUN`). A headless run with an auto-approval limit answers by itself only
when the plan's high estimate is within it. Every decision, asked or automatic, is appended
to `approvals.jsonl` with its time and values.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, TypeVar

from prefect import get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from preftune.files import append_jsonl
from preftune.workspace import Workspace

T = TypeVar("T", bound=RunInput)


class PlanDecision(RunInput):
    approve: bool = Field(False, description="Approve the plan and its cost. Leave unticked to reject.")
    budget_usd: float | None = Field(None, ge=0, description="Optional budget cap in USD for this run.")
    drop_models: list[str] = Field(default_factory=list, description="Base models (name or path) to drop.")
    drop_betas: list[float] = Field(default_factory=list, description="Beta values to drop from the grid.")
    note: str = Field("", description="Optional note kept in the approvals log.")


class CatalogueChoice(RunInput):
    sweep_catalogue: bool = Field(True, description="No base model was given: sweep the catalogue below.")
    base_models: list[str] = Field(default_factory=list, description="Or name the base models to use instead.")


class EvaluatorChoice(RunInput):
    evaluator: str | None = Field(None, description="Python evaluator id `package.module:function`.")
    judge_model: str | None = Field(None, description="Judge model name (with a base URL) or local folder.")
    judge_base_url: str | None = Field(None, description="Judge endpoint base URL.")
    judge_api_key_env: str | None = Field(None, description="NAME of the env var holding the judge's key.")
    judge_api_key_block: str | None = Field(None, description="Or the name of a Prefect Secret block holding it.")
    rubric: str | None = Field(None, description="Rubric text (otherwise the judge writes one).")


class ComparisonChoice(RunInput):
    deploy: str = Field("recommended", description="Job id to deploy, 'recommended', 'base', or 'none'.")


class PromotionDecision(RunInput):
    promote: bool = Field(True, description="Deploy the clear winner now.")


def _log(ws: Workspace, kind: str, by: str, values: dict[str, Any], context: dict[str, Any]) -> None:
    append_jsonl(ws.approvals, {"time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "kind": kind,
                                "by": by, "flow_run_id": str(runtime.flow_run.id or ""), "values": values,
                                "context": context})


def previous_answer(ws: Workspace, kind: str, context: dict[str, Any]) -> dict[str, Any] | None:
    """The last logged answer to the same question (same kind and context, e.g. the same plan
    digest): a resumed run does not ask twice for what was already decided."""
    if not ws.approvals.exists():
        return None
    found = None
    for line in ws.approvals.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry["kind"] == kind and entry.get("context") == context:
            found = entry
    return found


def ask(ws: Workspace, kind: str, markdown: str, form: type[T], *, context: dict[str, Any] | None = None,
        defaults: dict[str, Any] | None = None, auto: dict[str, Any] | None = None,
        timeout_s: int = 86400, poll_s: int = 10) -> T:
    """Ask one question. `auto` answers it without pausing (headless, within the limits)."""
    logger = get_run_logger()
    context = context or {}
    earlier = previous_answer(ws, kind, context) if context else None
    if earlier is not None:
        logger.info("%s: already answered at %s (%s); not asking again", kind, earlier["time"], earlier["by"])
        return form(**earlier["values"])
    create_markdown_artifact(markdown=markdown, key=f"approval-{kind}", description=f"Question: {kind}")
    if auto is not None:
        answer = form(**auto)
        _log(ws, kind, "auto", answer.model_dump(mode="json"), context)
        logger.info("%s: answered automatically %s", kind, answer.model_dump(mode="json"))
        return answer
    logger.info("Waiting for '%s': answer in the Prefect UI, or run `preftune approve %s` "
                "[--reject] [--set FIELD=VALUE]", kind, ws.root)
    answer = pause_flow_run(wait_for_input=form.with_initial_data(description=markdown, **(defaults or {})),
                            timeout=timeout_s, poll_interval=poll_s)
    _log(ws, kind, "user", answer.model_dump(mode="json"), context)
    return answer
