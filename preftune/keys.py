"""Where a key may go: nowhere but the request that needs it.

Two guards, for every endpoint key preftune reads (an ``api_key_env`` an :class:`Endpoint` names, or a
key read from a Prefect Secret block):

* ``child_environ``: what a child preftune starts (a model server, a training job, an evaluator
  worker, a Prefect server) inherits. An allow-list of the names a Python, torch and Hugging Face
  process reads, because a deny-list of suffixes misses a key kept under any other name
  (``JUDGE_TOKEN`` reached the trainer that way).
* ``redact``: a model reply that quotes a key (a judge that echoes its prompt, its headers or its
  environment) has the key's text replaced by ``REDACTED`` before anything is written.

And per-server bearer keys: every model server preftune starts (a run's local servers, a deployment)
requires one, made here, handed to the server through its environment (never its command line:
``/proc/<pid>/cmdline`` is world-readable) and to preftune's client through a file only its owner
can read (``Endpoint.api_key_file``). A key is never logged or printed.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from preftune.errors import UserError

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


SERVER_KEY_ENV = "PREFTUNE_SERVER_KEY"  # how preftune's own servers (batchserve, hfserve) receive theirs


def new_key() -> str:
    return secrets.token_urlsafe(32)


def write_key_file(path: str | Path, key: str) -> Path:
    """``key`` in ``path``, created 0600 (its folder 0700 when we make it): no window in which
    another local user could read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    os.replace(tmp, path)
    return path


def read_key_file(path: str | Path) -> str:
    try:
        key = Path(path).read_text().strip()
    except OSError as err:
        raise UserError(f"cannot read the server key: {err.strerror}", path=str(path)) from None
    if not key:
        raise UserError("the server key file is empty", path=str(path))
    return key


def bearer_ok(header: str | bytes | None, key: str) -> bool:
    """Whether an ``Authorization`` header carries ``key`` (compared in constant time)."""
    if isinstance(header, str):
        header = header.encode("latin-1", "replace")
    return hmac.compare_digest(header or b"", b"Bearer " + key.encode())


def take_server_key(name: str = SERVER_KEY_ENV) -> str:
    """The key a server was started with, removed from its environment (nothing it starts inherits it)."""
    key = os.environ.pop(name, "")
    if not key:
        raise SystemExit(f"{name} is not set: preftune starts this server with a key in its environment")
    return key
