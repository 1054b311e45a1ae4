"""Local model servers: a model folder as a child process on a free loopback port.

Which server answers a folder, and its command line, is preftune/backends.py (preftune's batching
server, ``transformers serve`` through preftune/hfserve.py, or vLLM). What ``transformers serve``
(5.23) does, checked by hand on a tiny Llama on 2 CPU cores:

  - it pins the model: requests must send ``"model": FOLDER`` exactly (anything else is HTTP 400
    "Server is pinned to ..."; preftune's server does the same).
  - ``GET /health`` answers ``{"status": "ok"}`` once the model is loaded (~5-7 s for a tiny model).
  - ``GET /v1/models`` scans the hub cache and fails (500) when that folder is missing, so we point
    ``HF_HUB_CACHE`` at an existing folder; health means ``/health``.
  - Replies carry ``finish_reason`` ("stop"/"length") and ``usage`` (the end token counted).
  - SIGTERM shuts uvicorn down in ~2 s. Without continuous batching it serves one request at a
    time and keeps computing a request whose client has gone.

Every server requires a bearer key made for it (preftune/keys.py): given to the server in its
environment, to preftune's client in a 0600 file (``Endpoint.api_key_file``); ``/health`` alone is
open. Either way the served endpoint carries the concurrency that fits (``Endpoint.concurrency``) and
the server's pid (``Endpoint.server_pid``: the client waits on a live server instead of timing
requests out and sending them again).

A run's servers belong to it. Every server a process starts is its own: it is reused by later calls
in that process (counted users), never by another process, so another process exiting (its
servers die with it) cannot stop a run's servers mid-run. A small JSON registry (under the cache
dir, guarded by a file lock) records the servers started (pid, port, model, owner pid): it finds a
*detached* server (``preftune deploy``, which outlives the command and is stopped with
``stop_server``) and adopts an orphan whose owner is gone. Servers this process owns are stopped
when their last user is done, at interpreter exit, on SIGTERM/SIGHUP (a cancelled flow run), and by
the kernel when the owner is killed (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from preftune.backends import Launch, launch_for, local_backend
from preftune.endpoint import Endpoint
from preftune.errors import UserError
from preftune.files import file_lock, write_json_atomic
from preftune.hf import model_fingerprint
from preftune.keys import child_environ, new_key, note_secret_env, write_key_file
from preftune.paths import cache_dir
from preftune.procs import popen
from preftune.serverprocs import (  # re-exported: callers import them from here
    free_port,
    healthy,
    kill_group,
    listens_on,
    log_tail,
    pid_alive,
    port_free,
    runs_server_for,
)

# vLLM's switches for routes that load adapters or change the server (/v1/load_lora_adapter, /sleep, ...)
CLOSED_ROUTE_SWITCHES = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_SERVER_DEV_MODE")

_LOCK = threading.RLock()
_LIVE: dict[tuple[str, bool], ServerHandle] = {}  # (registry key, detached) -> handle used by this process
_HANDLERS_INSTALLED = False


class ServerError(RuntimeError):
    """A server that would not start or answer; the message ends with its last log lines."""


@dataclass
class ServerHandle:
    model_dir: str
    port: int
    pid: int
    log_path: Path
    started_at: str
    owned: bool  # True when this process must stop it
    detached: bool = False
    served_model: str | None = None  # the `model` field requests send (defaults to model_dir)
    concurrency: int | None = None  # requests in flight that suit it (None: unknown, the client's default)
    key_file: Path | None = None  # 0600 file holding the server's bearer key
    backend: str | None = None  # preftune, transformers or vllm (None: a caller's own command)
    proc: subprocess.Popen | None = field(default=None, repr=False)
    users: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def model(self) -> str:
        return self.served_model or self.model_dir

    def endpoint(self) -> Endpoint:
        # Priced at 0: a folder preftune serves costs no per-token bill (unpriced would read "unknown").
        return Endpoint(base_url=self.base_url, model=self.model, cache_id=model_fingerprint(self.model_dir),
                        price_input_per_m=0.0, price_output_per_m=0.0, concurrency=self.concurrency,
                        server_pid=self.pid, api_key_file=str(self.key_file) if self.key_file else None)

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return pid_alive(self.pid)

    def tail(self, n: int = 20) -> str:
        return log_tail(self.log_path, n)

    def release(self) -> None:
        """One user is done; the last user of a server this process owns stops it."""
        with _LOCK:
            self.users = max(0, self.users - 1)
            if self.users == 0 and self.owned and not self.detached:
                self.stop()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after ``grace`` seconds."""
        with _LOCK:
            kill_group(self.pid, self.proc, grace)
            if _LIVE.get((_key(self.model_dir), self.detached)) is self:
                del _LIVE[(_key(self.model_dir), self.detached)]
            _registry_remove(_key(self.model_dir), self.pid)
            _forget_key(self.key_file)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- plumbing ------------------------------------------------------------------------------------
