"""Trainer fixtures: a zoo base model and small pair files built from the zoo's own corpus.

The "marker" pairs are the evidence data of issue 3: the preferred answer is the corpus answer
opening with MARKER, the non-preferred one is the same answer without it, so the only thing a
model can learn from them is to open with the marker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.training.marker_data import corpus_chats, marker_pair


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def base_model(zoo) -> Path:
    return Path(zoo["models"]["tiny-llama"])


@pytest.fixture(scope="session")
def marker_data(tmp_path_factory) -> dict:
    """{"train": 128 marker pairs, "eval": 32 held-out pairs, "small": 16 pairs, "prompts": held-out}."""
    root = tmp_path_factory.mktemp("marker")
    train = corpus_chats("train")[::3][:128]
    held = corpus_chats("heldout")[:32]
    return {
        "train": write_jsonl(root / "train.jsonl", [marker_pair(c) for c in train]),
        "eval": write_jsonl(root / "eval.jsonl", [marker_pair(c) for c in held]),
        "small": write_jsonl(root / "small.jsonl", [marker_pair(c) for c in train[:16]]),
        "prompts": [c[:-1] for c in held],
    }


@pytest.fixture
def small_cfg(base_model, marker_data, tmp_path):
    """A TrainConfig factory for quick jobs (16 pairs, batch 4, short sequences)."""
    from preftune.job import TrainConfig

    def make(**overrides) -> TrainConfig:
        fields = dict(data=marker_data["small"], model=base_model, out=tmp_path / "job",
                      ref_cache=tmp_path / "refcache", batch_size=4, max_length=96, num_threads=1,
                      save_every=1000)
        fields.update(overrides)
        return TrainConfig(**fields)

    return make
