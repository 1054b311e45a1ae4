"""Hugging Face model folders, loaded offline: the one tokenizer loader every phase uses, the one
model loader for generation (phase 5, the plan's calibration, a run's local server) and the one
rendering of a prompt through the chat template.

preftune never downloads: a model is a local folder (or a hub id already in the local cache).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.errors import UserError
from preftune.templating import chat_template_errors, limit_chat_templates

if TYPE_CHECKING:  # torch loads with a model, not with this module (the CLI starts without it)
    import torch


def load_tokenizer(model: str | Path) -> Any:
    """A model's tokenizer, with the chat template and EOS token that every phase relies on
    (prompts are rendered through the template; completions end at EOS)."""
    from transformers import AutoTokenizer

    limit_chat_templates()
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
    with chat_template_errors(model):  # a template that hangs or is stopped fails here, once
        tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False)
    return tok


# What a real model's config can say (the largest released models are well inside these): a field
# beyond them is a broken or hostile config.json, refused before anything is allocated from it.
CONFIG_LIMITS = {"vocab_size": 4_000_000, "hidden_size": 65_536, "intermediate_size": 1_048_576,
                 "num_hidden_layers": 1_024, "num_attention_heads": 4_096, "num_key_value_heads": 4_096,
                 "head_dim": 65_536, "max_position_embeddings": 16_777_216, "num_experts": 4_096,
                 "num_local_experts": 4_096, "moe_intermediate_size": 1_048_576}


def check_model_config(model: str | Path) -> None:
    """Refuse, in one line naming the field, a config.json whose sizes no model has, or whose
    parameters (counted from the config on the meta device: nothing allocated) cannot fit in this
    machine's memory as float32. Every model load (training, generation) goes through here first."""
    import json

    from preftune.cost import model_params

    path = Path(model) / "config.json"
    if not path.is_file():
        return  # a hub id in the local cache: transformers reads it
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"not a readable JSON config ({type(err).__name__})", path=path) from None
    for section in (config, config.get("text_config") if isinstance(config, dict) else None):
        for field, limit in CONFIG_LIMITS.items():
            value = section.get(field) if isinstance(section, dict) else None
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit):
                raise UserError(f"{field} {value!r} is not a size a model can have (a positive integer "
                                f"up to {limit:,})", path=path)
    need, have = 4 * model_params(str(model)), machine_memory()
    if need > have:
        raise UserError(f"the model's parameters alone need {need / 2**30:,.1f} GiB as float32; this machine "
                        f"has {have / 2**30:,.1f} GiB of memory", path=path)


def machine_memory() -> int:
    """Bytes of memory a model can be held in: physical RAM plus the GPUs' memory."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    import torch

    if torch.cuda.is_available():
        total += sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    return total


def prompt_ids(tokenizer, messages: list[dict], tools: list | None = None) -> list[int]:
    """Messages through the chat template, ending with the assistant generation prompt."""
    with chat_template_errors(tokenizer.name_or_path):
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
    check_model_config(weights)
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
