"""The one definition of a training job: its loss, LoRA and optimisation settings.

Every name, bound and exclusivity rule of a job lives here, once:

- ``LossType`` / ``LossOptions`` / ``LossSettings`` — the loss family and its options (what the
  loss functions in ``tasks/training/losses.py`` take);
- ``LoraOptions`` and ``TrainingOptions`` — how the job trains;
- ``TrainConfig`` — one whole job (the above + data, model, output folder), the file a sweep
  writes to ``jobs/<id>/job.json`` and ``preftune train --config`` reads;
- ``RunSpec`` (preftune/spec.py) reuses the same models, so a bad beta or a bad loss mix is refused
  when the form or the flags are validated, before anything is spent; ``preftune train``'s flags
  are generated from ``TrainConfig``'s fields (preftune/cli/flags.py).

No torch here: the CLI, the plan and the Prefect form import this without loading a model.
See docs/ARCHITECTURE.md for where a job config goes from here.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from preftune.files import file_sha256

# A job folder's summary, written last by the trainer: its presence means the job finished.
SUMMARY_FILE = "summary.json"

# Bump when tokenization, collation or the loop change what a config trains to.
TRAINER_VERSION = 2  # 2: exactly one EOS per completion; CPU rows without their padding


class LossType(StrEnum):
    """The loss family; the loop branches on the properties, never on the names."""

    DPO = "dpo"
    IPO = "ipo"
    HINGE = "hinge"
    SIMPO = "simpo"
    ORPO = "orpo"

    @property
    def needs_reference(self) -> bool:
        """True when the loss compares against reference-model log-probs."""
        return self in (LossType.DPO, LossType.IPO, LossType.HINGE)

    @property
    def length_normalized(self) -> bool:
        """True when the loss itself works on length-averaged policy log-probs (no reference)."""
        return self in (LossType.SIMPO, LossType.ORPO)


# allow_inf_nan=False: `--beta nan` is an error, not a job that trains on NaN losses.
Beta = Annotated[float, Field(gt=0.0, le=100.0, allow_inf_nan=False,
                              description="Inverse temperature of the implicit reward (DPO beta).")]
_Weight = Annotated[float, Field(ge=0.0, le=10.0, allow_inf_nan=False)]


class LossOptions(BaseModel):
    """One point on the loss axis of a sweep: the family and its options (beta is its own axis)."""

    model_config = ConfigDict(extra="forbid")

    loss_type: LossType = Field(LossType.DPO, description="Loss family: dpo (sigmoid), ipo, hinge, simpo or orpo.")
    normalize_by_length: bool = Field(False, description="Divide each log-ratio by the completion length.")
    reference_free: bool = Field(False, description="DPO without a reference model (reference log-probs = 0).")
    rpo_alpha: _Weight = Field(0.0, description="Weight of an NLL term on the preferred answer (RPO).")
    simpo_gamma: _Weight = Field(0.0, description="SimPO target reward margin gamma (simpo only).")
    orpo_lambda: _Weight = Field(0.1, description="ORPO weight of the odds-ratio term (orpo only).")

    @model_validator(mode="after")
    def _exclusive(self):
        if self.rpo_alpha > 0 and self.simpo_gamma > 0:
            raise ValueError(f"rpo_alpha ({self.rpo_alpha}) and simpo_gamma ({self.simpo_gamma}) cannot both be "
                             "positive: set one of them to 0")
        if self.simpo_gamma > 0 and self.loss_type is not LossType.SIMPO:
            raise ValueError(f"simpo_gamma only applies to loss_type 'simpo', not {self.loss_type.value!r}")
        if self.rpo_alpha > 0 and self.loss_type is LossType.ORPO:
            raise ValueError("rpo_alpha cannot be used with loss_type 'orpo': ORPO already includes an NLL "
                             "term on the preferred answer")
        return self

    @property
    def label(self) -> str:
        """Short name used in job ids, e.g. `dpo-lnorm-rpo0.5`."""
        parts = [self.loss_type.value]
        if self.normalize_by_length:
            parts.append("lnorm")
        if self.reference_free:
            parts.append("reffree")
        if self.rpo_alpha:
            parts.append(f"rpo{self.rpo_alpha:g}")
        if self.loss_type is LossType.SIMPO and self.simpo_gamma:
            parts.append(f"g{self.simpo_gamma:g}")
        if self.loss_type is LossType.ORPO:
            parts.append(f"l{self.orpo_lambda:g}")
        return "-".join(parts)


class LossSettings(LossOptions):
    """What the loss functions take: the options and beta."""

    beta: Beta = 0.1

    @property
    def needs_reference(self) -> bool:
        """True when the loop must provide reference log-probs."""
        return self.loss_type.needs_reference and not self.reference_free


class Quantize(StrEnum):
    """How a LoRA job holds its frozen base on a CUDA GPU (``choose_precision``)."""

    none = "none"
    four_bit = "4bit"


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    full: bool = Field(False, description="Full-parameter fine-tuning instead of LoRA.")
    lora_r: int = Field(8, ge=1, le=512, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, le=1024, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    lora_target: str = Field("all-linear", min_length=1,
                             description="'all-linear' or comma-separated module names, e.g. 'q_proj,v_proj'.")
    quantize: Quantize = Field(
        Quantize.none, description="Base weights on a CUDA GPU: 'none' (bfloat16) or '4bit' (QLoRA, NF4; LoRA only; "
        "needs `pip install 'preftune[qlora]'`).")

    @model_validator(mode="after")
    def _quantize_lora_only(self):
        if self.quantize != "none" and self.full:
            raise ValueError(f"quantize '{self.quantize}' needs LoRA: a quantized base cannot be fully fine-tuned "
                             "(set full to false or quantize to 'none')")
        return self

    @property
    def method(self) -> str:
        if self.full:
            return "full fine-tuning"
        return f"LoRA r={self.lora_r} alpha={self.lora_alpha}" + (" on a 4-bit base (QLoRA)" if self.quantize is Quantize.four_bit else "")


@dataclass(frozen=True)
class Precision:
    """How a job holds and computes its weights on one device (``choose_precision``).

    ``weights``: the dtype the base model is loaded in ("float32", "bfloat16", or "nf4" for 4-bit);
    ``mixed``: accelerate's mixed precision ("bf16" autocast or "no"); ``key``: the exact name of the
    arithmetic the reference log-probs come from, part of the reference cache's key."""

    weights: str
    mixed: str
    key: str

    @property
    def weight_bytes(self) -> float:
        """Bytes per base parameter in memory (NF4: 4 bits plus its block scales, ~0.55 byte)."""
        return {"float32": 4.0, "bfloat16": 2.0, "nf4": 0.55}[self.weights]


