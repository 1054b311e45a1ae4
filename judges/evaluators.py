"""Python evaluators: a user's scoring function, run out of process with a per-item timeout.

An evaluator id is ``package.module:function`` (importable from the current directory or the
environment) or ``path/to/file.py:function``. Where it may come from: preftune's own
(``preftune.judges...``) or a folder the owner lists in ``PREFTUNE_EVALUATOR_DIRS``
(``os.pathsep``-separated) — a run started from the UI or the API runs as the owner, and #21 saw
another local user start one with an evaluator file of their own. An id the owner typed on
preftune's command line (``trust_command_line``) may come from anywhere. The function is called as
``function(messages, completion)`` — the conversation (list of ``{"role", "content"}``) and one
completion string — and returns a score in [0, 1], or ``{"score": float, "reason": str}``.

Why out of process: user code can hang, crash, leak or call ``sys.exit``; none of that may take
the run down. A small pool of worker interpreters (``python -c``, so the caller's ``__main__`` is
never re-imported as multiprocessing's spawn would) loads the function once each; the parent hands
out one item at a time and kills a worker that passes the item's deadline (the item is recorded
as a time-out and a fresh worker takes its place). An exception, a time-out, a value out of
[0, 1], NaN, or a wrong type is recorded for that item with a reason; the run goes on. An id
whose module or function cannot be found is a ``UserError`` naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import numbers
import os
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from preftune.errors import UserError
from preftune.keys import child_environ
from preftune.procs import popen

START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class EvalItem:
    key: str
    messages: list[dict]
    completion: str


@dataclass(frozen=True)
class EvaluatorRef:
    evaluator_id: str
    target: str  # dotted module name, or absolute path of a .py file
    function: str
    is_file: bool


EVALUATOR_DIRS_ENV = "PREFTUNE_EVALUATOR_DIRS"
_COMMAND_LINE: set[str] = set()  # ids the owner gave on this process's command line


def trust_command_line(evaluator_id: str | None) -> None:
    """The CLI's own call (never reachable from a form): the owner named this evaluator, run it
    wherever it lives."""
    if evaluator_id:
        _COMMAND_LINE.add(evaluator_id)


def _allowed_dirs() -> list[Path]:
    from preftune.paths import PACKAGE_DIR, REPO_ROOT

    dirs = [PACKAGE_DIR] + ([REPO_ROOT / "judges"] if REPO_ROOT else [])  # a checkout maps judges/ in
    extra = [Path(d).expanduser() for d in os.environ.get(EVALUATOR_DIRS_ENV, "").split(os.pathsep) if d.strip()]
    return [d.resolve() for d in dirs + extra]


def _module_location(module: str) -> Path | None:
    """Where a module's top-level package lies, found without importing anything (None: not found,
    which loading reports as such)."""
    import importlib.machinery

    top = module.split(".")[0]
    spec = importlib.machinery.PathFinder.find_spec(top, [os.getcwd(), *sys.path]) or importlib.util.find_spec(top)
    if spec is None:
        return None
    where = spec.origin if spec.origin not in (None, "built-in", "frozen") else next(
        iter(spec.submodule_search_locations or []), None)
    return Path(where).resolve() if where else None


def check_source(ref: EvaluatorRef) -> None:
    """Refuse an evaluator outside preftune and the owner's folders unless the owner named it on
    the command line: it would run as the owner."""
    if ref.evaluator_id in _COMMAND_LINE:
        return
    where = Path(ref.target) if ref.is_file else _module_location(ref.target)
    if where is None or any(where.is_relative_to(d) for d in _allowed_dirs()):
        return
    raise UserError(f"evaluator '{ref.evaluator_id}': {where} is neither in preftune nor in a folder listed "
                    f"in {EVALUATOR_DIRS_ENV} (set by the server's owner), so a run started from the UI or API "
                    "may not run it")


def parse_evaluator_id(evaluator_id: str) -> EvaluatorRef:
    """Split and sanity-check an id; a file path is resolved against the current directory.
    An id from outside preftune and the owner's folders is refused here (``check_source``)."""
    ref = _split_evaluator_id(evaluator_id)
    check_source(ref)
    return ref


