"""The run's dashboard in the Prefect UI: one artifact card per kind (the plan question, the sweep table,
each phase's progress, the report), created once per flow run and then updated in place.

Prefect 3.8's `create_*_artifact` with a key adds a new version each call, and the flow run's
Artifacts tab shows every version as its own card (4x `sweep-results` after a sweep refreshed its
table four times). `client.update_artifact` rewrites a card's data; the server updates the key's
latest version with it, so the Artifacts page by key shows the same card.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import threading
import time
from collections.abc import Callable
from uuid import UUID

from prefect import runtime
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate

from preftune import fmt

_lock = threading.Lock()
_cards: dict[tuple[str, str], UUID] = {}  # (flow run id, key) -> the card's artifact id


def _update(artifact_id: UUID, data: str, description: str | None) -> None:
    update = ArtifactUpdate(data=data) if description is None else ArtifactUpdate(data=data, description=description)
    with get_client(sync_client=True) as client:
        client.update_artifact(artifact_id, update)


def _show(key: str, data: str, description: str | None, create) -> UUID:
    where = (str(runtime.flow_run.id or ""), key)
    with _lock:
        known = _cards.get(where)
        if known is None:
            _cards[where] = known = create()
            return known
    _update(known, data, description)
    return known


def show_markdown(key: str, markdown: str, description: str | None = None) -> UUID:
    """The card `key` of this flow run shows `markdown` (created the first time, updated after)."""
    return _show(key, markdown, description,
                 lambda: create_markdown_artifact(markdown=markdown, key=key, description=description))


def table_rows(rows: list[dict], labels: dict[str, str] | None = None) -> list[dict]:
    """Rows as a person reads them: floats formatted (fmt.cell), columns renamed by `labels`."""
    labels = labels or {}
    return [{labels.get(k, k): fmt.cell(v) for k, v in row.items()} for row in rows]


def show_table(key: str, rows: list[dict], description: str | None = None) -> UUID:
    """The table card `key` of this flow run shows `rows` (already formatted: see `table_rows`)."""
    return _show(key, json.dumps(rows), description,
                 lambda: create_table_artifact(table=rows, key=key, description=description, _sync=True))


class Heartbeat:
    """What the run is doing, on stderr at least every `every` seconds (a person at a terminal sees the
    run move: a sweep job trains for minutes between log lines, and on a loaded machine a phase can be
    silent for many more). The phases say where they are with `phase()`; a progress source (the sweep
    table, a phase's counts) adds how far."""

    def __init__(self, every: float = 10.0):
        self.every, self.start = every, time.monotonic()
        self.what, self.since = "starting", self.start
        self.progress: Callable[[], str | None] | None = None  # set and cleared by a phase's progress card
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="preftune-heartbeat")
        self.thread.start()

    def phase(self, what: str) -> None:
        self.what, self.since = what, time.monotonic()

    def line(self) -> str:
        now = time.monotonic()
        try:
            detail = self.progress() if self.progress else None
        except Exception:  # a progress source mid-update: the line without it
            detail = None
        return (f"preftune [{fmt.duration(now - self.start)}]: {self.what}, {fmt.duration(now - self.since)}"
                + (f" — {detail}" if detail else ""))

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            print(self.line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


_beat: list[Heartbeat] = []


def beat() -> Heartbeat | None:
    """The running flow's heartbeat (None outside a run: plain functions and tests call phases too)."""
    return _beat[-1] if _beat else None


def say(what: str) -> None:
    """Tell the heartbeat what the run does now (nothing outside a run)."""
    if _beat:
        _beat[-1].phase(what)


def show_progress(source: Callable[[], str | None] | None) -> None:
    """How far the current phase is, for the heartbeat line (None: no longer)."""
    if _beat:
        _beat[-1].progress = source


@contextlib.contextmanager
def heartbeat(every: float = 10.0):
    hb = Heartbeat(every)
    _beat.append(hb)
    try:
        yield hb
    finally:
        _beat.remove(hb)
        hb.close()


def announced(fn: Callable, what: str) -> Callable:
    """`fn` that first tells the heartbeat `what` it does (a phase's task)."""

    @functools.wraps(fn)
    def phase(*args, **kwargs):
        say(what)
        return fn(*args, **kwargs)

    return phase


def sweep_line(rows: list[dict]) -> str:
    """The sweep in one line: "1/4 jobs finished; running: a (step 30), b (step 12)"."""
    done = sum(r["status"] in ("finished", "failed") for r in rows)
    running = [f"{r['job']} (step {r['step']})" if r.get("step") is not None else r["job"]
               for r in rows if r["status"] == "running"]
    return f"{done}/{len(rows)} jobs finished" + (f"; running: {', '.join(running)}" if running else "")
