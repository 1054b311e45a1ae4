"""Per-server bearer keys: every model server preftune starts (a run's local servers, a deployment)
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
