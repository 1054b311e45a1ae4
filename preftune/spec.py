"""RunSpec: the flow's one parameter. It renders as the form in the Prefect UI, so every field
carries a description, bounds and, where it is a choice, an enum. Validated once, when built.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from preftune.endpoint import Endpoint


class LossName(StrEnum):
    dpo = "dpo"
    ipo = "ipo"
    hinge = "hinge"
    simpo = "simpo"
    orpo = "orpo"


class LossSetting(BaseModel):
    """One loss configuration of the sweep grid."""

    model_config = ConfigDict(extra="forbid")

    loss: LossName = Field(LossName.dpo, description="Loss family: dpo (sigmoid), ipo, hinge, simpo or orpo.")
    normalize_by_length: bool = Field(False, description="Divide each log-ratio by the completion length.")
    reference_free: bool = Field(False, description="DPO without a reference model (reference log-probs = 0).")
    rpo_alpha: float = Field(0.0, ge=0.0, le=10.0, description="Weight of an NLL term on the preferred answer.")
    simpo_gamma: float = Field(0.0, ge=0.0, le=10.0, description="SimPO target reward margin gamma.")
    orpo_lambda: float = Field(0.1, gt=0.0, le=10.0, description="ORPO weight of the odds-ratio term.")

    @model_validator(mode="after")
    def _exclusive(self) -> LossSetting:
        # The same rules as tasks/training/losses.LossSettings, checked when the form is submitted.
        if self.rpo_alpha > 0 and self.simpo_gamma > 0:
            raise ValueError("rpo_alpha and simpo_gamma cannot both be positive")
        if self.simpo_gamma > 0 and self.loss is not LossName.simpo:
            raise ValueError("simpo_gamma applies only to the simpo loss")
        if self.rpo_alpha > 0 and self.loss is LossName.orpo:
            raise ValueError("rpo_alpha does not apply to orpo (it has its own NLL term)")
        return self

    @property
    def label(self) -> str:
        parts = [self.loss.value]
        if self.normalize_by_length:
            parts.append("lnorm")
        if self.reference_free:
            parts.append("reffree")
        if self.rpo_alpha:
            parts.append(f"rpo{self.rpo_alpha:g}")
        if self.loss is LossName.simpo and self.simpo_gamma:
            parts.append(f"g{self.simpo_gamma:g}")
        if self.loss is LossName.orpo:
            parts.append(f"l{self.orpo_lambda:g}")
        return "-".join(parts)


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    full: bool = Field(False, description="Full-parameter fine-tuning instead of LoRA.")
    r: int = Field(8, ge=1, le=512, description="LoRA rank.")
    alpha: int = Field(16, ge=1, le=1024, description="LoRA alpha.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")


class RunSpec(BaseModel):
    """Everything one preference-learning run needs. Empty lists mean 'use the defaults'."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="JSONL: preference pairs (OpenAI/Fireworks or TRL format) or prompts only.")
    test_dataset: str | None = Field(None, description="Optional held-out JSONL; otherwise an 80/20 split.")
    workspace: str | None = Field(None, description="Folder for every output; a re-run with the same one resumes.")
    base_models: list[str] = Field(
        default_factory=list, description="Base model folders or ids. Empty: sweep the configured catalogue.")
    betas: list[float] = Field(default_factory=lambda: [0.1], min_length=1, description="DPO beta values to sweep.")
    losses: list[LossSetting] = Field(default_factory=lambda: [LossSetting()], min_length=1,
                                      description="Loss settings to sweep.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA or full fine-tuning.")
    learning_rate: float = Field(5e-4, gt=0, le=1.0, description="Peak learning rate.")
    epochs: int = Field(1, ge=1, le=100, description="Passes over the training pairs.")
    batch_size: int = Field(8, ge=1, le=1024, description="Pairs per optimizer micro-batch.")
    grad_accum: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    max_length: int = Field(256, ge=16, le=131072, description="Max tokens of prompt + completion.")
    seed: int = Field(0, ge=0, description="Random seed for splits, training and sampling.")
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
    eval_max_new_tokens: int = Field(64, ge=1, le=32768, description="Max tokens per evaluation completion.")
    max_eval_prompts: int = Field(200, ge=1, le=100000, description="Held-out prompts used for evaluation.")
    target_win_rate: float | None = Field(
        0.75, ge=0.0, le=1.0, description="Performance target: win rate vs base (with a Python evaluator, "
        "per prompt: a higher score wins). Once a finished job meets it, no new job starts. Empty: whole grid.")
    max_concurrent_jobs: int = Field(6, ge=1, le=64, description="Sweep jobs active at once.")
    budget_usd: float | None = Field(None, ge=0, description="Refuse a plan whose high estimate exceeds this.")
    work_pool: str | None = Field(None, description="Run sweep jobs as deployment runs on this Prefect work pool.")
    deploy: bool = Field(True, description="Serve the chosen model behind an OpenAI-compatible endpoint.")
    deploy_port: int | None = Field(None, ge=1024, le=65535, description="Port for the deployed endpoint.")
    approval_timeout_s: int = Field(86400, ge=10, description="How long an approval waits for an answer.")
    approval_poll_s: int = Field(10, ge=1, le=600, description="How often a paused run checks for an answer.")
    auto_approve_max_usd: float | None = Field(
        None, ge=0, description="Headless: approve by itself when the high estimate is within this many USD "
        "(and take the recommended answer at later prompts). Empty: always ask.")

    def workspace_path(self) -> Path:
        if self.workspace:
            return Path(self.workspace)
        return Path("workspaces") / f"{Path(self.dataset).stem}-{self.digest()[:8]}"

    def digest(self) -> str:
        """Hash of the spec minus where it runs: the same spec resumes the same workspace."""
        data = self.model_dump(mode="json", exclude={"workspace", "approval_timeout_s", "approval_poll_s", "auto_approve_max_usd"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
