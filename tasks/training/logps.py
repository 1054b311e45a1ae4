"""Forward pass → per-sequence completion log-probs, without logits for prompt or pad positions.

A causal LM's ``forward`` projects every position onto the vocabulary; DPO only needs the
completion tokens. ``SequenceLogps`` runs the decoder body to get hidden states (2B, T, H),
gathers the N completion-predicting positions, and scores those alone against the LM head.

At a large vocabulary (SmolLM2: V = 49,152) the (N, V) float32 logits are the biggest tensors of a
step — and a plain ``cross_entropy`` keeps its log-softmax (N, V) for the backward and builds an
(N, V) gradient on top. ``target_logps`` computes log p(target) = logit[target] − logsumexp(logits)
CHUNK rows at a time; for the backward it keeps the (N, V) softmax only while that is small (one
CPU pair), and otherwise recomputes each chunk's logits (one more (c, H) × (H, V) matmul).

On a CPU the body runs one row at a time without padding, and a pair's prompt goes through it once
for both of its rows (``_shared_prompt_rows``).

It is an ``nn.Module`` so that ``accelerate`` can wrap it (DDP needs the forward to go through
the wrapper for gradient synchronisation) — the wrapped causal LM stays ``self.lm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from preftune.batching import plain_cache
from preftune.tasks.training.data import Batch


def _base_causal_lm(lm: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers are injected in place)."""
    get_base = getattr(lm, "get_base_model", None)
    return get_base() if callable(get_base) else lm


# Rows of (rows, V) logits alive at once: 256 × 49,152 float32 = 50 MB.
CHUNK = 256
# Largest (N, V) float32 softmax the forward keeps for the backward (see _TargetLogps).
SAVED_PROBS_BYTES = 256 * 2**20


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  softcap: float | None) -> torch.Tensor:
    """(c, H) hidden states → (c, V) float32 logits, soft-capped as the model's own forward does."""
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


class _TargetLogps(torch.autograd.Function):
    """log softmax(hidden · Wᵀ + b)[target] per row, (N,) float32, in chunks of CHUNK rows.

    The backward needs softmax(logits). When (N, V) float32 fits in SAVED_PROBS_BYTES (a CPU
    forward is one pair: N ≈ 500 completion tokens × 49,152 ≈ 100 MB) the forward keeps it and
    the backward skips recomputing the logits — one (N, H) × (H, V) matmul saved, ~8 % of a step
    on the real model. Larger N (a GPU's whole micro-batch) or soft-capping: recompute per chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, keep):
        n, v = hidden.size(0), weight.size(0)
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (N,)
        probs = torch.empty(n, v, dtype=torch.float32, device=hidden.device) if keep else None  # (N, V)
        for s in range(0, n, CHUNK):
            logits = _chunk_logits(hidden[s:s + CHUNK], weight, bias, softcap)  # (c, V)
            picked = logits.gather(1, targets[s:s + CHUNK, None]).squeeze(1)  # (c,)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            out[s:s + CHUNK] = picked - lse
            if keep:
                torch.exp(logits.sub_(lse[:, None]), out=probs[s:s + CHUNK])
        ctx.save_for_backward(hidden, weight, bias, targets, probs)
        ctx.softcap = softcap
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (N,)
        hidden, weight, bias, targets, probs = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, hidden.size(0), CHUNK):
            h, g = hidden[s:s + CHUNK], grad_out[s:s + CHUNK, None].float()  # (c, H), (c, 1)
            # d log p(t) / d logit = onehot(t) − softmax; times the upstream gradient of each row
            if probs is not None:
                logits, d = None, probs[s:s + CHUNK] * -g
            else:
                logits = _chunk_logits(h, weight, bias, None)  # (c, V), before soft-capping
                capped = torch.tanh(logits / ctx.softcap) * ctx.softcap if ctx.softcap else logits
                d = torch.softmax(capped, dim=-1).mul_(-g)
                del capped
            d.scatter_add_(1, targets[s:s + CHUNK, None], g)
            if ctx.softcap:  # d cap·tanh(x/cap) / dx = 1 − tanh²(x/cap)
                d.mul_(1.0 - torch.tanh(logits / ctx.softcap) ** 2)
            del logits
            d = d.to(weight.dtype)
            if need_h:
                grad_h[s:s + CHUNK] = d @ weight  # (c, H)
            if need_w:
                grad_w += d.t().float() @ h.float()  # (V, H)
            if need_b:
                grad_b += d.float().sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


def target_logps(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                 softcap: float | None = None) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) under the LM head, (N,) float32, never (N, V) logits at once."""
    weight, bias = head.weight, head.bias
    if torch.is_autocast_enabled(hidden.device.type):  # the head runs in the autocast dtype, as nn.Linear would
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    keep = grads and not softcap and hidden.size(0) * weight.size(0) * 4 <= SAVED_PROBS_BYTES
    return _TargetLogps.apply(hidden, weight, bias, targets, softcap, keep)


