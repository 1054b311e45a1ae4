"""RunSpec: the flow's one parameter. It renders as the form in the Prefect UI, so every field
carries a description, bounds and, where it is a choice, an enum. Validated once, when built.

The job settings (optimisation, LoRA, the loss options, beta's bounds) are not written here: RunSpec
inherits them from preftune/job.py, the one definition a training job is built from, so the form,
`preftune run`'s flags and `preftune train` accept and refuse exactly the same values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from preftune.endpoint import Endpoint
from preftune.forms import empty_text_is_none, plain_optionals
from preftune.job import Beta, LoraOptions, LossOptions, TrainingOptions
from preftune.workspace import default_workspace

# How a run is approved and where it writes, not what it computes: left out of the digest.
_NOT_DIGESTED = {"workspace", "approval_timeout_s", "approval_poll_s", "auto_approve_max_usd", "allow_unpriced",
                 "min_pair_yield"}
# How the spec was written (a sentence, a planner model, each field's source), not what it computes:
# the same resolved spec resumes the same workspace whatever words it came from.
_HOW_WRITTEN = {"instruction", "planner", "instruction_plan"}


def evaluator_kind(evaluator: str | None, judge: Endpoint | None, rubric: str | None) -> str | None:
    """THE rule for what scores the candidates (the plan, the run's questions and phase 5 all ask it):
    "evaluator" when an evaluator id is given (it wins); with a judge, "rubric" when the rubric has text
    and "auto" (the judge writes one) when it is empty or blank; None when nothing can score."""
    if evaluator and evaluator.strip():
        return "evaluator"
    if judge is None:
        return None
    return "rubric" if rubric and rubric.strip() else "auto"


def _run_fields_first(schema: dict, cls: type) -> None:
    """The form shows the run's own fields (instruction, dataset, models, ...) before the training
    and LoRA options it inherits: pydantic lists a parent's fields first, and the Prefect UI renders
    the properties in schema order."""
    inherited = set(TrainingOptions.model_fields) | set(LoraOptions.model_fields)
    props = schema.get("properties", {})
    for k in inherited & set(props):  # one group below the run's fields, named as such on each label
        props[k]["title"] = f"Advanced training · {props[k].get('title', k)}"
    schema["properties"] = {k: v for k, v in props.items() if k not in inherited} | \
        {k: v for k, v in props.items() if k in inherited}


def _form_layout(schema: dict, cls: type) -> None:
    _run_fields_first(schema, cls)
    plain_optionals(schema)


class RunSpec(TrainingOptions, LoraOptions):
    """Everything one preference-learning run needs. Empty lists mean 'use the defaults'.
    Every job of the sweep gets the training and LoRA fields inherited from preftune.job."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_form_layout)

    instruction: str | None = Field(
        None, description="Say what you want in one sentence, e.g. 'Run DPO on prefs.jsonl using Qwen3 32B with beta "
        "0.1 and 0.3, under $20'. The fields you fill in below win over it; the plan shows where each value came "
        "from, and anything it cannot resolve is asked.")
    planner: Endpoint | None = Field(
        None, description="OpenAI-compatible model that reads the instruction (structured output against this "
        "form's schema). Empty: the offline parser reads it.")
    instruction_plan: SkipJsonSchema[dict | None] = Field(
        None, description="Set by preftune once the instruction is resolved: the planner used, each field's "
        "source, what it could not resolve.")
    dataset: str = Field("", description="JSONL: preference pairs (OpenAI/Fireworks or TRL format) or prompts only. "
                         "May be named in the instruction instead.")
    test_dataset: str | None = Field(None, description="Optional held-out JSONL; otherwise an 80/20 split.")
    workspace: str | None = Field(None, description="Folder for every output; a re-run with the same one resumes.")
    base_models: list[str] = Field(
        default_factory=list, description="Base model folders or ids. Empty: sweep the configured catalogue.")
    betas: list[Beta] = Field(default_factory=lambda: [0.1], min_length=1, description="DPO beta values to sweep.")
    losses: list[LossOptions] = Field(default_factory=lambda: [LossOptions()], min_length=1,
                                      description="Loss settings to sweep.")
    strong: Endpoint | None = Field(None, description="Strong generator (preferred answers), prompts-only data.")
    weak: Endpoint | None = Field(None, description="Weak generator (non-preferred answers), prompts-only data.")
    max_pair_prompts: int | None = Field(
        None, ge=3, description="Generate pairs for at most this many prompts (a sample in file order, train "
        "and test in their split's proportion). Empty: every prompt.")
    keep_truncated: bool = Field(
        False, description="Keep generated pairs whose answer hit pair_max_tokens (dropped by default).")
    pair_max_tokens: int = Field(128, ge=1, le=32768, description="Max tokens per generated answer.")
    judge: Endpoint | None = Field(None, description="Pairwise LLM judge endpoint.")
    evaluator: str | None = Field(
        None, description="Python evaluator id `package.module:function` or `file.py:function` (wins over rubric).")
    rubric: str | None = Field(None, description="Rubric text for the LLM judge. Neither: an auto rubric.")
    eval_max_new_tokens: int = Field(
        0, ge=0, le=32768, description="Max tokens per evaluation completion. 0: fitted to the held-out "
        "preferred answers (their p90 in the base model's tokens, 16-512).")
    max_eval_prompts: int = Field(200, ge=1, le=100000, description="Held-out prompts used for evaluation.")
    judge_calibration_pairs: int = Field(
        64, ge=0, le=100000, description="Held-out labelled pairs the judge judges first (both orders), to "
        "measure its agreement with the labels before it judges candidates. 0: not measured.")
    target_win_rate: float | None = Field(
        0.75, ge=0.0, le=1.0, description="Performance target: win rate vs base (with a Python evaluator, "
        "per prompt: a higher score wins). Once a finished job meets it, no new job starts. null (the "
        "JSON input): no target, the whole grid.")
    max_concurrent_jobs: int = Field(6, ge=1, le=64, description="Sweep jobs active at once.")
    budget_usd: float | None = Field(None, ge=0, description="Refuse a plan whose high estimate exceeds this.")
    work_pool: str | None = Field(None, description="Run sweep jobs as deployment runs on this Prefect work pool.")
    deploy: bool = Field(True, description="Serve the chosen model behind an OpenAI-compatible endpoint.")
    deploy_port: int | None = Field(None, ge=1024, le=65535, description="Port for the deployed endpoint.")
    approval_timeout_s: int = Field(86400, ge=10, description="How long an approval waits for an answer.")
    approval_poll_s: int = Field(10, ge=1, le=600, description="How often a paused run checks for an answer.")
    min_pair_yield: float = Field(
        0.5, ge=0.0, le=1.0, description="Prompts-only data: the share of prompts that must give a usable pair. "
        "Below it the run asks whether to continue (a headless run stops).")
    allow_unpriced: bool = Field(
        False, description="Let auto-approval accept a plan that calls remote endpoints without prices (their "
        "cost is unknown). Off: such a plan is never approved automatically.")
    auto_approve_max_usd: float | None = Field(
        None, ge=0, description="Headless: approve by itself when the high estimate is within this many USD "
        "(and take the recommended answer at later prompts). Empty: always ask.")

    @model_validator(mode="before")
    @classmethod
    def _empty_text_is_none(cls, data: Any) -> Any:
        """The form's empty text box for an optional text field (preftune.forms) means "not given"."""
        return empty_text_is_none(cls, data)

    @model_validator(mode="after")
    def _dataset_or_instruction(self):
        if not self.dataset and not self.instruction:
            raise ValueError("dataset: give a dataset (or an instruction that names one)")
        return self

    def workspace_path(self) -> Path:
        if self.workspace:
            return Path(self.workspace)
        return default_workspace(f"{Path(self.dataset).stem}-{self.digest()[:8]}")

    def digest(self) -> str:
        """Hash of the spec minus where it runs: the same spec resumes the same workspace."""
        data = self.model_dump(mode="json", exclude=_NOT_DIGESTED | _HOW_WRITTEN)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
