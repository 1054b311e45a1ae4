"""In-process, batched generation from a local model folder (optionally with a LoRA adapter).

Prompts (message lists) go through the chat template with the generation prompt, are
left-padded so every row's last prompt token sits at the same position, and are decoded greedily
unless a temperature is given; each row stops at EOS.
"""

from __future__ import annotations

from pathlib import Path

import torch

from preftune.hf import load_causal_lm


@torch.inference_mode()
def generate_with(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int = 64,
                  batch_size: int = 16, temperature: float = 0.0, cut: list[bool] | None = None) -> list[str]:
    """Completions of an already loaded (model, tokenizer), in the order of ``prompts``. ``cut``, when
    given, receives per prompt whether its answer stopped at ``max_new_tokens`` without ending.
    A prompt that carries ``tools`` (judges/completions.Conversation) is rendered with them."""
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = [tokenizer.apply_chat_template(m, tools=getattr(m, "tools", None) or None, add_generation_prompt=True,
                                           tokenize=False) for m in prompts]
    ended = _stop_ids(model, tokenizer)
    flags = [False] * len(texts)
    # Longest first: batches of similar lengths waste less padding.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    results: list[str] = [""] * len(texts)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} \
        if temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=pad, **sampling)
        new = out[:, enc["input_ids"].shape[1]:]  # (b, ≤ max_new_tokens)
        for row, i in zip(new, idx, strict=True):
            results[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
            flags[i] = len(row) >= max_new_tokens and not ended.intersection(row.tolist())
    if cut is not None:
        cut[:] = flags
    return results


def _stop_ids(model, tokenizer) -> set[int]:
    """Every token id that ends an answer: the tokenizer's EOS and the generation config's list."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return {i for i in [*ids, tokenizer.eos_token_id] if i is not None}


def generate_completions(model_path: str | Path, prompts: list[list[dict]], *,
                         adapter_path: str | Path | None = None, max_new_tokens: int = 64,
                         batch_size: int = 16, temperature: float = 0.0) -> list[str]:
    """Load the model (+ adapter) once and complete every prompt; see ``generate_with``."""
    model, tokenizer = load_causal_lm(model_path, adapter_path)
    return generate_with(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, temperature=temperature)