def choose_precision(device_type: str, full: bool, quantize: str = "none", bf16_supported: bool = True) -> Precision:
    """The job's precision, a pure function of where and how it trains.

    - CPU: float32 weights, no autocast (what the trainer always did there).
    - CUDA with bfloat16, LoRA: the frozen base in bfloat16 (half of float32's memory; the adapters
      stay float32), bf16 autocast; with ``quantize="4bit"`` the base is NF4 (QLoRA) instead.
    - CUDA, full fine-tuning: float32 master weights and optimizer state, bf16 autocast (mixed precision).
    - A GPU without bfloat16: float32, no autocast; 4-bit is refused there.
    Raises ValueError (one line) for 4-bit off CUDA or without bfloat16, or with full fine-tuning."""
    quantize = str(quantize)
    if quantize != "none" and (device_type != "cuda" or not bf16_supported):
        raise ValueError(f"quantize {quantize!r} needs a CUDA GPU with bfloat16 (QLoRA); this machine has "
                         f"{'a GPU without bfloat16' if device_type == 'cuda' else 'no CUDA GPU'}: set quantize to 'none'")
    if quantize != "none" and full:
        raise ValueError(f"quantize {quantize!r} needs LoRA, not full fine-tuning")
    if device_type != "cuda" or not bf16_supported:
        return Precision("float32", "no", "fp32")
    if full:
        return Precision("float32", "bf16", "bf16")  # the key full jobs on a GPU always had
    if quantize == "4bit":
        return Precision("nf4", "bf16", "nf4-base-bf16")
    return Precision("bfloat16", "bf16", "bf16-base-bf16")


