"""Small helpers shared by the sub-commands."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def is_tty() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def ticking(what: str, every_s: float = 10.0) -> Iterator[None]:
    """Print "<what>: N s so far" every `every_s` while the block runs: a step of unknown length (a
    model conversion) says it is alive at the same pace as the zoo build and the flow."""
    from preftune import fmt

    print(f"{what} ...", flush=True)
    t0, stop = time.monotonic(), threading.Event()

    def tick() -> None:
        while not stop.wait(every_s):
            print(f"{what}: {fmt.duration(time.monotonic() - t0)} so far", flush=True)

    threading.Thread(target=tick, daemon=True, name="ticking").start()
    try:
        yield
    finally:
        stop.set()
