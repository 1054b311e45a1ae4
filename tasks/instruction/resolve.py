"""Instruction + explicit fields → a RunSpec, with each field's source.

Precedence: explicit fields (flags, the form) > what the instruction says (read by the LLM planner
when one is configured and its answer is usable, else by the offline parser) > RunSpec defaults.
What the instruction names but nothing resolves is left out of the spec and listed as
`unresolved`: the run asks about it (flows/questions.py) or the CLI refuses it. Nothing is guessed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from preftune.endpoint import Endpoint
from preftune.errors import UserError
from preftune.spec import RunSpec
from preftune.tasks.instruction.models import local_models, model_dirs
from preftune.tasks.instruction.parse import parse_instruction

EXPLICIT, INSTRUCTION, ASKED, DEFAULT = "explicit", "instruction", "asked", "default"
# Shown in the plan whatever their source: what a person approving a run wants to see first.
HEADLINE = ("dataset", "test_dataset", "base_models", "betas", "losses", "full", "lora_r", "strong", "weak", "judge",
            "evaluator", "rubric", "target_win_rate", "budget_usd", "deploy")
# Never taken from a planner: how a run is approved and where it writes.
PLANNER_MAY_NOT_SET = ("auto_approve_max_usd", "allow_unpriced", "approval_timeout_s", "approval_poll_s",
                       "workspace", "instruction", "planner", "instruction_plan", "work_pool")


def dataset_dirs() -> list[str]:
    """Where a dataset named in an instruction is looked for: the current directory, then
    `PREFTUNE_DATASET_DIRS` (os.pathsep-separated)."""
    return [".", *(d for d in os.environ.get("PREFTUNE_DATASET_DIRS", "").split(os.pathsep) if d)]


def known_models() -> list[str]:
    """The catalogue, the model folders under `PREFTUNE_MODEL_DIRS`, and the offline zoo's models
    when it is built (its strong and weak generators are not in the catalogue)."""
    from preftune.catalogue import catalogue
    from preftune.paths import default_zoo_dir

    return list(dict.fromkeys([*catalogue(), *local_models(model_dirs()), *local_models([default_zoo_dir()])]))


def dataset_summary(path: str) -> dict | None:
    """What the LLM planner is told about the dataset: its format and size (no record content)."""
    from preftune.records import RecordReader

    if not path or not Path(path).is_file():
        return None
    reader = RecordReader(path, min_examples=0)
    try:
        for _ in reader:
            pass
    except UserError as err:
        return {"path": path, "problem": str(err)[:300]}
    return {"path": path, "format": reader.format, "examples": reader.count,
            "kind": "preference pairs" if reader.format != "prompts" else "prompts only (pairs must be generated)"}


def _default(name: str) -> Any:
    value = RunSpec.model_fields[name].get_default(call_default_factory=True)
    return [v.model_dump(mode="json") if hasattr(v, "model_dump") else v for v in value] \
        if isinstance(value, list) else value


def _same(a: Any, b: Any) -> bool:
    dump = (lambda v: v.model_dump(mode="json") if hasattr(v, "model_dump") else  # noqa: E731
            [dump(x) for x in v] if isinstance(v, list) else v)
    return dump(a) == dump(b)


def explicit_fields(spec: RunSpec) -> dict[str, Any]:
    """The fields a form set to something other than their default (a form sends every field, so
    'set' alone cannot tell what a person typed)."""
    return {k: getattr(spec, k) for k in spec.model_fields_set
            if k not in ("instruction", "planner", "instruction_plan") and not _same(getattr(spec, k), _default(k))}


def resolve(instruction: str, explicit: dict[str, Any], *, planner: Endpoint | None = None,
            models: list[str] | None = None, dirs: list[str] | None = None) -> RunSpec:
    """The RunSpec `instruction` and `explicit` describe; its `instruction_plan` records the planner
    used, every field's source, what is unresolved and why, and notes (e.g. a refused LLM answer)."""
    from preftune.tasks.instruction.llm import llm_reading

    models = known_models() if models is None else models
    reading = parse_instruction(instruction, known_models=models, dataset_dirs=dirs or dataset_dirs())
    notes: list[str] = []
    used = "parser"
    fields, unresolved = dict(reading.fields), dict(reading.unresolved)
    if planner is not None:
        dataset = explicit.get("dataset") or fields.get("dataset") or ""
        answer, problem = llm_reading(planner, instruction, reading=reading, models=models,
                                      summary=dataset_summary(dataset))
        if problem:
            notes.append(f"the planner's answer was not used ({problem}); the offline parser's reading is used")
        else:
            used = "llm"
            fields, unresolved = _checked_llm(answer, reading, models, notes)
    for name in explicit:  # a flag or form field settles it
        unresolved.pop(name, None)
    if "base_models" in unresolved:  # ask for the whole list: the question lists the catalogue
        fields.pop("base_models", None)
    if reading.generate_pairs:
        for role in ("strong", "weak"):
            if role not in fields and role not in explicit and role not in unresolved:
                unresolved[role] = f"the instruction asks to generate pairs but names no {role} model"
    sources = {k: INSTRUCTION for k in fields} | {k: EXPLICIT for k in explicit}
    data = {**fields, **explicit, "instruction": instruction, "planner": planner}
    data["instruction_plan"] = {"planner": used, "sources": sources, "unresolved": unresolved, "notes": notes,
                                "said": {k: v for k, v in reading.said.items() if k in fields or k in unresolved}}
    try:
        return RunSpec(**data)
    except ValidationError as err:
        first = err.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        where = f"the instruction ({reading.said.get(name, name)!r})" if sources.get(name) == INSTRUCTION else "flags"
        field_path = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{where}: {field_path + ': ' if field_path else ''}"
                        f"{first['msg'].removeprefix('Value error, ')}") from None