class Scheduler(StrEnum):
    linear = "linear"
    cosine = "cosine"


class TrainingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = Field(5e-4, gt=0.0, le=1.0, allow_inf_nan=False, description="Peak learning rate (AdamW).")
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
    seed: int = Field(0, ge=0, description="Random seed: data split, LoRA init, batch order, sampling.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    processes: int = Field(
        1, ge=1, le=1024, description="Data-parallel processes per job (one per GPU; gloo on CPU). The global "
        "batch is batch_size × grad_accum × processes; `preftune train` launches them with torchrun.")

    @model_validator(mode="after")
    def _lengths(self):
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        return self


# Fields that do not change the result (output placement, logging cadence, threads).
_NOT_HASHED = {"out", "ref_cache", "log_every", "save_every", "num_threads", "progress", "devices"}


class TrainConfig(LossSettings, LoraOptions, TrainingOptions):
    """One preference-training job: data, base model, output folder, and the options above.

    `config_hash` covers exactly the fields that change the trained weights or the evaluation, so
    a finished job with the same hash is not run again."""

    data: Path = Field(description="Training pairs, JSONL in any pair format phase 1 accepts.")
    eval_data: Path | None = Field(None, description="Held-out pairs for the final eval loss and reward accuracy.")
    model: Path = Field(description="Base model: a local Hugging Face model folder.")
    out: Path = Field(description="Job folder: metrics.jsonl, summary.json, adapter/ (or model/), checkpoint.")
    ref_cache: Path | None = Field(
        None, description="Shared reference log-prob cache folder. Empty: <preftune cache>/refcache.")
    log_every: int = Field(1, ge=1, le=100000, description="Write a metrics.jsonl line every N optimizer steps.")
    save_every: int = Field(50, ge=1, le=1000000, description="Checkpoint every N optimizer steps.")
    num_threads: int | None = Field(None, ge=1, le=1024, description="torch CPU threads. Empty: torch's default.")
    progress: bool = Field(False, description="Show a tqdm progress bar.")
    devices: str | None = Field(
        None, pattern=r"^[0-9A-Za-z:-]+(,[0-9A-Za-z:-]+)*$",
        description="CUDA devices this job is pinned to (CUDA_VISIBLE_DEVICES, e.g. '0' or '2,3'); the sweep sets it "
        "from its placement (preftune/placement.py). Empty: the devices the process inherits.")

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
        for name, default in (("processes", 1), ("quantize", "none")):
            if fields[name] == default:  # the default hashes as before the field existed: old jobs stay finished
                del fields[name]
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))


def train_command(config: str | Path, processes: int = 1, as_json: bool = True) -> list[str]:
    """The command that runs the job file `config` on this machine: `preftune train --config`, under
    torchrun (one node, a free rendezvous port, so concurrent jobs never collide) for several processes."""
    launcher = ["torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m"] if processes > 1 else []
    return [sys.executable, "-m", *launcher, "preftune.cli", "train", "--config", str(config),
            *(["--json"] if as_json else [])]


def shared_fields(model: type[BaseModel]) -> set[str]:
    """The job fields a RunSpec (or any model inheriting the option models) holds for every job."""
    return set(model.model_fields) & (set(TrainingOptions.model_fields) | set(LoraOptions.model_fields))
