"""Pairs → token ids → padded batches, the one collator the trainer (and its tests) use.

A pair becomes three token lists: the prompt (messages through the chat template with the
generation prompt), the chosen and the rejected completion (each + EOS). Over ``max_length``
the prompt is cut from the LEFT (the latest turns matter most) and completions from the RIGHT.

A batch of B pairs is ONE (2B, T) tensor: rows 0..B-1 chosen, B..2B-1 rejected, right-padded.
Right padding lets the model run without an attention mask: under causal attention a real token
never sees a pad that comes after it, so the fast ``is_causal`` attention path applies.
Instead of labels over all T positions the collator lists only the completion positions
(``gather_pos``: flat index of the hidden state that predicts each completion token), so the
vocabulary projection runs on completion tokens only — never on the prompt or padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from preftune.hf import prompt_ids

# Pairs per sort bucket, in batches: shuffle, then sort by length inside buckets of this many
# batches, so batches hold similar lengths (little padding) yet the order still changes per epoch.
BUCKET_BATCHES = 16


@dataclass(frozen=True)
class TokenizedPair:
    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    truncated: bool

    @property
    def length(self) -> int:
        """Longest row this pair puts in a batch."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))

    @property
    def tokens(self) -> int:
        """Real (non-pad) tokens this pair sends through the model: both rows."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


@dataclass
class Batch:
    """One concatenated chosen+rejected batch. N = completion tokens in the batch."""

    input_ids: torch.Tensor  # (2B, T) long, right-padded
    gather_pos: torch.Tensor  # (N,) flat index into (2B*T) of the position predicting each token
    targets: torch.Tensor  # (N,) the completion token ids
    seq_ids: torch.Tensor  # (N,) row (0..2B-1) each completion token belongs to
    n_tokens: torch.Tensor  # (2B,) completion tokens per row
    lengths: torch.Tensor  # (2B,) real (non-pad) tokens per row
    prompt_lengths: torch.Tensor  # (B,) prompt tokens of each pair (both its rows start with them)
    index: torch.Tensor  # (B,) dataset index of each pair (for reference log-prob lookup)
    real_tokens: int  # non-pad tokens in input_ids

    @property
    def pairs(self) -> int:
        return self.index.numel()

    def to(self, device: torch.device | str) -> Batch:
        move = {k: v.to(device, non_blocking=True) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return Batch(**move, real_tokens=self.real_tokens)


def load_pair_records(path: Path) -> list[dict]:
    """Canonical pairs from any accepted pair format (UserError naming file:line otherwise)."""
    from preftune.records import load_pairs

    return load_pairs(path)


def _last_content(messages: list[dict]) -> str:
    content = messages[-1].get("content") or ""
    return content if isinstance(content, str) else str(content)


def completion_ids(tokenizer, text: str) -> list[int]:
    """The completion's tokens and exactly ONE EOS after them.

    A text that already ends with the EOS string (some exports append it) would otherwise end
    with two EOS tokens — a silent error: the model would learn to emit EOS after EOS.
    """
    # verbose=False: a long completion is truncated below, no need for the over-length warning
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    while ids and ids[-1] == eos:
        ids.pop()
    return ids + [eos]


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
             max_prompt_length: int | None) -> tuple[list[int], list[int], list[int], bool]:
    """Fit prompt + the longer completion into ``max_length``.

    The prompt is cut from the left to ``max_prompt_length`` first; if still too long, the
    completion keeps at least half of ``max_length`` (or its whole length if shorter) and the
    prompt keeps the rest, cut from the left; completions are cut from the right.
    """
    cut = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, cut = prompt[-max_prompt_length:], True
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest > max_length:
        completion_budget = max(max_length - len(prompt), min(longest, max_length // 2))
        prompt_budget = max_length - completion_budget
        if len(prompt) > prompt_budget:
            prompt = prompt[len(prompt) - prompt_budget:]
        chosen, rejected, cut = chosen[:completion_budget], rejected[:completion_budget], True
    return prompt, chosen, rejected, cut


def tokenize_pairs(records: list[dict], tokenizer, max_length: int,
                   max_prompt_length: int | None = None) -> list[TokenizedPair]:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; completions must end with one")
    out = []
    for rec in records:
        prompt = prompt_ids(tokenizer, rec["input"]["messages"], rec["input"].get("tools"))
        chosen = completion_ids(tokenizer, _last_content(rec["preferred_output"]))
        rejected = completion_ids(tokenizer, _last_content(rec["non_preferred_output"]))
        p, c, r, cut = truncate(prompt, chosen, rejected, max_length, max_prompt_length)
        out.append(TokenizedPair(tuple(p), tuple(c), tuple(r), cut))
    return out


def collate(pairs: list[TokenizedPair], index: list[int], pad_id: int) -> Batch:
    """B pairs → one (2B, T) batch, chosen rows first; see the module docstring."""
    rows = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    prompt_lens = [len(p.prompt) for p in pairs] * 2
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    gather, targets, seq_ids, n_tokens = [], [], [], []
    for i, (row, plen) in enumerate(zip(rows, prompt_lens, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        # token t (a completion token) is predicted by the hidden state at t-1
        gather.extend(range(i * width + plen - 1, i * width + len(row) - 1))
        targets.extend(row[plen:])
        seq_ids.extend([i] * (len(row) - plen))
        n_tokens.append(len(row) - plen)
    return Batch(
        input_ids=input_ids,
        gather_pos=torch.tensor(gather, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        seq_ids=torch.tensor(seq_ids, dtype=torch.long),
        n_tokens=torch.tensor(n_tokens, dtype=torch.long),
        lengths=torch.tensor([len(r) for r in rows], dtype=torch.long),
        prompt_lengths=torch.tensor([len(p.prompt) for p in pairs], dtype=torch.long),
        index=torch.tensor(index, dtype=torch.long),
        real_tokens=sum(len(r) for r in rows),
    )


def plan_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches of dataset indices, in a seeded order that changes per epoch."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    bucket = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start:start + bucket], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Fixed batches sorted by length (reference and evaluation passes: order does not matter)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
