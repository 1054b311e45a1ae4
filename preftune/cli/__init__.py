"""The `preftune` command. Each sub-command lives in its own module `preftune/cli/<name>.py`
exposing ``add_parser(subparsers)`` (which calls ``set_defaults(func=run)``) and
``run(args) -> int``. Heavy imports (torch, prefect) happen inside ``run`` so that
``preftune --help`` and error paths stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from preftune.errors import UserError

COMMANDS = ["inspect", "zoo", "train", "pairs", "evaluate", "run", "demo", "serve", "approve", "deploy"]


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
                    "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def _quiet_library_warnings() -> None:
    # peft 0.21 asks transformers 5 a deprecated question on every adapter load; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    _quiet_library_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except UserError as err:
        print(f"preftune {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted; finished work is kept in the workspace, re-run to resume", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
