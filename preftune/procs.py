"""Child processes that die with preftune: every child preftune starts (model servers, sweep jobs,
evaluator workers, the temporary Prefect server) goes through ``popen``.

On Linux the child sets ``PR_SET_PDEATHSIG`` before it runs, so a ``kill -9`` of preftune still
takes its children down. The kernel sends that signal when the *thread* that forked the child
exits, not the process; a child started from a short-lived worker thread would die with that
thread. So ``popen`` forks from the main thread, or else from one spawner thread that lives as long
as the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

PR_SET_PDEATHSIG = 1
_LIBC: Any = None
if sys.platform.startswith("linux"):
    try:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover
        _LIBC = None


def death_signal_preexec(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when its parent dies (None off Linux)."""
    if _LIBC is None:
        return None
    parent = os.getpid()
    prctl = _LIBC.prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), int(sig))

    return preexec


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Make this process receive ``sig`` when its parent dies (Linux; elsewhere a no-op).

    For processes started by a launcher preftune does not control: torchrun starts each trainer in
    a session of its own, so a ``kill -9`` of torchrun (or of the worker above it) would leave the
    trainers running and writing into the job folder."""
    if _LIBC is None:
        return
    parent = os.getppid()
    _LIBC.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), int(sig))


_REQUESTS: queue.Queue = queue.Queue()
_SPAWNER: threading.Thread | None = None
_SPAWNER_LOCK = threading.Lock()


def _spawner_loop() -> None:
    while True:
        fn, box, done = _REQUESTS.get()
        try:
            box.append((True, fn()))
        except BaseException as err:  # handed back to the caller
            box.append((False, err))
        done.set()


def _in_spawner(fn: Callable[[], subprocess.Popen]) -> subprocess.Popen:
    global _SPAWNER
    with _SPAWNER_LOCK:
        if _SPAWNER is None or not _SPAWNER.is_alive():
            _SPAWNER = threading.Thread(target=_spawner_loop, name="preftune-spawner", daemon=True)
            _SPAWNER.start()
    box: list = []
    done = threading.Event()
    _REQUESTS.put((fn, box, done))
    done.wait()
    ok, value = box[0]
    if not ok:
        raise value
    return value


def popen(argv: list[str], *, death_signal: int | None = signal.SIGKILL, **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` whose child gets ``death_signal`` when this process dies (None: it outlives us)."""
    preexec = death_signal_preexec(death_signal) if death_signal is not None else None
    if preexec is None:
        return subprocess.Popen(argv, **kwargs)
    kwargs["preexec_fn"] = preexec

    def start() -> subprocess.Popen:
        return subprocess.Popen(argv, **kwargs)

    if threading.current_thread() is threading.main_thread():
        return start()
    return _in_spawner(start)


def terminate(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM each live process in ``procs`` (a job then checkpoints and exits), wait up to
    ``grace_s`` for all of them together, then SIGKILL what is left."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# A process whose work can stop cleanly between two steps (a training job: it checkpoints first)
# asks for SIGTERM/SIGINT to be a request, not an interruption: the CLI's handler then sets this
# event instead of raising KeyboardInterrupt, and the work checks it after each step. The CLI's exit
# deadline still holds: a step that does not end in time is cut off, and resumes from the last
# checkpoint.
_stop_requested = threading.Event()
_graceful = threading.Event()


@contextlib.contextmanager
def stop_between_steps() -> Iterator[None]:
    """While inside, a signal to this process sets ``stop_requested()`` instead of interrupting it."""
    _stop_requested.clear()  # a signal before this point has interrupted the process already
    _graceful.set()
    try:
        yield
    finally:
        _graceful.clear()


def request_stop() -> bool:
    """Called by the signal handler: True when the work in progress will stop by itself."""
    if not _graceful.is_set():
        return False
    _stop_requested.set()
    return True


def stop_requested() -> bool:
    return _stop_requested.is_set()
