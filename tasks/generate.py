"""In-process, batched generation from a local model folder (optionally with a LoRA adapter).

Prompts (message lists) go through the chat template with the generation prompt (``prompt_ids``,
as the trainer and a run's server render them), are left-padded so every row's last prompt token
sits at the same position, and are decoded greedily unless a temperature is given; each row stops
at any end token the generation config lists, or EOS (``stop_token_ids``, as a run's server stops).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from preftune.client import ChatClient
from preftune.endpoint import Endpoint
from preftune.hf import load_causal_lm, prompt_ids, stop_token_ids


@torch.inference_mode()
def generate_with(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int = 64,
                  batch_size: int = 16, temperature: float = 0.0, cut: list[bool] | None = None) -> list[str]:
    """Completions of an already loaded (model, tokenizer), in the order of ``prompts``. ``cut``, when
    given, receives per prompt whether its answer stopped at ``max_new_tokens`` without ending.
    A prompt that carries ``tools`` (judges/completions.Conversation) is rendered with them."""
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # as the trainer and a run's server render them (a Conversation carries its tools)
    rendered = [prompt_ids(tokenizer, m, getattr(m, "tools", None)) for m in prompts]
    stop = stop_token_ids(model, tokenizer)  # every end token, as a run's server stops (not EOS alone)
    flags = [False] * len(rendered)
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
            end = next((j for j, t in enumerate(ids) if t in stop), None)
            results[i] = tokenizer.decode(ids[:len(ids) if end is None else end], skip_special_tokens=True).strip()
            flags[i] = end is None and len(ids) >= max_new_tokens  # stopped by the limit, not by an end token
    if cut is not None:
        cut[:] = flags
    return results


def generate_completions(model_path: str | Path, prompts: list[list[dict]], *,
                         adapter_path: str | Path | None = None, max_new_tokens: int = 64,
                         batch_size: int = 16, temperature: float = 0.0) -> list[str]:
    """Load the model (+ adapter) once and complete every prompt; see ``generate_with``."""
    model, tokenizer = load_causal_lm(model_path, adapter_path)
    return generate_with(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, temperature=temperature)


def answer_with_backend(endpoint: Endpoint, prompts: list[list[dict]], *, max_new_tokens: int = 64,
                        temperature: float = 0.0) -> list[tuple[str, bool] | None]:
    """Completions from a server preftune started (phase 5 on vLLM: ``endpoint.model`` names the
    candidate's LoRA module), in the order of ``prompts``, each with whether it was cut at
    ``max_new_tokens`` (finish_reason "length"); None where a request failed. Greedy and stripped as
    ``generate_with``'s, so both paths fill the same completions cache."""
    client = ChatClient(endpoint, concurrency=endpoint.concurrency or 16, timeout=600.0)

    async def go() -> list:
        try:
            return await client.chat_many(prompts, max_tokens=max_new_tokens, temperature=temperature)
        finally:
            await client.aclose()

    return [(o.text.strip(), o.finish_reason == "length") if hasattr(o, "text") else None
            for o in asyncio.run(go())]


@contextlib.contextmanager
def small_model_threads(model) -> Iterator[None]:
    """One torch thread while a small model generates on CPU (as preftune's server gives it,
    preftune/backends.py): its step is Python overhead, and on a loaded machine two OpenMP threads
    spin against each other. tiny-llama, 64 prompts x 64 tokens, load average 22 on 2 cores:
    1.2 s on one thread, 80.9 s on two. The thread count is restored after."""
    from preftune.backends import BATCHING_MIN_PARAMS

    small = model.device.type == "cpu" and sum(p.numel() for p in model.parameters()) < BATCHING_MIN_PARAMS
    before = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
