"""The chunked target log-probs against the plain log-softmax they replace, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from preftune.tasks.training import logps as logps_mod
from preftune.tasks.training.logps import target_logps


@pytest.mark.parametrize("saved", [True, False], ids=["softmax-kept", "recomputed"])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("bias", [False, True])
def test_target_logps_equal_log_softmax_gather_with_gradients(monkeypatch, softcap, bias, saved):
    monkeypatch.setattr(logps_mod, "CHUNK", 7)  # several chunks and a ragged last one (N = 30)
    # kept: the forward's (N, V) softmax serves the backward (soft-capping always recomputes)
    monkeypatch.setattr(logps_mod, "SAVED_PROBS_BYTES", 2**30 if saved else 0)
    gen = torch.Generator().manual_seed(0)
    n, h, v = 30, 16, 50
    head = nn.Linear(h, v, bias=bias).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=gen, dtype=torch.float64))
        if bias:
            head.bias.copy_(torch.randn(v, generator=gen, dtype=torch.float64))
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen, dtype=torch.float64)

    def plain():
        logits = head(hidden)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)

    expected = plain()
    grads_expected = torch.autograd.grad((expected * upstream).sum(), [hidden, *head.parameters()])
    # float64 in, float32 out (the log-probs are always float32): compare at float32 precision
    got = target_logps(hidden, head, targets, softcap)
    assert got.dtype == torch.float32 and got.shape == (n,)
    kept = got.grad_fn.saved_tensors[-1]  # the (N, V) softmax, or None when the backward recomputes it
    assert (kept is not None) == (saved and not softcap)
    grads = torch.autograd.grad((got * upstream.float()).sum(), [hidden, *head.parameters()])
    assert_close(got, expected.float(), rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, grads_expected, strict=True):
        assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_target_logps_under_no_grad_needs_no_backward_state():
    head = nn.Linear(8, 20, bias=False)
    hidden = torch.randn(5, 8)
    with torch.no_grad():
        out = target_logps(hidden, head, torch.zeros(5, dtype=torch.long))
    assert out.grad_fn is None
    assert_close(out, F.log_softmax(head(hidden), -1)[:, 0])


def _tiny_pair_batch(base_model, marker_data, n: int):
    """The tiny zoo model, a SequenceLogps over it, a batch of its first n marker pairs, and a list
    that collects the tokens the decoder body is given per call."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.tasks.training.data import collate, load_pair_records, tokenize_pairs
    from preftune.tasks.training.logps import SequenceLogps

    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    pairs = tokenize_pairs(load_pair_records(marker_data["small"])[:n], tokenizer, max_length=512)
    batch = collate(pairs, list(range(n)), pad_id=tokenizer.pad_token_id)
    fed: list[int] = []
    model.model.register_forward_pre_hook(lambda _, args, kwargs: fed.append(kwargs["input_ids"].numel()),
                                          with_kwargs=True)
    return model, SequenceLogps(model), batch, fed


def test_rows_without_padding_and_shared_prompts_equal_the_padded_batch(base_model, marker_data):
    """On CPU each row runs alone without its pads, and each pair's prompt runs once for both rows:
    the same log-probs and gradients as the padded batch."""
    from preftune.batching import plain_cache

    model, module, batch, fed = _tiny_pair_batch(base_model, marker_data, 3)
    assert plain_cache(model.config)  # so the prompt-sharing path is the one tested below
    assert len(set(batch.lengths.tolist())) > 1  # rows of different lengths: some are padded
    assert batch.prompt_lengths.min() > 1  # prompts worth sharing
    params = [p for p in model.parameters() if p.requires_grad]
    args = (batch.input_ids, batch.gather_pos, batch.targets, batch.seq_ids, batch.n_tokens)
    padded = module(*args)
    grads_padded = torch.autograd.grad(padded.sum(), params)
    every_row, prompts_once = batch.lengths.sum().item(), batch.lengths.sum().item() - batch.prompt_lengths.sum().item()
    for extra, tokens in (((batch.lengths,), every_row), ((batch.lengths, batch.prompt_lengths), prompts_once)):
        fed.clear()
        unpadded = module(*args, *extra)
        assert sum(fed) == tokens
        grads_unpadded = torch.autograd.grad(unpadded.sum(), params)
        assert_close(unpadded, padded, rtol=1e-5, atol=1e-4)
        for a, b in zip(grads_unpadded, grads_padded, strict=True):
            assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_gradient_checkpointing_runs_every_row_whole(base_model, marker_data):
    """Under gradient checkpointing transformers drops the KV cache in training, so the prompt is not
    shared there: every row runs whole, and the log-probs equal the padded batch's."""
    model, module, batch, fed = _tiny_pair_batch(base_model, marker_data, 2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    args = (batch.input_ids, batch.gather_pos, batch.targets, batch.seq_ids, batch.n_tokens)
    got = module(*args, batch.lengths, batch.prompt_lengths)
    assert sum(fed) == batch.lengths.sum().item()  # whole rows, prompts included
    assert_close(got, module(*args), rtol=1e-5, atol=1e-4)
