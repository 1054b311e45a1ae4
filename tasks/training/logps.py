"""Forward pass → per-sequence completion log-probs, without logits for prompt or pad positions.

A causal LM's ``forward`` projects every position onto the vocabulary; DPO only needs the
completion tokens. ``SequenceLogps`` runs the decoder body to get hidden states (2B, T, H),
gathers the N completion-predicting positions, and scores those alone against the LM head.

At a large vocabulary (SmolLM2: V = 49,152) the (N, V) float32 logits are the biggest tensors of a
step — and a plain ``cross_entropy`` keeps its log-softmax (N, V) for the backward and builds an
(N, V) gradient on top. ``target_logps`` never holds more than CHUNK rows of the vocabulary at
once: log p(target) = logit[target] − logsumexp(logits), chunk by chunk, and the backward
recomputes each chunk's logits instead of keeping them (one more (c, H) × (H, V) matmul per chunk,
small next to the decoder body).

It is an ``nn.Module`` so that ``accelerate`` can wrap it (DDP needs the forward to go through
the wrapper for gradient synchronisation) — the wrapped causal LM stays ``self.lm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from preftune.tasks.training.data import Batch


def _base_causal_lm(lm: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers are injected in place)."""
    get_base = getattr(lm, "get_base_model", None)
    return get_base() if callable(get_base) else lm


# Rows of (rows, V) logits alive at once: 256 × 49,152 float32 = 50 MB.
CHUNK = 256


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  softcap: float | None) -> torch.Tensor:
    """(c, H) hidden states → (c, V) float32 logits, soft-capped as the model's own forward does."""
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


class _TargetLogps(torch.autograd.Function):
    """log softmax(hidden · Wᵀ + b)[target] per row, (N,) float32, in chunks of CHUNK rows."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap):
        out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)  # (N,)
        for s in range(0, hidden.size(0), CHUNK):
            logits = _chunk_logits(hidden[s:s + CHUNK], weight, bias, softcap)  # (c, V)
            picked = logits.gather(1, targets[s:s + CHUNK, None]).squeeze(1)  # (c,)
            out[s:s + CHUNK] = picked - torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.softcap = softcap
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (N,)
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, hidden.size(0), CHUNK):
            h, g = hidden[s:s + CHUNK], grad_out[s:s + CHUNK, None].float()  # (c, H), (c, 1)
            logits = _chunk_logits(h, weight, bias, None)  # (c, V), before soft-capping
            capped = torch.tanh(logits / ctx.softcap) * ctx.softcap if ctx.softcap else logits
            # d log p(t) / d logit = onehot(t) − softmax; times the upstream gradient of each row
            d = torch.softmax(capped, dim=-1).mul_(-g)
            d.scatter_add_(1, targets[s:s + CHUNK, None], g)
            if ctx.softcap:  # d cap·tanh(x/cap) / dx = 1 − tanh²(x/cap)
                d.mul_(1.0 - torch.tanh(logits / ctx.softcap) ** 2)
            del logits, capped
            d = d.to(weight.dtype)
            if need_h:
                grad_h[s:s + CHUNK] = d @ weight  # (c, H)
            if need_w:
                grad_w += d.t().float() @ h.float()  # (V, H)
            if need_b:
                grad_b += d.float().sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None)


def target_logps(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                 softcap: float | None = None) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) under the LM head, (N,) float32, without (N, V) logits."""
    weight, bias = head.weight, head.bias
    if torch.is_autocast_enabled(hidden.device.type):  # the head runs in the autocast dtype, as nn.Linear would
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return _TargetLogps.apply(hidden, weight, bias, targets, softcap)


class SequenceLogps(nn.Module):
    """(Batch) → (summed completion log-probs (2B,), completion token counts (2B,))."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, gather_pos: torch.Tensor, targets: torch.Tensor,
                seq_ids: torch.Tensor, n_tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        base = _base_causal_lm(self.lm)
        body = getattr(base, base.base_model_prefix)
        head = base.get_output_embeddings()
        if lengths is not None and input_ids.device.type == "cpu" and input_ids.size(0) > 1:
            picked = self._rows_unpadded(body, input_ids, gather_pos, lengths)
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

    @staticmethod
    def _rows_unpadded(body: nn.Module, input_ids: torch.Tensor, gather_pos: torch.Tensor,
                       lengths: torch.Tensor) -> torch.Tensor:
        """CPU: the body on each row alone, without its padding; the (N, H) gathered hidden states.

        A pair's chosen and rejected rows differ in length (on the public pairs at max length
        512, padding is ~14 % of a batch's tokens, mostly within pairs). On a CPU one row's
        matmuls ((≤ T, H) × (H, ·)) already keep the cores busy, so skipping the pads is time
        saved; on a GPU the batched forward is faster, and that path is kept there.
        """
        width, lens = input_ids.size(1), lengths.tolist()
        # (Σ lengths, H): every row's real positions, rows one after another
        hidden = torch.cat([body(input_ids=input_ids[i:i + 1, :n], use_cache=False).last_hidden_state[0]
                            for i, n in enumerate(lens)])
        starts = torch.tensor([0, *lens[:-1]], device=gather_pos.device).cumsum(0)  # (2B,)
        row, col = gather_pos // width, gather_pos % width  # gather_pos indexes the padded (2B*T) layout
        return hidden.index_select(0, starts[row] + col)  # (N, H)


def batch_logps(module: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed completion log-probs of every row of ``batch`` (2B,), on the batch's device."""
    return module(batch.input_ids, batch.gather_pos, batch.targets, batch.seq_ids, batch.n_tokens, batch.lengths)
