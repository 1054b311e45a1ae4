"""The training loop, top to bottom: micro-batches → loss → backward → clip → AdamW step → log.

Plain torch under ``accelerate`` (device placement, bf16 autocast on GPU, DDP when launched on
several processes: ``torchrun`` / ``accelerate launch``, gloo on CPU). Under DDP each process
trains on its shard of every step's batches and the logged statistics are summed over all of them. Batches are planned per epoch from (seed, epoch), so a resumed job replays
exactly the batches a never-interrupted one would have seen.

On a CPU, a micro-batch of B pairs is run PAIRS_PER_FORWARD pairs at a time (forward, loss,
backward), its gradients summed. Every loss here is per pair (a pair's loss depends on its own two rows only), so
the gradient is the batch mean's, unchanged; but the activations kept for the backward are those
of PAIRS_PER_FORWARD pairs, not B (at 49k vocabulary and 512 tokens, the decoder's activations are
most of a step's memory), and each forward is padded to its own longest row only. On a GPU the
whole micro-batch goes in one forward: there, small forwards would leave the device idle.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from preftune.tasks.training.data import TokenizedPair, collate, plan_batches, sorted_batches
from preftune.tasks.training.logps import batch_logps
from preftune.tasks.training.losses import LossSettings, SeqLogps, preference_loss

# Pairs per forward/backward inside a micro-batch, by device type (see the module docstring); a
# device not listed runs the whole micro-batch at once. 1 = each pair's chosen and rejected rows.
PAIRS_PER_FORWARD = {"cpu": 1}


@dataclass
class TrainState:
    """Everything the loop needs to continue where it stopped (saved in checkpoints)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    group: int = 0  # optimizer steps done inside the current epoch
    samples: int = 0  # pairs trained on
    tokens: int = 0  # non-pad tokens trained on (both rows of each pair)
    seconds: float = 0.0  # time inside training steps
    epoch_loss_sum: float = 0.0  # loss summed over the current epoch's pairs
    epoch_pairs: int = 0
    last_epoch_loss: float | None = None  # mean loss over the last finished epoch

    def as_dict(self) -> dict:
        return asdict(self)


def lr_lambda(total_steps: int, warmup_ratio: float, kind: str) -> Callable[[int], float]:
    """Linear warm-up from 0, then linear or cosine decay to 0 (multiplier of the peak lr)."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor


def steps_per_epoch(n_pairs: int, batch_size: int, grad_accum: int, world: int) -> int:
    batches = math.ceil(n_pairs / batch_size) // world if world > 1 else math.ceil(n_pairs / batch_size)
    return max(1, math.ceil(batches / grad_accum))


def seq_logps(module, batch, device) -> SeqLogps:
    """Policy log-probs of a collated batch, split into chosen / rejected halves."""
    batch = batch.to(device)
    logps = batch_logps(module, batch)  # (2B,)
    b = batch.pairs
    return SeqLogps(logps[:b], logps[b:], batch.n_tokens[:b], batch.n_tokens[b:])


def reference_of(ref: dict | None, policy: SeqLogps, index: torch.Tensor) -> SeqLogps | None:
    if ref is None:
        return None
    dev = policy.chosen.device
    return SeqLogps(ref["chosen"][index].to(dev), ref["rejected"][index].to(dev),
                    policy.chosen_tokens, policy.rejected_tokens)


@torch.no_grad()
def dataset_logps(module, pairs: list[TokenizedPair], batch_size: int, pad_id: int, device,
                  progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of every pair, (n,) chosen and (n,) rejected, in data order."""
    chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    for idx in sorted_batches([p.length for p in pairs], batch_size):
        out = seq_logps(module, collate([pairs[i] for i in idx], idx, pad_id), device)
        chosen[idx], rejected[idx] = out.chosen.float().cpu(), out.rejected.float().cpu()
        if progress:
            progress(len(idx))
    return chosen, rejected