def _split_evaluator_id(evaluator_id: str) -> EvaluatorRef:
    target, sep, function = evaluator_id.rpartition(":")
    if not sep or not target or not function.isidentifier():
        raise UserError(f"evaluator '{evaluator_id}': expected package.module:function or "
                        "path/to/file.py:function")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"evaluator '{evaluator_id}': no such file", path=target)
        return EvaluatorRef(evaluator_id, str(path), function, True)
    if not all(part.isidentifier() for part in target.split(".")):
        raise UserError(f"evaluator '{evaluator_id}': '{target}' is not a module name")
    if _module_location(target) is None:  # said now, before the plan: it was found out after training
        raise UserError(f"evaluator '{evaluator_id}': module not found ({target.split('.')[0]})")
    return EvaluatorRef(evaluator_id, target, function, False)


def load_function(ref: EvaluatorRef) -> Any:
    """Import the evaluator (in the worker); LookupError with a user-facing reason if absent."""
    try:
        if ref.is_file:
            name = f"preftune_evaluator_{abs(hash(ref.target))}"
            spec = importlib.util.spec_from_file_location(name, ref.target)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(ref.target)
    except ModuleNotFoundError as err:
        raise LookupError(f"module not found ({err.name})") from err
    except BaseException as err:  # user code at import time: report it, don't crash
        raise LookupError(f"importing '{ref.target}' failed: {type(err).__name__}: {err}") from err
    fn = getattr(module, ref.function, None)
    if not callable(fn):
        raise LookupError(f"'{ref.target}' has no function '{ref.function}'")
    return fn


def check_value(value: Any) -> tuple[float | None, str | None, str | None]:
    """(score, reason, error) from what the evaluator returned."""
    reason = None
    if isinstance(value, dict):
        if "score" not in value:
            return None, None, "returned a dict without 'score'"
        reason = value.get("reason")
        reason = None if reason is None else str(reason)
        value = value["score"]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are Real too
        return None, reason, f"returned {type(value).__name__}, expected a number in [0, 1]"
    score = float(value)
    if math.isnan(score) or not 0.0 <= score <= 1.0:
        return None, reason, f"returned {score!r}, outside [0, 1]"
    return score, reason, None


def _worker_main(conn: Connection, ref: EvaluatorRef) -> None:
    try:
        fn = load_function(ref)
    except LookupError as err:
        conn.send(("bad_id", str(err)))
        return
    conn.send(("ready", None))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        idx, messages, completion = msg
        try:
            score, reason, error = check_value(fn(messages, completion))
        except BaseException as err:  # noqa: BLE001 - any failure of user code is data
            score, reason, error = None, None, f"raised {type(err).__name__}: {err}"
        conn.send((idx, score, reason, error))


def _worker_entry() -> None:
    """``python -c`` entry of a worker: argv = [fd, ref as JSON]; sys.path comes from PYTHONPATH."""
    fd, ref = int(sys.argv[1]), EvaluatorRef(**json.loads(sys.argv[2]))
    sys.path.insert(0, os.getcwd())  # package.module ids resolve from where the user ran preftune
    _worker_main(Connection(fd), ref)


def _stderr_fd() -> int:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stderr has no descriptor
        return subprocess.DEVNULL


