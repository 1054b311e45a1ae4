"""Loading the base model, wrapping it for LoRA or full training, and saving the result.

With LoRA the reference model is the base model itself with its adapters disabled — there is
never a second copy of the weights in memory.

transformers, peft and accelerate are imported here, at module import, not inside the functions:
their import (seconds) happens once per process, before the job's clock starts. (A sweep runs each
job as its own `preftune train --config` process; see docs/ARCHITECTURE.md.) ``transformers.activations`` is what every model class pulls in on first load.
"""

from __future__ import annotations

import importlib.util
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import accelerate  # noqa: F401
import peft
import torch
import transformers.activations  # noqa: F401
from transformers import AutoModelForCausalLM

from preftune.errors import UserError
from preftune.files import atomic_dir
from preftune.hf import check_model_config
from preftune.job import Precision, choose_precision


def pad_id(tokenizer) -> int:
    # Pads sit after every real token and are never attended to or scored: any id will do.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def job_precision(cfg) -> Precision:
    """``choose_precision`` for this process's device; a 4-bit job off CUDA is a one-line UserError."""
    cuda = torch.cuda.is_available()
    try:
        return choose_precision("cuda" if cuda else "cpu", cfg.full, cfg.quantize,
                                bf16_supported=cuda and torch.cuda.is_bf16_supported())
    except ValueError as err:
        raise UserError(str(err)) from None


def _load_kwargs(precision: Precision) -> dict:
    """from_pretrained's dtype (and the 4-bit quantization config) for ``precision``."""
    if precision.weights != "nf4":
        return {"dtype": getattr(torch, precision.weights)}
    if importlib.util.find_spec("bitsandbytes") is None:  # transformers imports it itself
        raise UserError("quantize '4bit' needs bitsandbytes: pip install 'preftune[qlora]'")
    from transformers import BitsAndBytesConfig

    # device_map: 4-bit weights are quantized as they land on this process's GPU (they cannot move after)
    return {"dtype": torch.bfloat16, "device_map": {"": torch.cuda.current_device()},
            "quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True)}


def load_policy(cfg, precision: Precision | None = None) -> torch.nn.Module:
    """The base causal LM in ``precision`` (default: ``job_precision(cfg)``), wrapped with LoRA
    adapters unless ``cfg.full``. The adapters are float32 whatever the base's dtype: their updates
    are small against their values, which bfloat16's 8-bit mantissa would round away."""
    check_model_config(cfg.model)  # before anything is allocated from its config
    precision = precision or job_precision(cfg)
    lm = AutoModelForCausalLM.from_pretrained(str(cfg.model), local_files_only=True, **_load_kwargs(precision))
    lm.config.use_cache = False
    if precision.weights == "nf4":  # norms in float32, inputs' grads on: what a k-bit base needs to train through
        lm = peft.prepare_model_for_kbit_training(lm, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.full:
        return lm
    target = cfg.lora_target if cfg.lora_target == "all-linear" else [
        t.strip() for t in cfg.lora_target.split(",") if t.strip()]
    lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=target, task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = peft.get_peft_model(lm, lora)
    except ValueError as err:
        raise UserError(f"lora_target {cfg.lora_target!r}: {err}") from None
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


@contextmanager
def reference_mode(lm: torch.nn.Module):
    """The base model's behaviour: adapters disabled (LoRA) or as-is (full, before training)."""
    disable = getattr(lm, "disable_adapter", None)
    with disable() if callable(disable) else nullcontext():
        yield


def save_trained(lm: torch.nn.Module, tokenizer, out: Path, full: bool) -> Path:
    """OUT/adapter/ (a PEFT folder) or OUT/model/ (a full model folder), with the tokenizer."""
    folder = Path(out) / ("model" if full else "adapter")
    with atomic_dir(folder) as tmp:
        lm.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return folder
