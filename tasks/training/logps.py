"""Forward pass → per-sequence completion log-probs, without logits for prompt or pad positions.

A causal LM's ``forward`` projects every position onto the vocabulary; DPO only needs the
completion tokens. ``SequenceLogps`` runs the decoder body to get hidden states (2B, T, H),
gathers the N completion-predicting positions, and applies the LM head to those alone (N, V).
``cross_entropy`` fuses log-softmax and the gather of the target column.

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


class SequenceLogps(nn.Module):
    """(Batch) → (summed completion log-probs (2B,), completion token counts (2B,))."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, gather_pos: torch.Tensor, targets: torch.Tensor,
                seq_ids: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        base = _base_causal_lm(self.lm)
        body = getattr(base, base.base_model_prefix)
        head = base.get_output_embeddings()
        # No attention mask: rows are right-padded, so causal attention never lets a real token
        # see a pad (see data.py); transformers then takes the fast is_causal path.
        hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state  # (2B, T, H)
        picked = hidden.reshape(-1, hidden.size(-1)).index_select(0, gather_pos)  # (N, H)
        logits = head(picked).float()  # (N, V)
        softcap = getattr(base.config, "final_logit_softcapping", None)
        if softcap:  # Gemma-2 style soft-capping, as the model's own forward does
            logits = torch.tanh(logits / softcap) * softcap
        token_logps = -F.cross_entropy(logits, targets, reduction="none")  # (N,)
        sums = torch.zeros(n_tokens.numel(), dtype=token_logps.dtype, device=token_logps.device)
        return sums.index_add(0, seq_ids, token_logps)  # (2B,)


def batch_logps(module: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed completion log-probs of every row of ``batch`` (2B,), on the batch's device."""
    return module(batch.input_ids, batch.gather_pos, batch.targets, batch.seq_ids, batch.n_tokens)
