"""In-process, batched generation from a local model folder (optionally with a LoRA adapter).

Prompts (message lists) go through the chat template with the generation prompt (``prompt_ids``,
as the trainer and a run's server render them), are left-padded so every row's last prompt token
sits at the same position, and are decoded greedily unless a temperature is given; each row stops
at any end token the generation config lists, or EOS (``stop_token_ids``, as a run's server stops).
"""

from __future__ import annotations

from pathlib import Path

import torch

from preftune.hf import load_causal_lm, prompt_ids, stop_token_ids


@torch.inference_mode()
def generate_with(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int = 64,
                  batch_size: int = 16, temperature: float = 0.0) -> list[str]:
    """Completions of an already loaded (model, tokenizer), in the order of ``prompts``."""
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rendered = [prompt_ids(tokenizer, m) for m in prompts]  # as the trainer and a run's server render them
    stop = stop_token_ids(model, tokenizer)  # every end token, as a run's server stops (not EOS alone)
    # Longest first: batches of similar lengths waste less padding.
    order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]), reverse=True)
    results: list[str] = [""] * len(rendered)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} \
        if temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer.pad({"input_ids": [rendered[i] for i in idx]}, return_tensors="pt").to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=stop,
                             pad_token_id=pad, **sampling)
        new = out[:, enc["input_ids"].shape[1]:]  # (b, ≤ max_new_tokens)
        for row, i in zip(new, idx, strict=True):
            ids = row.tolist()  # the answer ends before its first end token (not kept, as a run's server does)
            results[i] = tokenizer.decode(ids[:next((j for j, t in enumerate(ids) if t in stop), len(ids))],
                                          skip_special_tokens=True).strip()
    return results


def generate_completions(model_path: str | Path, prompts: list[list[dict]], *,
                         adapter_path: str | Path | None = None, max_new_tokens: int = 64,
                         batch_size: int = 16, temperature: float = 0.0) -> list[str]:
    """Load the model (+ adapter) once and complete every prompt; see ``generate_with``."""
    model, tokenizer = load_causal_lm(model_path, adapter_path)
    return generate_with(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, temperature=temperature)
