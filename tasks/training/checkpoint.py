"""Checkpoints: trainable weights, optimizer, scheduler, RNG and loop state in ONE file.

One file written to a temporary name and renamed, so a job killed at any moment leaves either
the previous checkpoint or the new one, never half of one. With LoRA only the adapter weights
are trainable, so the file is small; with full fine-tuning it holds the whole model.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from preftune.files import atomic_output
from preftune.tasks.training.loop import TrainState

CHECKPOINT = "checkpoint.pt"


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, config_hash: str, module, optimizer, scheduler, state: TrainState) -> None:
    blob = {
        "config_hash": config_hash,
        "state": state.as_dict(),
        "weights": _trainable(module),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
    }
    with atomic_output(Path(out) / CHECKPOINT, "wb") as fh:
        torch.save(blob, fh)


def peek_checkpoint(out: Path) -> dict | None:
    """The checkpoint's config hash and state, or None when there is none."""
    path = Path(out) / CHECKPOINT
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def restore_checkpoint(blob: dict, module, optimizer, scheduler) -> TrainState:
    """Load weights/optimizer/scheduler/RNG from ``blob`` into live objects; return the loop state."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in blob["weights"].items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["rng"])
    return TrainState(**blob["state"])


def remove_checkpoint(out: Path) -> None:
    (Path(out) / CHECKPOINT).unlink(missing_ok=True)
