"""The preference trainer: losses, data and collation, the loop, the reference cache.

Entry point: ``run_training(cfg: preftune.job.TrainConfig) -> summary dict``. Imported lazily, so
``preftune.tasks.training.losses`` loads torch and nothing heavier.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from preftune.tasks.training.job import run_training

__all__ = ["run_training"]


def __getattr__(name: str):
    if name == "run_training":
        from preftune.tasks.training.job import run_training

        return run_training
    raise AttributeError(name)