class SequenceLogps(nn.Module):
    """(Batch) → (summed completion log-probs (2B,), completion token counts (2B,))."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self._cache_is_plain: bool | None = None  # the model's cache kind, looked up on the first CPU forward

    def forward(self, input_ids: torch.Tensor, gather_pos: torch.Tensor, targets: torch.Tensor,
                seq_ids: torch.Tensor, n_tokens: torch.Tensor, lengths: torch.Tensor | None = None,
                prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
        base = _base_causal_lm(self.lm)
        body = getattr(base, base.base_model_prefix)
        head = base.get_output_embeddings()
        if lengths is not None and input_ids.device.type == "cpu" and input_ids.size(0) > 1:
            if self._cache_is_plain is None:
                self._cache_is_plain = plain_cache(base.config)
            # Not under gradient checkpointing: transformers' layers drop the KV cache there in
            # training, so the rejected completion would not see its prompt.
            share = prompt_lengths is not None and self._cache_is_plain \
                and not getattr(base, "is_gradient_checkpointing", False)
            hidden, starts = _shared_prompt_rows(body, input_ids, lengths, prompt_lengths) if share \
                else _unpadded_rows(body, input_ids, lengths)
            width = input_ids.size(1)
            row, col = gather_pos // width, gather_pos % width  # gather_pos indexes the padded (2B*T) layout
            picked = hidden.index_select(0, starts[row] + col)  # (N, H)
        else:
            # No attention mask: rows are right-padded, so causal attention never lets a real token
            # see a pad (see data.py); transformers then takes the fast is_causal path.
            hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state  # (2B, T, H)
            picked = hidden.reshape(-1, hidden.size(-1)).index_select(0, gather_pos)  # (N, H)
        del hidden  # only the N picked rows go on (the body's autograd graph keeps what it needs)
        # Gemma-2 style soft-capping, as the model's own forward does
        softcap = getattr(base.config, "final_logit_softcapping", None)
        token_logps = target_logps(picked, head, targets, softcap)  # (N,) float32
        sums = torch.zeros(n_tokens.numel(), dtype=token_logps.dtype, device=token_logps.device)
        return sums.index_add(0, seq_ids, token_logps)  # (2B,)


def _row_starts(lengths: list[int]) -> torch.Tensor:
    """(2B,) offset of each row in the rows-one-after-another layout."""
    return torch.tensor([0, *lengths[:-1]]).cumsum(0)


def _unpadded_rows(body: nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU: the body on each row alone, without its padding → (Σ lengths, H) hidden states, (2B,) row starts.

    A pair's chosen and rejected rows differ in length (on the public pairs at max length
    512, padding is ~14 % of a batch's tokens, mostly within pairs). On a CPU one row's
    matmuls ((≤ T, H) × (H, ·)) already keep the cores busy, so skipping the pads is time
    saved; on a GPU the batched forward is faster, and that path is kept there.
    """
    lens = lengths.tolist()
    hidden = torch.cat([body(input_ids=input_ids[i:i + 1, :n], use_cache=False).last_hidden_state[0]
                        for i, n in enumerate(lens)])
    return hidden, _row_starts(lens)


def _shared_prompt_rows(body: nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor,
                        prompt_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU: like ``_unpadded_rows``, but each pair's prompt goes through the body once, not twice.

    A pair's chosen and rejected rows start with the same prompt (36 % of the rows' tokens on the
    public pairs at max length 512). The chosen row runs whole and keeps its keys and values; the
    rejected row runs only its completion, attending to the chosen row's first P keys and values
    (a causal model's prompt states do not depend on what follows them). Its prompt hidden states
    are the chosen row's. Gradients from both completions flow back into the one prompt pass.
    """
    from transformers import DynamicCache

    lens, plens = lengths.tolist(), prompt_lengths.tolist()
    pairs = len(plens)
    chosen_h, rejected_h = [], []
    for i, p in enumerate(plens):
        n_c, n_r = lens[i], lens[pairs + i]
        cache = DynamicCache(config=body.config)
        chosen_h.append(body(input_ids=input_ids[i:i + 1, :n_c], past_key_values=cache,
                             use_cache=True).last_hidden_state[0])  # (n_c, H)
        if cache.get_seq_length() != n_c:  # the body kept no cache: never score a prompt-less row
            raise RuntimeError(f"the decoder kept {cache.get_seq_length()} of {n_c} positions in its KV cache")
        prompt_kv = [(k[:, :, :p], v[:, :, :p]) for k, v, _ in cache]
        tail = body(input_ids=input_ids[pairs + i:pairs + i + 1, p:n_r],
                    past_key_values=DynamicCache(prompt_kv, config=body.config),
                    use_cache=True).last_hidden_state[0]  # (n_r - P, H)
        rejected_h.append(torch.cat([chosen_h[-1][:p], tail]))
    return torch.cat(chosen_h + rejected_h), _row_starts(lens)


def batch_logps(module: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed completion log-probs of every row of ``batch`` (2B,), on the batch's device."""
    return module(batch.input_ids, batch.gather_pos, batch.targets, batch.seq_ids, batch.n_tokens, batch.lengths,
                  batch.prompt_lengths)
