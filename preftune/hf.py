"""Hugging Face model folders, loaded offline: the one tokenizer loader every phase uses.

preftune never downloads: a model is a local folder (or a hub id already in the local cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from preftune.errors import UserError


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