class _Worker:
    """One worker: a fresh interpreter (not multiprocessing, so nothing re-imports the caller's
    __main__), talking pickled messages over a socket pair."""

    def __init__(self, ref: EvaluatorRef):
        parent, child = socket.socketpair()
        env = child_environ({"PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))})
        # The installed name: `judges` is a top-level folder only in a checkout's working directory (a
        # run started from the UI runs in whatever folder `preftune up` was started in).
        code = "from preftune.judges.evaluators import _worker_entry; _worker_entry()"
        self.proc = popen([sys.executable, "-c", code, str(child.fileno()), json.dumps(asdict(ref))],
                          pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL,
                          stdout=_stderr_fd())  # user prints must not pollute --json stdout
        child.close()
        self.conn = Connection(parent.detach())
        self.ready = False
        self.started = time.monotonic()
        self.item: int | None = None
        self.deadline = math.inf

    @property
    def exitcode(self) -> int | None:
        try:
            return self.proc.wait(2)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, kill: bool = False) -> None:
        if not kill and self.proc.poll() is None:
            try:
                self.conn.send(None)
                self.proc.wait(2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.conn.close()


class _Pool:
    """The parent side: hand out items, collect answers, enforce deadlines."""

    def __init__(self, ref: EvaluatorRef, n_workers: int, timeout: float):
        self.ref, self.timeout = ref, timeout
        self.workers = [self._spawn() for _ in range(max(1, n_workers))]

    def _spawn(self) -> _Worker:
        return _Worker(self.ref)

    def _replace(self, w: _Worker) -> None:
        w.stop(kill=True)
        self.workers[self.workers.index(w)] = self._spawn()

    def _on_message(self, w: _Worker, msg: Any, results: list[dict | None]) -> None:
        if msg[0] == "bad_id":
            raise UserError(f"evaluator '{self.ref.evaluator_id}': {msg[1]}")
        if msg[0] == "ready":
            w.ready = True
            return
        idx, score, reason, error = msg
        results[idx] = {"score": score, "reason": reason, "error": error}
        w.item, w.deadline = None, math.inf

    def _fail_item(self, w: _Worker, results: list[dict | None], error: str) -> None:
        if w.item is not None:
            results[w.item] = {"score": None, "reason": None, "error": error}
        self._replace(w)

    def _poll(self, results: list[dict | None], wait_s: float) -> None:
        for conn in wait([w.conn for w in self.workers], timeout=wait_s):
            w = next(x for x in self.workers if x.conn is conn)
            try:
                self._on_message(w, conn.recv(), results)
            except (EOFError, OSError):
                code = w.exitcode  # the pipe closed: the worker is exiting
                if not w.ready:
                    raise UserError(f"evaluator '{self.ref.evaluator_id}': worker exited while "
                                    f"loading (exit code {code})") from None
                self._fail_item(w, results, f"evaluator process died (exit code {code})")

    def wait_ready(self) -> None:
        """Block until one worker has loaded the function (a bad id raises UserError here)."""
        while not any(w.ready for w in self.workers):
            if time.monotonic() - self.workers[0].started > START_TIMEOUT_S:
                raise UserError(f"evaluator '{self.ref.evaluator_id}': did not load within "
                                f"{START_TIMEOUT_S:g} s")
            self._poll([], 0.5)

    def run(self, items: Sequence[EvalItem]) -> list[dict]:
        results: list[dict | None] = [None] * len(items)
        pending = deque(range(len(items)))
        self.wait_ready()
        while pending or any(w.item is not None for w in self.workers):
            now = time.monotonic()
            for w in list(self.workers):
                if w.ready and w.item is None and pending:
                    w.item = pending.popleft()
                    w.deadline = now + self.timeout
                    it = items[w.item]
                    try:
                        w.conn.send((w.item, it.messages, it.completion))
                    except OSError:  # it died between items
                        self._fail_item(w, results, f"evaluator process died (exit code {w.exitcode})")
                elif w.item is not None and now > w.deadline:
                    self._fail_item(w, results, f"timed out after {self.timeout:g} s")
            next_deadline = min((w.deadline for w in self.workers), default=math.inf)
            self._poll(results, max(0.0, min(next_deadline - time.monotonic(), 0.5)))
        return [r for r in results if r is not None]

    def close(self) -> None:
        for w in self.workers:
            w.stop()


def run_evaluator(evaluator_id: str, items: Sequence[EvalItem], *, timeout: float = 30.0,
                  workers: int = 2) -> list[dict]:
    """Score every item; one ``{"key", "score", "reason", "error"}`` per item, in order.

    With no items it still loads the evaluator once, so a bad id fails before any other work.
    """
    ref = parse_evaluator_id(evaluator_id)
    pool = _Pool(ref, min(workers, max(1, len(items))), timeout)
    try:
        results = pool.run(items)
    finally:
        pool.close()
    return [{"key": it.key, **r} for it, r in zip(items, results, strict=True)]