def _key(model_dir: str) -> str:
    return str(Path(model_dir).resolve())


def registry_path() -> Path:
    return cache_dir() / "servers" / "registry.json"


@contextlib.contextmanager
def _registry() -> Iterator[dict[str, Any]]:
    """The registry, read and written under an exclusive file lock (other processes use it too)."""
    path = registry_path()
    with file_lock(path.with_suffix(".lock")):
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            data = {}  # a torn registry only costs a fresh server
        before = json.dumps(data, sort_keys=True)
        yield data
        if json.dumps(data, sort_keys=True) != before:
            write_json_atomic(path, data)


def _registry_remove(key: str, pid: int) -> None:
    with _registry() as reg:
        if reg.get(key, {}).get("pid") == pid:
            del reg[key]


def _forget_key(path: str | Path | None) -> None:
    """A stopped server's key is no use to anyone: its file goes."""
    if path:
        with contextlib.suppress(OSError):
            Path(path).unlink()


def _install_exit_handlers() -> None:
    """Stop owned servers at exit and on SIGTERM/SIGHUP, then let the previous handler run."""
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(stop_owned)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(sig)
        if previous is signal.SIG_IGN:
            continue

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            stop_owned()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(sig, handler)


def stop_owned() -> None:
    """Stop every non-detached server this process started (atexit / signal / flow teardown)."""
    with _LOCK:
        for handle in list(_LIVE.values()):
            if handle.owned and not handle.detached:
                handle.stop(grace=5.0)


# -- start / reuse -------------------------------------------------------------------------------
def _reuse(key: str, detach: bool = False) -> ServerHandle | None:
    """This process's own live server for ``key``; else from the registry an orphan (its owner is
    gone: adopted, so it is stopped at our exit) or, for a deployment (``detach``), a detached one.
    A server another live process owns is never used: it dies when that process exits."""
    handle = _LIVE.get((key, detach))
    if handle is not None and handle.alive():
        return handle  # ours and running (a busy server may be slow to answer /health)
    with _registry() as reg:
        entry = reg.get(key)
        if not entry:
            return None
        detached = bool(entry.get("detached"))
        owner = entry.get("owner", -1)
        if detached != detach or (not detached and owner != os.getpid() and pid_alive(owner)):
            return None  # not ours to use: a run starts its own (a deployment, its own detached one)
        if not (pid_alive(entry["pid"]) and healthy(entry["port"], timeout=5.0)):
            del reg[key]  # stale: dead, or something else now holds that pid/port
            return None
        owner_gone = not detached
        if owner_gone:  # an orphan of a crashed run: adopt it, so it is stopped at our exit
            entry["owner"] = os.getpid()
    key_file = entry.get("key_file")
    handle = ServerHandle(model_dir=key, port=entry["port"], pid=entry["pid"], log_path=Path(entry["log"]),
                          started_at=entry["started_at"], owned=owner_gone, detached=detached,
                          served_model=entry.get("served_model"), concurrency=entry.get("concurrency"),
                          key_file=Path(key_file) if key_file else None, backend=entry.get("backend"))
    _LIVE[(key, detached)] = handle
    return handle


def serve_local(model_dir: str | Path, log_dir: str | Path, *, device: str = "cpu", port: int | None = None,
                timeout: float = 180.0, detach: bool = False, command: list[str] | None = None,
                launch: Launch | None = None, key_file: Path | None = None) -> ServerHandle:
    """A healthy server for ``model_dir``: reused when one is up, else started and awaited.

    The backend is this machine's (``preftune.backends.local_backend``) unless ``launch`` gives
    one (a deployment, phase 5's LoRA server) or ``command`` a bare command line (a test's broken
    server); ``{port}`` in either is filled in. ``key_file``: where the server's key is written
    (default: a private folder of the cache). Use the handle as a context manager, or call
    ``release()``/``stop()``.
    """
    return serve_many([model_dir], log_dir, device=device, port=port, timeout=timeout, detach=detach,
                      command=command, launch=launch, key_file=key_file)[0]