def _checked_llm(answer: dict, reading, models: list[str], notes: list[str]) -> tuple[dict, dict]:
    """The LLM's fields, with its base models held to the same rule as the parser's: a model that is
    neither known here nor an existing folder is unresolved (asked), not trusted."""
    fields = dict(answer)
    unresolved = {k: v for k, v in reading.unresolved.items() if k not in fields}
    known = set(models)
    bases = fields.get("base_models")
    if bases:
        unknown = [m for m in bases if m not in known and not (Path(m) / "config.json").is_file()]
        if unknown:
            unresolved["base_models"] = (f"the planner named {', '.join(map(repr, unknown))}, which match no model "
                                         "in the catalogue or the local model folders")
    for role in ("strong", "weak", "judge"):
        ep = fields.get(role)
        if isinstance(ep, dict) and not ep.get("base_url") and not (Path(ep.get("model", "")) / "config.json").is_file():
            fields.pop(role)
            unresolved[role] = f"the planner named {ep.get('model')!r} as the {role} model without a URL or a local folder"
    if reading.unresolved.get("evaluator") and "evaluator" in fields:
        notes.append(f"the planner mapped {reading.said.get('evaluator')!r} to the evaluator {fields['evaluator']!r}")
    return fields, unresolved


def plan_rows(spec: RunSpec, asked: dict[str, Any] | None = None) -> list[dict]:
    """The resolved spec as the plan shows it: each headline field (and every field not at its
    default) with its value and its source — explicit, instruction, asked or default. `asked` holds
    the answers the run's questions gave (e.g. the base models), or None for a question still to come."""
    asked = asked or {}
    plan = spec.instruction_plan or {}
    sources = {**plan.get("sources", {}), **{k: ASKED for k in asked}}
    said = plan.get("said", {})
    rows = []
    for name in [*HEADLINE, *(k for k in sources if k not in HEADLINE)]:
        if name == "lora_r":
            continue
        if name == "full":
            value, source = spec.method, sources.get("full") or sources.get("lora_r") or DEFAULT
        else:
            value, source = _shown(asked.get(name, getattr(spec, name))), sources.get(name, DEFAULT)
        if name == "base_models" and value in (None, []):
            value, source = "none given: the run asks (sweep the catalogue?)", ASKED
        elif name == "evaluator" and not value and spec.judge is None:
            value, source = "none given: the run asks (a Python evaluator or a judge)", ASKED
        elif value in (None, "", []) and source == DEFAULT:
            continue
        rows.append({"field": "method" if name == "full" else name, "value": value, "source": source,
                     "words": (said.get("lora_r") or said.get("full", "")) if name == "full" else said.get(name, "")})
    return rows


def _shown(value: Any) -> Any:
    if isinstance(value, list):
        return ", ".join(str(_shown(v)) for v in value) if value else []
    if hasattr(value, "label"):
        return value.label
    if isinstance(value, Endpoint):
        return str(value)
    return value
