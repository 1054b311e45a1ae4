"""The preference trainer: losses, data and collation, the loop, the reference cache.

Entry points: ``TrainConfig`` (one job's settings) and ``run_training(cfg) -> summary dict``.
Imported lazily, so ``tasks.training.losses`` stays a torch-only import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from preftune.tasks.training.config import TrainConfig
    from preftune.tasks.training.job import run_training

__all__ = ["TrainConfig", "run_training"]


def __getattr__(name: str):
    if name == "TrainConfig":
        from preftune.tasks.training.config import TrainConfig

        return TrainConfig
    if name == "run_training":
        from preftune.tasks.training.job import run_training

        return run_training
    raise AttributeError(name)