def serve_many(model_dirs: list[str | Path], log_dir: str | Path, *, device: str = "cpu", port: int | None = None,
               timeout: float = 180.0, detach: bool = False, command: list[str] | None = None,
               launch: Launch | None = None, key_file: Path | None = None) -> list[ServerHandle]:
    """Like ``serve_local`` for several folders, loading them side by side (strong and weak at once)."""
    if command is not None:
        launch = Launch("custom", command, concurrency=None)
    for d in model_dirs:
        if launch is None and not (Path(d) / "config.json").is_file():
            raise UserError("not a model folder (no config.json)", path=d)
    with _LOCK:
        batch: dict[str, ServerHandle] = {}
        launched: list[ServerHandle] = []
        for d in model_dirs:
            key = _key(str(d))
            handle = batch.get(key) or (_reuse(key, detach) if port is None else None)
            # A detached server (a deployment) must not ride on one that dies with another process.
            if handle is None or (detach and not handle.detached):
                handle = _launch(key, Path(log_dir), device=device, port=port, detach=detach, launch=launch,
                                 key_file=key_file)
                launched.append(handle)
            batch[key] = handle
        try:
            deadline = time.monotonic() + timeout
            for handle in launched:
                wait_healthy(handle, timeout, deadline)
                if not listens_on(handle.pid, handle.port):
                    raise ServerError(f"port {handle.port} is answered by another process, not the server "
                                      f"started for {handle.model_dir} (pid {handle.pid})")
        except BaseException:
            for handle in launched:
                kill_group(handle.pid, handle.proc, grace=5.0)
                _forget_key(handle.key_file)
            raise
        for handle in launched:
            _register(handle)
        handles = [batch[_key(str(d))] for d in model_dirs]
        for handle in handles:
            handle.users += 1
        return handles


def _launch(key: str, log_dir: Path, *, device: str, port: int | None, detach: bool,
            launch: Launch | None, key_file: Path | None) -> ServerHandle:
    log_dir.mkdir(parents=True, exist_ok=True)
    if port and not port_free(port):
        raise UserError(f"port {port} is in use by another process")
    port = port or free_port()
    log_path = log_dir / f"server-{Path(key).name}-{port}.log"
    if launch is None:
        # A deployment (detached) stays off preftune's server: transformers serve's API is broader.
        backend = local_backend(key)
        launch = launch_for("transformers" if detach and backend == "preftune" else backend, key, device)
    argv = [a.replace("{port}", str(port)) for a in launch.argv]
    secret = new_key()
    key_file = write_key_file(key_file or cache_dir() / "servers" / "keys" / f"{Path(key).name}-{port}.key", secret)
    env = child_environ({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", launch.key_env: secret})
    for name in CLOSED_ROUTE_SWITCHES:  # a user's setting must not open a model-loading route to callers
        env.pop(name, None)
    hub_cache = cache_dir() / "hf-hub"  # /v1/models fails without an existing hub cache folder
    hub_cache.mkdir(parents=True, exist_ok=True)
    env.setdefault("HF_HUB_CACHE", str(hub_cache))
    if not launch.batching:
        # A pair phase runs a batching server and a one-at-a-time one side by side. The latter
        # computes each request in a thread of its own, whose OpenMP threads spin while idle and take
        # the cores the batching server needs: pairs at concurrency 32 on 2 cores (bench_pairs
        # --local) ran at 82 tokens/s with it spinning, 222 with it waiting passively (and 191 with
        # both servers passive, which also slowed concurrency 1 from 39 to 26). A user's setting wins.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _install_exit_handlers()
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())  # the key is in env, not here
        log.flush()
        # A run's server dies with the run even on kill -9; a deployment's (detached) outlives it.
        proc = popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                     start_new_session=True, env=env, cwd=str(log_dir),
                     death_signal=None if detach else signal.SIGKILL)
    return ServerHandle(model_dir=key, port=port, pid=proc.pid, log_path=log_path, proc=proc,
                        started_at=datetime.now(UTC).isoformat(timespec="seconds"), owned=True,
                        detached=detach, served_model=launch.served_model, concurrency=launch.concurrency,
                        key_file=key_file, backend=launch.backend)


def _register(handle: ServerHandle) -> None:
    """Ours from now on; on record unless the registry holds a live server of another process for
    that folder (one entry per folder: a deployment's detached server takes the place)."""
    _LIVE[(handle.model_dir, handle.detached)] = handle
    with _registry() as reg:
        entry = reg.get(handle.model_dir)
        if entry and not handle.detached and pid_alive(entry["pid"]) and entry.get("owner") != os.getpid():
            return
        reg[handle.model_dir] = {
            "pid": handle.pid, "port": handle.port, "model": handle.model_dir, "log": str(handle.log_path),
            "owner": os.getpid(), "started_at": handle.started_at, "detached": handle.detached,
            "served_model": handle.served_model, "concurrency": handle.concurrency,
            "key_file": str(handle.key_file) if handle.key_file else None, "backend": handle.backend}


