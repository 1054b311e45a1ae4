"""Credentials of the Prefect server `preftune up` starts (Prefect's own basic auth).

Without them anyone on the machine could use the API: #21 saw a second local user approve the owner's
paused plan and start a run with an evaluator file of their own. `preftune up` generates an auth string
(``preftune:<random>``) on its first start, stores it 0600 in its home (``<home>/api-auth``, the home
itself 0700: the SQLite database holds every run's parameters), starts the server with
``PREFECT_SERVER_API_AUTH_STRING`` and records, per API URL, where the file lies
(``<cache>/prefect-servers.json``: paths only, never the secret). Every other `preftune` command then
sends it (``PREFECT_API_AUTH_STRING``) when the environment does not set one: ``use_saved_auth`` runs
before Prefect is imported, because Prefect reads its settings once, at import.

The temporary server Prefect starts for a command when no PREFECT_API_URL is set (`preftune run`,
`preftune demo`) gets one too (``temporary_auth``, ``record_temporary``): a fresh string per process,
stored 0600 beside the other per-user state and recorded for that server's URL, so another local user
cannot answer the run's questions through it while the owner's `preftune approve WORKSPACE` can
(the run records the server's URL in its run.json).

The UI asks for the same string once per browser, on its Login page (the password field: the whole
``user:password`` string); `preftune up` prints where the file lies, never the string itself.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from preftune.errors import UserError

AUTH_FILE = "api-auth"
REGISTRY = "prefect-servers.json"
CLIENT_SETTING = "PREFECT_API_AUTH_STRING"
SERVER_SETTING = "PREFECT_SERVER_API_AUTH_STRING"
DEFAULT_API = "http://127.0.0.1:4200/api"


def _registry_path() -> Path:
    from preftune.paths import cache_dir

    return cache_dir() / REGISTRY


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only, from the moment it exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def server_auth(home: str | Path) -> tuple[str, Path]:
    """(the auth string, its file) for the server whose home is ``home``: read, or generated on the
    first start. The home and the file are made private to this user (also when found too open)."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    path = home / AUTH_FILE
    if path.is_file():
        os.chmod(path, 0o600)
        auth = path.read_text().strip()
        if ":" in auth:
            return auth, path
    auth = f"preftune:{secrets.token_urlsafe(24)}"
    _write_private(path, auth + "\n")
    return auth, path


def record_server(api_url: str, auth_file: Path) -> None:
    """Remember which auth file belongs to the server at ``api_url``, for the other commands."""
    path = _registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    known[api_url.rstrip("/")] = str(Path(auth_file).resolve())
    _write_private(path, json.dumps(known, indent=2) + "\n")


def saved_auth(api_url: str) -> str | None:
    """The auth string `preftune up` stored for the server at ``api_url`` (None: none stored or readable)."""
    try:
        known = json.loads(_registry_path().read_text())
        auth = Path(known[api_url.rstrip("/")]).read_text().strip()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return auth or None


def use_saved_auth() -> None:
    """Send the stored auth string to the server PREFECT_API_URL names, unless the environment sets
    one. Call before Prefect is imported (it reads its settings once)."""
    if os.environ.get(CLIENT_SETTING):
        return
    auth = saved_auth(os.environ.get("PREFECT_API_URL") or DEFAULT_API)
    if auth:
        os.environ[CLIENT_SETTING] = auth


def refused(err: BaseException) -> bool:
    """Whether ``err`` (or what it wraps) is the Prefect API's 401."""
    while err is not None:
        response = getattr(err, "response", None)
        if getattr(response, "status_code", None) == 401:
            return True
        err = err.__cause__ or err.__context__
    return False


def refused_message(api: str | None = None) -> str:
    """One line for a 401 from the Prefect API (names where credentials come from, never them)."""
    api = api or os.environ.get("PREFECT_API_URL") or DEFAULT_API
    source = f"${CLIENT_SETTING}" if os.environ.get(CLIENT_SETTING) else "no credentials were found"
    return (f"the Prefect API at {api} refused the credentials ({source}): set {CLIENT_SETTING} to the "
            f"server's auth string (`preftune up` stores it in <its home>/{AUTH_FILE} and its commands read it)")


def check_credentials(api_url: str) -> None:
    """A server found running may ask for credentials this process does not have: say so in one line
    (the serve loop would otherwise fail on its first request)."""
    import base64

    import httpx

    auth = os.environ.get(CLIENT_SETTING)
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    try:
        status = httpx.get(api_url.rstrip("/") + "/admin/version", headers=headers, timeout=30).status_code
    except httpx.HTTPError:
        return  # not reachable: the serve loop says so itself
    if status == 401:
        raise UserError(refused_message(api_url))


def temporary_auth() -> None:
    """Before Prefect is imported, for a command that may start Prefect's temporary server (no
    PREFECT_API_URL): this process sends a fresh auth string, which that server then requires
    (``record_temporary``). A string already set (the environment's, or `preftune up`'s) is kept."""
    if not os.environ.get("PREFECT_API_URL") and not os.environ.get(CLIENT_SETTING):
        os.environ[CLIENT_SETTING] = f"preftune:{secrets.token_urlsafe(24)}"


def record_temporary(api_url: str) -> str | None:
    """The auth string the temporary server at ``api_url`` is to require (this process's), stored 0600
    and recorded for that URL so the owner's other commands find it; None when there is none."""
    from preftune.paths import cache_dir

    auth = os.environ.get(CLIENT_SETTING)
    if not auth:
        return None
    folder = cache_dir() / "temporary-servers"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / f"{urlsplit(api_url).port}.auth"
    _write_private(path, auth + "\n")
    record_server(api_url, path)
    atexit.register(path.unlink, missing_ok=True)  # the server goes with this process; so does its string
    return auth
