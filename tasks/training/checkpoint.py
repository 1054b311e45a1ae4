"""Checkpoints: trainable weights, optimizer, scheduler, RNG and loop state in ONE file.

One file written to a temporary name and renamed, so a job killed at any moment leaves either
the previous checkpoint or the new one, never half of one. With LoRA only the adapter weights
are trainable, so the file is small; with full fine-tuning it holds the whole model.

Nothing read back runs code: the file is loaded with ``weights_only=True`` (tensors, numbers,
strings and containers only). Its sha256 is written beside it (``checkpoint.sha256``) before it is
renamed into place, as the list [new, previous], so a crash between the two renames still leaves a
pair that matches. A checkpoint that is missing, torn, edited or not loadable is one log line and
treated as absent: the job trains from the start.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from preftune.files import digested_output, matches_recorded, stale
from preftune.tasks.training.loop import TrainState

CHECKPOINT = "checkpoint.pt"
DIGESTS = "checkpoint.sha256"
_RESTART = "the job trains from step 0"
_KEYS = ("config_hash", "state", "weights", "optimizer", "scheduler", "rng")


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
    out = Path(out)
    with digested_output(out / CHECKPOINT, out / DIGESTS) as sink:
        torch.save(blob, sink)


def peek_checkpoint(out: Path) -> dict | None:
    """The checkpoint (config hash, state, weights...), or None when there is none or it cannot be
    trusted (one log line): a job then trains from the start."""
    path = Path(out) / CHECKPOINT
    if not path.exists():
        return None
    if not matches_recorded(path, Path(out) / DIGESTS):
        return stale(path, "does not match its recorded sha256 (torn or edited)", _RESTART)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file (a pickle that wants code included) is absent
        return stale(path, f"not loadable as plain tensors ({type(err).__name__})", _RESTART)
    if not isinstance(blob, dict) or any(k not in blob for k in _KEYS):
        return stale(path, "not a preftune checkpoint", _RESTART)
    return blob


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
    (Path(out) / DIGESTS).unlink(missing_ok=True)