def wait_healthy(handle: ServerHandle, timeout: float, deadline: float | None = None) -> None:
    """Poll /health until it answers 200 (by `deadline`, a shared one when servers start side by
    side; else `timeout` from now); fail fast when the process dies."""
    deadline = time.monotonic() + timeout if deadline is None else deadline
    while time.monotonic() < deadline:
        if not handle.alive():
            code = handle.proc.returncode if handle.proc is not None else "?"
            raise ServerError(f"model server for {handle.model_dir} exited with code {code} before it was healthy;"
                              f" last log lines ({handle.log_path}):\n{handle.tail()}")
        if healthy(handle.port, timeout=1.0):
            return
        time.sleep(0.25)
    raise ServerError(f"model server for {handle.model_dir} was not healthy after {timeout:g}s; "
                      f"last log lines ({handle.log_path}):\n{handle.tail()}")


def stop_server(model_dir: str | Path, grace: float = 10.0, pid: int | None = None) -> bool:
    """Stop the server for ``model_dir`` whoever started it; False when none was running.

    ``pid`` (from an endpoint.json) is the fallback when the registry has no entry; it is only
    signalled if that process still runs a server for ``model_dir``.
    """
    key = _key(str(model_dir))
    with _LOCK, _registry() as reg:
        entry = reg.pop(key, None)
    handle = _LIVE.pop((key, True), None) or _LIVE.pop((key, False), None)
    if handle is not None:
        target, proc = handle.pid, handle.proc
    elif entry is not None and runs_server_for(entry["pid"], key):
        target, proc = entry["pid"], None
    elif pid is not None and runs_server_for(pid, key):
        target, proc = pid, None
    else:
        return False
    kill_group(target, proc, grace)
    _forget_key(handle.key_file if handle is not None else (entry or {}).get("key_file"))
    return True


def is_local_model(spec: str) -> bool:
    return Path(spec).is_dir() and (Path(spec) / "config.json").is_file()


def resolve_endpoints(eps: list[Endpoint | str], *, log_dir: str | Path, stack: contextlib.ExitStack | None = None,
                      device: str = "cpu", timeout: float = 180.0) -> list[Endpoint]:
    """Endpoints ready for the client: each local model folder served on a loopback port (several
    loaded side by side), each remote one as given. A string is read with ``Endpoint.parse``.

    With ``stack`` each server is released when the stack closes; without, at interpreter exit.
    """
    eps = [Endpoint.parse(e) if isinstance(e, str) else e for e in eps]
    for ep in eps:
        if ep.is_local and not is_local_model(ep.model):
            what = "it has no config.json" if Path(ep.model).is_dir() else "no such folder (or give MODEL@BASE_URL)"
            raise UserError(f"a local model folder was expected: {what}", path=ep.model)
    for ep in eps:
        note_secret_env(ep.api_key_env)
    local = [ep.model for ep in eps if ep.is_local]
    served = iter(serve_many(local, log_dir, device=device, timeout=timeout) if local else [])
    out = []
    for ep in eps:
        if not ep.is_local:
            out.append(ep)
            continue
        handle = next(served)
        if stack is not None:  # one release per use taken (a folder given twice took two)
            stack.callback(handle.release)
        # The served URL and its own key replace the folder; the prices the user set on it stay.
        kept = ep.model_dump(include={"price_input_per_m", "price_output_per_m"}, exclude_none=True)
        out.append(handle.endpoint().model_copy(update=kept))
    return out


def resolve_endpoint(ep: Endpoint | str, *, log_dir: str | Path, stack: contextlib.ExitStack | None = None,
                     device: str = "cpu", timeout: float = 180.0) -> Endpoint:
    """``resolve_endpoints`` for one endpoint."""
    return resolve_endpoints([ep], log_dir=log_dir, stack=stack, device=device, timeout=timeout)[0]


def device_name() -> str:
    """The torch device a run serves and deploys on: this machine's GPU when it has one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_run_endpoints(eps: list[Endpoint], *, log_dir: str | Path, stack: contextlib.ExitStack) -> list[Endpoint]:
    """A run's endpoints (RunSpec strong/weak/judge): local folders served on this machine's device
    for the stack's life, remote ones passed through."""
    return resolve_endpoints(eps, log_dir=log_dir, stack=stack, device=device_name())
