"""Loading the base model, wrapping it for LoRA or full training, and saving the result.

With LoRA the reference model is the base model itself with its adapters disabled — there is
never a second copy of the weights in memory.

transformers, peft and accelerate are imported here, at module import, not inside the functions:
their import (seconds) happens once per process, before the job's clock starts. (A sweep runs each
job as its own `preftune train --config` process; see docs/ARCHITECTURE.md.) ``transformers.activations`` is what every model class pulls in on first load.
"""

from __future__ import annotations

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


def pad_id(tokenizer) -> int:
    # Pads sit after every real token and are never attended to or scored: any id will do.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_policy(cfg) -> torch.nn.Module:
    """The base causal LM, wrapped with LoRA adapters unless ``cfg.full``."""
    check_model_config(cfg.model)  # before anything is allocated from its config
    lm = AutoModelForCausalLM.from_pretrained(str(cfg.model), dtype=torch.float32, local_files_only=True)
    lm.config.use_cache = False
    if cfg.gradient_checkpointing:
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
            return peft.get_peft_model(lm, lora)
    except ValueError as err:
        raise UserError(f"lora_target {cfg.lora_target!r}: {err}") from None


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
