"""TrainConfig: one training job, validated once when built.

`config_hash` covers exactly the fields that change the trained weights or the evaluation, so a
finished job with the same hash is not run again. Where files go (out, ref_cache), how often we log
or checkpoint, and how many CPU threads we use do not change the result and are left out.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from preftune.workspace import file_sha256

# Bump when tokenization, collation or the loop change what a config trains to.
TRAINER_VERSION = 1

# Fields that do not change the result (output placement, logging cadence, threads).
_NOT_HASHED = {"out", "ref_cache", "log_every", "save_every", "num_threads", "progress"}


class Scheduler(StrEnum):
    linear = "linear"
    cosine = "cosine"


class TrainConfig(BaseModel):
    """One preference-training job: data, base model, loss, LoRA or full, optimisation."""

    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="Training pairs, JSONL in any pair format phase 1 accepts.")
    eval_data: Path | None = Field(None, description="Held-out pairs for the final eval loss and reward accuracy.")
    model: Path = Field(description="Base model: a local Hugging Face model folder.")
    out: Path = Field(description="Job folder: metrics.jsonl, summary.json, adapter/ (or model/), checkpoint.")

    loss_type: str = Field("dpo", pattern="^(dpo|ipo|hinge|simpo|orpo)$",
                           description="Loss family: dpo (sigmoid), ipo, hinge, simpo or orpo.")
    beta: float = Field(0.1, gt=0.0, le=100.0, description="Inverse temperature of the implicit reward.")
    reference_free: bool = Field(False, description="DPO without a reference model (reference log-probs = 0).")
    normalize_by_length: bool = Field(False, description="Divide each log-ratio by the completion length.")
    rpo_alpha: float = Field(0.0, ge=0.0, le=10.0, description="Weight of an NLL term on the preferred answer.")
    simpo_gamma: float = Field(0.0, ge=0.0, le=10.0, description="SimPO target reward margin gamma.")
    orpo_lambda: float = Field(0.1, gt=0.0, le=10.0, description="ORPO weight of the odds-ratio term.")

    full: bool = Field(False, description="Full-parameter fine-tuning instead of LoRA.")
    lora_r: int = Field(8, ge=1, le=512, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, le=1024, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    lora_target: str = Field("all-linear", min_length=1,
                             description="'all-linear' or comma-separated module names, e.g. 'q_proj,v_proj'.")

    lr: float = Field(5e-4, gt=0.0, le=1.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    epochs: int = Field(1, ge=1, le=100, description="Passes over the training pairs.")
    batch_size: int = Field(8, ge=1, le=1024, description="Pairs per micro-batch (per device).")
    grad_accum: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    max_length: int = Field(256, ge=16, le=131072, description="Max tokens of prompt + one completion.")
    max_prompt_length: int | None = Field(
        None, ge=1, le=131072, description="Cut prompts (from the left) to this many tokens first. Empty: no cap.")
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Fraction of steps with linear warm-up.")
    scheduler: Scheduler = Field(Scheduler.linear, description="Decay after warm-up: linear or cosine, to 0.")
    max_grad_norm: float = Field(1.0, ge=0.0, le=1e6, description="Gradient clipping norm; 0 = no clipping.")
    seed: int = Field(0, ge=0, description="Seed for LoRA init, batch order and dropout.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")

    ref_cache: Path | None = Field(
        None, description="Shared reference log-prob cache folder. Empty: <preftune cache>/refcache.")
    log_every: int = Field(1, ge=1, le=100000, description="Write a metrics.jsonl line every N optimizer steps.")
    save_every: int = Field(50, ge=1, le=1000000, description="Checkpoint every N optimizer steps.")
    num_threads: int | None = Field(None, ge=1, le=1024, description="torch CPU threads. Empty: torch's default.")
    progress: bool = Field(False, description="Show a tqdm progress bar.")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        self.loss_settings()  # the loss module's own checks, so a bad mix is a validation error here
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        return self

    def loss_settings(self):
        """The LossSettings the loss functions take (mirrors the loss fields above)."""
        from preftune.tasks.training.losses import LossSettings, LossType

        return LossSettings(
            loss_type=LossType(self.loss_type), beta=self.beta, reference_free=self.reference_free,
            normalize_by_length=self.normalize_by_length, rpo_alpha=self.rpo_alpha,
            simpo_gamma=self.simpo_gamma, orpo_lambda=self.orpo_lambda)

    def resolved_ref_cache(self) -> Path:
        if self.ref_cache is not None:
            return Path(self.ref_cache)
        from preftune.paths import cache_dir

        return cache_dir() / "refcache"

    def config_hash(self) -> str:
        """sha256 over the result-changing fields, with the data files' content hashes."""
        fields = self.model_dump(mode="json", exclude=_NOT_HASHED)
        fields["model"] = str(Path(self.model).resolve())
        fields["data"] = file_sha256(self.data)
        fields["eval_data"] = file_sha256(self.eval_data) if self.eval_data else None
        fields["trainer_version"] = TRAINER_VERSION
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

