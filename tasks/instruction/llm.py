"""The LLM planner: an OpenAI-compatible model reads the instruction into RunSpec fields.

One structured-output request (`response_format` = the RunSpec's JSON schema) through the one
client (preftune/client.py), with the models known here, the dataset's summary and the offline
parser's reading in its prompt (templates/planner.j2). Its answer is checked, never trusted: a reply
that is not a JSON object of RunSpec fields is *malformed*; one that touches how the run is
approved (auto-approval, unpriced calls) or sets a budget above the instruction's is *refused*.
Either way the caller falls back to the offline parser and asks about what that leaves open.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from pydantic import ValidationError

from preftune.client import ChatClient, ChatError
from preftune.endpoint import Endpoint
from preftune.errors import UserError
from preftune.spec import RunSpec
from preftune.templating import render

PLANNER_TIMEOUT_S = 120.0
PLANNER_MAX_TOKENS = 2048


def _schema() -> dict:
    from preftune.tasks.instruction.resolve import PLANNER_MAY_NOT_SET

    schema = RunSpec.model_json_schema()
    # The schema tells the model what it may write; the approval fields are refused below all the same.
    schema["properties"] = {k: v for k, v in schema["properties"].items() if k not in PLANNER_MAY_NOT_SET}
    schema.pop("required", None)
    return schema


def _json_object(text: str) -> dict:
    body = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", text.strip())
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    return value


def check_answer(answer: dict, instruction_budget: float | None) -> tuple[dict | None, str | None]:
    """(fields, None) for a usable answer; (None, why) for a malformed or refused one."""
    from preftune.tasks.instruction.resolve import PLANNER_MAY_NOT_SET

    unknown = sorted(set(answer) - set(RunSpec.model_fields))
    if unknown:
        return None, f"malformed: unknown field(s) {', '.join(unknown)}"
    fields = {k: v for k, v in answer.items() if v is not None}  # null: "not said", the default applies
    approval = [k for k in PLANNER_MAY_NOT_SET if fields.get(k) not in (None, False)]
    if any(k in ("auto_approve_max_usd", "allow_unpriced") for k in approval):
        return None, (f"refused: it set {', '.join(f'{k}={fields[k]!r}' for k in approval)}; a planner never "
                      "sets auto-approval")
    if approval:
        return None, f"refused: it set {', '.join(approval)}, which only a person sets"
    budget = fields.get("budget_usd")
    if budget is not None and (instruction_budget is None or float(budget) > instruction_budget):
        said = f"${instruction_budget:g}" if instruction_budget is not None else "no budget"
        return None, f"refused: it set budget_usd={budget}, above what the instruction said ({said})"
    try:
        RunSpec(**{"instruction": "-", **fields})
    except ValidationError as err:
        first = err.errors()[0]
        return None, f"malformed: {'.'.join(map(str, first['loc']))}: {first['msg']}"
    return fields, None


def llm_reading(endpoint: Endpoint, instruction: str, *, reading, models: list[str],
                summary: dict | None) -> tuple[dict | None, str | None]:
    """Ask the planner model; (fields, None) or (None, the problem)."""
    boundary = secrets.token_hex(8)
    prompt = render("planner.j2", instruction=instruction, models=models, summary=summary, boundary=boundary,
                    reading={k: v.public() if isinstance(v, Endpoint) else v for k, v in reading.fields.items()})
    schema = {"type": "json_schema", "json_schema": {"name": "run_spec", "schema": _schema()}}
    client = ChatClient(endpoint, concurrency=1, max_retries=2, timeout=PLANNER_TIMEOUT_S)
    try:
        result = client.chat_sync([{"role": "user", "content": prompt}], max_tokens=PLANNER_MAX_TOKENS,
                                  response_format=schema)
    except (ChatError, UserError) as err:
        return None, f"the planner endpoint failed: {err}"
    try:
        answer: dict[str, Any] = _json_object(result.text)
    except ValueError as err:
        return None, f"malformed: not a JSON object ({err})"
    return check_answer(answer, reading.fields.get("budget_usd"))
