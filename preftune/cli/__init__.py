"""The `preftune` command. Each sub-command lives in its own module `preftune/cli/<name>.py`
exposing ``add_parser(subparsers)`` (which calls ``set_defaults(func=run)``) and
``run(args) -> int``. Heavy imports (torch, prefect) happen inside ``run`` so that
``preftune --help`` and error paths stay fast.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import importlib
import os
import signal
import sys
import threading
import warnings

from preftune import procs
from preftune.cli.prefect_auth import refused, refused_message, use_saved_auth
from preftune.errors import RunEnded, UserError

COMMANDS = ["inspect", "zoo", "train", "pairs", "evaluate", "run", "plan", "demo", "serve", "up", "approve", "deploy"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preftune", description="Self-hostable preference learning: inspect, pairs, train, evaluate, deploy.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"preftune.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"preftune.cli.{name}":
                raise
            continue  # not built yet
        module.add_parser(sub)
    return parser


# preftune runs offline and self-hosted: no Prefect telemetry (it would only fail, with a traceback,
# on machines without network), and no hub look-ups for local model folders.
OFFLINE_DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                    "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
                    # transformers' per-load "Loading weights" bars interleave with the flow's log
                    # lines; preftune shows its own progress (terminal bars, Prefect artifacts).
                    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                    # The ephemeral Prefect API `run`/`demo` start when PREFECT_API_URL is unset: its
                    # default 20 s start-up limit is missed on a loaded 2-core machine (seen: `demo --real`
                    # failed at start beside two busy model servers).
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


def _quiet_library_warnings() -> None:
    # peft 0.21 asks transformers 5 a deprecated question on every adapter load; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# After SIGINT/SIGTERM a command cleans up (stops its model servers, runs exit hooks) and exits;
# whatever still hangs then (a worker thread blocked in a request) is cut off at this deadline.
# Every child preftune starts dies with it (preftune.procs), so a hard exit leaves nothing behind.
EXIT_DEADLINE_S = 7.0
PREFECT_COMMANDS = {"run", "demo", "approve", "serve", "up"}
_signalled: list[int] = []
_armed: list[int] = []  # the signal that started the exit deadline (it runs once)


def _hard_exit(code: int) -> None:
    try:
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        os._exit(code)


def _arm_deadline(signum: int) -> None:
    """Start the exit deadline (once): at EXIT_DEADLINE_S after the first signal, the process exits."""
    if not _armed:
        _armed.append(signum)
        timer = threading.Timer(EXIT_DEADLINE_S, _hard_exit, (128 + signum,))
        timer.daemon = True
        timer.start()


def _deadline_on_prefect_sigterm() -> None:
    """Inside a flow run, Prefect's engine replaces our SIGTERM handler with its own, which raises
    TerminationSignal in the flow and calls ours only once the flow has unwound — after the sweep's
    jobs have trained to the end (a 9.5-minute wait was seen). So Prefect's handler (installed by
    name from its module) arms our deadline first."""
    from prefect.utilities import engine

    prefect_handler = engine._prefect_sigterm_handler
    if getattr(prefect_handler, "preftune_deadline", False):
        return

    def handler(signum: int, frame: object) -> None:
        _arm_deadline(signum)
        prefect_handler(signum, frame)

    handler.preftune_deadline = True  # type: ignore[attr-defined]
    engine._prefect_sigterm_handler = handler


def _on_signal(signum: int, frame: object) -> None:
    _arm_deadline(signum)
    _signalled.append(signum)
    if len(_signalled) == 1 and procs.request_stop():  # the work stops at its next step (a job checkpoints)
        return
    if len(_signalled) == 1 and threading.current_thread() is threading.main_thread():
        raise KeyboardInterrupt


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM interrupt the command (KeyboardInterrupt) and arm the exit deadline."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _on_signal)


def _interrupted(args: argparse.Namespace | None = None) -> int:
    """Stop what we started and exit now: non-daemon threads (requests in flight) are not waited for.
    A command whose module defines INTERRUPTED says that instead of a run's message."""
    code = 128 + (_signalled[0] if _signalled else signal.SIGINT)
    _on_signal_deadline()
    module = sys.modules.get(getattr(getattr(args, "func", None), "__module__", ""))
    print(getattr(module, "INTERRUPTED", "interrupted; finished work is kept in the workspace, re-run to resume"),
          file=sys.stderr)
    server = sys.modules.get("preftune.server")
    if server is not None:
        server.stop_owned()
    atexit._run_exitfuncs()
    _hard_exit(code)
    return code  # pragma: no cover


def _on_signal_deadline() -> None:
    if not _signalled:  # a KeyboardInterrupt not from our handler: arm the deadline all the same
        _signalled.append(signal.SIGINT)
        _arm_deadline(signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    use_saved_auth()  # the credentials of a server `preftune up` started, before Prefect reads its settings
    _quiet_library_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    _signalled.clear()
    _armed.clear()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    install_signal_handlers()
    try:
        return _main(args)
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _ran_out(err: BaseException) -> str | None:
    """What a resource error ran out of, as the CLI's one line ("disk full writing X", "file size
    limit...", "out of memory..."); None for any other error. Looks through the chain: the error can
    arrive wrapped (a worker thread, an event loop)."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            what, fix = {errno.ENOSPC: ("disk full", "free some space"),
                         errno.EFBIG: ("file size limit reached", "raise it (ulimit -f)"),
                         errno.EDQUOT: ("disk quota exceeded", "free some space")}[err.errno]
            return what + (f" writing {err.filename}" if err.filename else "") + f": {fix}"
        if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or (
                isinstance(err, RuntimeError) and any(m in str(err) for m in _OOM_MESSAGES)):
            first = " ".join(str(err).split())[:160]
            return "out of memory" + (f" ({first})" if first else "") + ": free memory, use smaller batches or " \
                "a smaller model (or raise ulimit -v)"
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


# How torch (CPU allocator, CUDA caching allocator) and C++ report a failed allocation.
_OOM_MESSAGES = ("can't allocate memory", "out of memory", "std::bad_alloc", "Cannot allocate memory")


def _main(args: argparse.Namespace) -> int:
    try:
        if args.command in PREFECT_COMMANDS:
            from preftune.cli.prefect_auth import temporary_auth
            from preftune.cli.prefect_server import die_with_us

            if args.command != "up":  # `preftune up` starts its own server, with its own auth string
                temporary_auth()  # before Prefect is imported: it reads its settings once

            die_with_us()
            _deadline_on_prefect_sigterm()
        code = args.func(args)
    except UserError as err:
        print(f"preftune {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except RunEnded as end:  # a phase run alone stopped on purpose (e.g. at the ledger's budget cap)
        print(f"preftune {args.command}: {end.status}: {end.reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _interrupted(args)
    except (OSError, MemoryError, RuntimeError) as err:
        what = _ran_out(err)
        if what is None:
            raise
        # Every output is written atomically (preftune.files) or appended line by line with torn
        # lines skipped on reading, and a job resumes from its last checkpoint: a re-run after
        # freeing the resource trusts nothing half-written.
        print(f"preftune {args.command}: error: {what}; re-run to resume (finished work is kept)", file=sys.stderr)
        return 2
    except Exception as err:
        if not refused(err):
            raise
        # A Prefect server `preftune up` started asks for its auth string: one line, never the string.
        print(f"preftune {args.command}: error: {refused_message()}", file=sys.stderr)
        return 2
    if _signalled:  # a signal the command itself caught (Prefect's serve loop): still exit promptly
        return _interrupted(args)
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
