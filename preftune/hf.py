"""Hugging Face model folders, loaded offline: the one tokenizer loader every phase uses, the one
model loader for generation (phase 5, the plan's calibration, a run's local server) and the one
rendering of a prompt through the chat template.

preftune never downloads: a model is a local folder (or a hub id already in the local cache).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.errors import UserError
from preftune.files import file_sha256, write_json_atomic

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
