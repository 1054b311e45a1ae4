"""Where a key may go: nowhere but the request that needs it.

Two guards, for every endpoint key preftune reads (an ``api_key_env`` an :class:`Endpoint` names, or a
key read from a Prefect Secret block):

* ``child_environ``: what a child preftune starts (a model server, a training job, an evaluator
  worker, a Prefect server) inherits. An allow-list of the names a Python, torch and Hugging Face
  process reads, because a deny-list of suffixes misses a key kept under any other name
  (``JUDGE_TOKEN`` reached the trainer that way).
* ``redact``: a model reply that quotes a key (a judge that echoes its prompt, its headers or its
  environment) has the key's text replaced by ``REDACTED`` before anything is written.
"""

from __future__ import annotations

import os

REDACTED = "<redacted>"
MIN_SECRET_LEN = 4  # shorter "keys" (local servers' placeholders) would redact ordinary words
PASS_ENV = "PREFTUNE_PASS_ENV"  # names (comma-separated) the owner wants passed on to children as well

_CHILD_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "TEMP", "TMP",
    "PYTHONPATH", "PYTHONHASHSEED", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONWARNINGS",
    "VIRTUAL_ENV", "CONDA_PREFIX", "LD_LIBRARY_PATH", "XDG_CACHE_HOME", "TOKENIZERS_PARALLELISM",
    "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
    "CC", "CXX"})  # torch.compile / triton build kernels with the compiler the owner chose
_CHILD_ENV_PREFIXES = ("LC_", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "CUDA_", "NVIDIA_", "NCCL_", "CUBLAS_",
                       "HF_", "TRANSFORMERS_", "TORCH_", "PYTORCH_", "ACCELERATE_", "TRITON_", "VLLM_", "PREFTUNE_")
# Within those prefixes a name that reads like a credential stays behind (HF_TOKEN): children never
# download. No PREFECT_* either (a database URL may hold a password): a Prefect server preftune starts
# is handed its settings explicitly (preftune.cli.up, preftune.cli.prefect_server).
_CREDENTIAL_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "AUTH", "CREDENTIAL")
_SECRET_NAMES: set[str] = set()  # every api_key_env an endpoint named in this process
_SECRET_VALUES: set[str] = set()  # keys read from elsewhere (a Prefect Secret block)


def note_secret_env(name: str | None) -> None:
    """Remember an endpoint's ``api_key_env``: no child sees that variable, no reply keeps its value."""
    if name:
        _SECRET_NAMES.add(name)


def note_secret(value: str | None) -> None:
    """Remember a key read from somewhere other than the environment, so replies are redacted of it."""
    if value and len(value) >= MIN_SECRET_LEN:
        _SECRET_VALUES.add(value)


def child_environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child preftune starts: this process's variables on the allow-list (plus
    the names in $PREFTUNE_PASS_ENV), never an endpoint's key, then ``extra`` (what the caller hands
    this child on purpose: its thread count, the Prefect server's own auth string)."""
    passed = {n.strip() for n in os.environ.get(PASS_ENV, "").split(",") if n.strip()}

    def allowed(name: str) -> bool:
        if name in _SECRET_NAMES:
            return False
        if name in passed or name in _CHILD_ENV_NAMES:
            return True
        return name.startswith(_CHILD_ENV_PREFIXES) and not any(w in name.upper() for w in _CREDENTIAL_WORDS)

    return {**{k: v for k, v in os.environ.items() if allowed(k)}, **(extra or {})}


def secrets_in_use(*extra: str | None) -> list[str]:
    """Every key this process knows of (longest first, so a key that contains another goes whole)."""
    values = {os.environ.get(name) for name in _SECRET_NAMES} | _SECRET_VALUES | set(extra)
    return sorted((v for v in values if v and len(v) >= MIN_SECRET_LEN), key=len, reverse=True)


def redact(text: str, *extra: str | None) -> str:
    """``text`` with every known key (and ``extra`` ones) replaced by ``REDACTED``."""
    for secret in secrets_in_use(*extra):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text