@torch.no_grad()
def evaluate(module, settings: LossSettings, pairs: list[TokenizedPair], ref: dict | None,
             batch_size: int, pad_id: int, device) -> dict:
    """Mean loss and reward accuracy (chosen reward > rejected reward) over held-out pairs."""
    module.eval()
    chosen, rejected = dataset_logps(module, pairs, batch_size, pad_id, device)
    n_tok_c = torch.tensor([len(p.chosen) for p in pairs])
    n_tok_r = torch.tensor([len(p.rejected) for p in pairs])
    policy = SeqLogps(chosen, rejected, n_tok_c, n_tok_r)
    reference = SeqLogps(ref["chosen"], ref["rejected"], n_tok_c, n_tok_r) if ref else None
    out = preference_loss(settings, policy, reference)
    margins = out.chosen_rewards - out.rejected_rewards
    return {"eval_loss": out.losses.mean().item(),
            "eval_reward_accuracy": (margins > 0).float().mean().item(),
            "eval_reward_margin": margins.mean().item(), "eval_pairs": len(pairs)}


class Window:
    """Sums of batch statistics between two metrics.jsonl lines (over every process's pairs)."""

    KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "logps/ref_chosen", "logps/ref_rejected", "kl/ref")
    REF_KEYS = KEYS[-3:]  # logged only for losses with a reference (tasks/training/health.py reads them)

    def __init__(self, has_ref: bool = False) -> None:
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.has_ref = has_ref
        self.pairs, self.tokens, self.seconds, self.grad_norm, self.lr = 0, 0, 0.0, 0.0, 0.0

    @classmethod
    def part_sums(cls, out, policy: SeqLogps, reference: SeqLogps | None = None) -> torch.Tensor:
        """(len(KEYS),) sums of one forward's per-pair statistics, in KEYS order (reference ones 0 without one)."""
        margins = out.chosen_rewards - out.rejected_rewards
        values = [out.losses, out.chosen_rewards, out.rejected_rewards, margins, (margins > 0).float(),
                  policy.chosen, policy.rejected]
        if reference is None:
            values += [torch.zeros_like(policy.chosen)] * 3
        else:
            values += [reference.chosen, reference.rejected, kl_k3(policy, reference)]
        return torch.stack([v.detach().float().sum() for v in values]).cpu()  # one device sync

    def add(self, sums: torch.Tensor, pairs: int, tokens: int) -> None:
        for key, value in zip(self.KEYS, sums.tolist(), strict=True):
            self.sums[key] += value
        self.pairs += pairs
        self.tokens += tokens

    def row(self, state: TrainState, epoch_progress: float) -> dict:
        row = {k: v / max(1, self.pairs) for k, v in self.sums.items() if self.has_ref or k not in self.REF_KEYS}
        row.update({"lr": self.lr, "grad_norm": self.grad_norm, "tokens/s": self.tokens / max(self.seconds, 1e-9),
                    "step": state.step, "epoch": round(epoch_progress, 4)})
        return row


def kl_k3(policy: SeqLogps, reference: SeqLogps) -> torch.Tensor:
    """(B,) KL(policy ‖ reference) estimate per token on each pair's completions: the k3 estimator
    exp(x) − 1 − x with x = (reference − policy log-prob) / tokens, mean of the chosen and rejected rows.
    On the data's answers, not on policy samples: a drift gauge, ≥ 0, exactly 0 at the start."""
    def k3(pol, ref, n):
        x = (ref.float() - pol.float()) / n.clamp(min=1).to(pol.device)
        return torch.expm1(x) - x

    return 0.5 * (k3(policy.chosen, reference.chosen, policy.chosen_tokens)
                  + k3(policy.rejected, reference.rejected, policy.rejected_tokens))


def _global_sums(acc, local: torch.Tensor) -> torch.Tensor:
    """Sum a step's statistics over every process (DDP), so each process logs and checkpoints the
    same global figures, not its own shard's."""
    if acc.num_processes == 1:
        return local
    return acc.reduce(local.to(acc.device), reduction="sum").cpu()


