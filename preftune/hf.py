"""Hugging Face model folders, loaded offline: the one tokenizer loader every phase uses, the one
model loader for generation (phase 5, the plan's calibration, a run's local server) and the one
rendering of a prompt through the chat template.

preftune never downloads: a model is a local folder (or a hub id already in the local cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.errors import UserError

if TYPE_CHECKING:  # torch loads with a model, not with this module (the CLI starts without it)
    import torch


def load_tokenizer(model: str | Path) -> Any:
    """A model's tokenizer, with the chat template and EOS token that every phase relies on
    (prompts are rendered through the template; completions end at EOS)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    except (OSError, ValueError) as err:
        if Path(model).exists():
            reason = " ".join(str(err).split())[:200]
            raise UserError(f'cannot load the tokenizer of model "{model}": {reason}') from None
        raise UserError(f'model "{model}" is neither a local folder nor a hub id in the local Hugging Face '
                        "cache (preftune never downloads; `preftune zoo` builds local test models)") from None
    if not getattr(tok, "chat_template", None):
        raise UserError(f'model "{model}" has no chat template (prompts are rendered through it)')
    if tok.eos_token_id is None:
        raise UserError(f'model "{model}" has no EOS token (completions end at it)')
    return tok


def prompt_ids(tokenizer, messages: list[dict], tools: list | None = None) -> list[int]:
    """Messages through the chat template, ending with the assistant generation prompt."""
    enc = tokenizer.apply_chat_template(
        messages, tools=tools or None, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(enc["input_ids"])


def load_causal_lm(model_path: str | Path, adapter_path: str | Path | None = None,
                   device: str | torch.device | None = None):
    """(model, tokenizer) in eval mode. ``adapter_path`` is a PEFT adapter folder, or a full model
    folder written by ``preftune train --full`` (then it replaces ``model_path``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    is_full = adapter_path is not None and (Path(adapter_path) / "config.json").is_file() \
        and not (Path(adapter_path) / "adapter_config.json").is_file()
    weights = adapter_path if is_full else model_path
    model = AutoModelForCausalLM.from_pretrained(str(weights), dtype=dtype)
    tok_dir = adapter_path if adapter_path and (Path(adapter_path) / "tokenizer_config.json").is_file() \
        else model_path
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    if adapter_path is not None and not is_full:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_path))
        model = model.merge_and_unload()  # plain weights: faster decoding, same outputs
    model.to(device).eval()
    return model, tokenizer
