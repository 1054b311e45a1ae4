"""Hugging Face model folders, loaded offline: the one tokenizer loader every phase uses, the one
model loader for generation (phase 5, the plan's calibration, a run's local server) and the one
rendering of a prompt through the chat template.

preftune never downloads: a model is a local folder (or a hub id already in the local cache).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.errors import UserError
from preftune.files import file_sha256, write_json_atomic
from preftune.templating import chat_template_errors, limit_chat_templates

if TYPE_CHECKING:  # torch loads with a model, not with this module (the CLI starts without it)
    import torch


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                    "chat_template.json")
MEMO_FILE = "model-digests.json"


def file_digest(path: Path, memo: dict) -> str:
    """Content sha256, memoised by (path, size, mtime) so big weight files are read once."""
    st = path.stat()
    tag = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if tag not in memo:
        memo[tag] = file_sha256(path)
    return memo[tag]


def model_identity(model_dir: str | Path, memo: dict) -> dict:
    """THE identity of a local model folder: content digests of the files that define its outputs —
    config, weights, tokenizer (with its chat template) and generation config (its end tokens).
    A re-saved copy is the same model; weights retrained in place are a new one."""
    root = Path(model_dir)
    files = sorted(p for p in root.iterdir() if p.is_file())
    identity = {"config": file_digest(root / "config.json", memo),
                "weights": {p.name: file_digest(p, memo) for p in files if p.suffix in _WEIGHT_SUFFIXES},
                "tokenizer": {p.name: file_digest(p, memo) for p in files if p.name in _TOKENIZER_FILES}}
    if (root / "generation_config.json").is_file():
        identity["generation"] = file_digest(root / "generation_config.json", memo)
    return identity


def model_fingerprint(model: str | Path) -> str:
    """``model_identity`` as one short string, for cache keys (a run's response cache, phase 5's
    completion cache); the digests are memoised across processes in preftune's cache. A name that is
    not a folder (a hub id in the local cache) stands for itself."""
    from preftune.paths import cache_dir

    root = Path(model)
    if not (root / "config.json").is_file():
        return f"local:{model}"
    memo_path = cache_dir() / MEMO_FILE
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    before = dict(memo)
    identity = model_identity(root, memo)
    if memo != before:  # entries of files that are gone (a deleted copy, a test's folder) are dropped
        write_json_atomic(memo_path, {tag: d for tag, d in memo.items() if Path(tag.split("|")[0]).exists()})
    return "local:" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


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
    from preftune.cost import model_params

    check_config_sizes(model)
    path = Path(model) / "config.json"
    if not path.is_file():
        return
    need, have = 4 * model_params(str(model)), machine_memory()
    if need > have:
        raise UserError(f"the model's parameters alone need {need / 2**30:,.1f} GiB as float32; this machine "
                        f"has {have / 2**30:,.1f} GiB of memory", path=path)


def check_config_sizes(model: str | Path) -> None:
    """Refuse, in one line naming the field, a config.json whose sizes no model has (before anything
    counts or prices its parameters: `plan` read a vocab_size of 1e12 as a 128,000B model)."""
    import json

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


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every token a completion ends at: the generation config's end tokens (often a list:
    end-of-turn and end-of-text) and the tokenizer's EOS. Passing the tokenizer's EOS alone to
    ``generate`` overrides that list, so phase 5 ran past an end-of-turn that phase 3 stopped at."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def load_causal_lm(model_path: str | Path, adapter_path: str | Path | None = None,
                   device: str | torch.device | None = None):
    """(model, tokenizer) in eval mode. ``adapter_path`` is a PEFT adapter folder, or a full model
    folder written by ``preftune train --full`` (then it replaces ``model_path``)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    is_full = adapter_path is not None and (Path(adapter_path) / "config.json").is_file() \
        and not (Path(adapter_path) / "adapter_config.json").is_file()
    weights = adapter_path if is_full else model_path
    check_model_config(weights)
    tok_dir = adapter_path if adapter_path and (Path(adapter_path) / "tokenizer_config.json").is_file() \
        else model_path
    tokenizer = load_tokenizer(tok_dir)  # checked first: a name that is nowhere local is one line
    # transformers 5.23 looks for an adapter config of a hub id without local_files_only: pass it there too.
    model = AutoModelForCausalLM.from_pretrained(str(weights), dtype=dtype, local_files_only=True,
                                                 adapter_kwargs={"local_files_only": True})
    if adapter_path is not None and not is_full:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_path), local_files_only=True)
        model = model.merge_and_unload()  # plain weights: faster decoding, same outputs
    model.to(device).eval()
    return model, tokenizer