def train_step(ctx, group: list[list[int]], window: Window, state: TrainState) -> None:
    """One optimizer step over ``group`` (grad_accum micro-batches of dataset indices)."""
    acc, module = ctx.accelerator, ctx.module
    t0 = time.perf_counter()
    # (pair indices of one forward, number of pairs of the micro-batch it belongs to)
    step = PAIRS_PER_FORWARD.get(acc.device.type) or max(len(idx) for idx in group)
    parts = [(idx[k:k + step], len(idx)) for idx in group for k in range(0, len(idx), step)]
    # the step's statistics: Window.KEYS sums, then pairs and real tokens
    local = torch.zeros(len(Window.KEYS) + 2, dtype=torch.float64)
    for i, (idx, micro_pairs) in enumerate(parts):
        batch = collate([ctx.pairs[j] for j in idx], idx, ctx.pad_id)
        last = i == len(parts) - 1  # DDP: gradients are synchronised on the group's last backward
        with nullcontext() if last else acc.no_sync(module):
            policy = seq_logps(module, batch, acc.device)
            reference = reference_of(ctx.ref, policy, batch.index)
            out = preference_loss(ctx.settings, policy, reference)
            # this part's share of (mean over its micro-batch's pairs) / micro-batches per step;
            # DDP then averages over processes: the mean of every micro-batch mean of the step
            acc.backward(out.losses.sum() / (micro_pairs * len(group)))
        local[:len(Window.KEYS)] += Window.part_sums(out, policy, reference).double()
        local[-2:] += torch.tensor([batch.pairs, batch.real_tokens], dtype=torch.float64)
    sums = _global_sums(acc, local)
    pairs, tokens = int(sums[-2]), int(sums[-1])
    window.add(sums[:len(Window.KEYS)], pairs, tokens)
    state.epoch_loss_sum += float(sums[0])
    state.epoch_pairs += pairs
    state.samples += pairs
    state.tokens += tokens
    max_norm = ctx.cfg.max_grad_norm if ctx.cfg.max_grad_norm > 0 else float("inf")
    window.grad_norm = float(acc.clip_grad_norm_(ctx.params, max_norm))
    window.lr = ctx.optimizer.param_groups[0]["lr"]  # the lr this step used
    ctx.optimizer.step()
    ctx.scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.group += 1
    elapsed = time.perf_counter() - t0
    state.seconds += elapsed
    window.seconds += elapsed


def train_loop(ctx, state: TrainState, on_log: Callable[[dict], None],
               on_step: Callable[[TrainState], None]) -> TrainState:
    """Run the remaining epochs from ``state``; ``on_step`` after every optimizer step."""
    cfg, acc = ctx.cfg, ctx.accelerator
    lengths = [p.length for p in ctx.pairs]
    while state.epoch < cfg.epochs:
        batches = plan_batches(lengths, cfg.batch_size, cfg.seed, state.epoch)
        if acc.num_processes > 1:
            # Process r takes batches r, r+W, r+2W… so optimizer step s of W processes covers the
            # same contiguous batches as step s of one process with grad_accum × W: the same
            # global batch, the same losses. Every process gets the same number of batches.
            usable = len(batches) // acc.num_processes * acc.num_processes
            batches = batches[:usable][acc.process_index::acc.num_processes]
        groups = [batches[i:i + cfg.grad_accum] for i in range(0, len(batches), cfg.grad_accum)]
        ctx.module.train()
        window = Window(ctx.ref is not None)
        while state.group < len(groups):
            train_step(ctx, groups[state.group], window, state)
            if state.step % cfg.log_every == 0 or state.group == len(groups):
                on_log(window.row(state, state.epoch + state.group / len(groups)))
                window = Window(ctx.ref is not None)
            if state.group == len(groups):  # epoch done: roll over before the checkpoint
                state.last_epoch_loss = state.epoch_loss_sum / max(1, state.epoch_pairs)
                state.epoch, state.group, state.epoch_loss_sum, state.epoch_pairs = state.epoch + 1, 0, 0.0, 0
            on_step(state)
            if state.group == 0:
                break
    return state
