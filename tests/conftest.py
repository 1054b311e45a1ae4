"""Shared fixtures: the offline tiny-model zoo (built once, cached) and a real Prefect API."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Samples of real public preference data (UltraFeedback, LLaMA-Factory, HH-RLHF, MT-Bench, a TRL-format
# file), kept in the repo so a clean checkout runs every test; sources and licences in its SOURCES.md.
PUBLIC_DATASETS = REPO / "tests" / "data" / "public"

# Keep CPU tests from oversubscribing the two cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def zoo() -> dict:
    """{"dir", "tokenizer", "models": {"tiny-llama", "tiny-qwen", "tiny-strong", "tiny-weak"}}."""
    from preftune.paths import default_zoo_dir
    from preftune.zoo import build_zoo

    return build_zoo(default_zoo_dir())


@pytest.fixture(scope="session")
def real_model() -> dict:
    """SmolLM2-135M-Instruct, converted once from the installed GGUF wheel (cached): its manifest
    with "path"."""
    from preftune.realmodel import build_real_model

    return build_real_model()


@pytest.fixture(scope="session")
def prefect_api():
    """A real temporary Prefect API server (SQLite), once per test session."""
    from prefect.testing.utilities import prefect_test_harness

    # Generous start-up time: a loaded 2-core CI machine can take far longer than the usual ~10 s.
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def public_datasets() -> Path:
    return PUBLIC_DATASETS
