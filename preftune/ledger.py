"""The cost ledger: every paid request from the moment it is sent, and the run's spending cap.

A request sent is money possibly spent. ``ChatClient`` *reserves* each request in ``ledger.jsonl``
before it leaves, at its worst case (an upper bound of its prompt tokens plus its ``max_tokens``, at
the endpoint's prices), and *settles* it when the reply comes, with the reply's usage (checked to lie
within those bounds). A request whose server answered an HTTP error is *released* (nothing billed).
One never settled — in flight at a kill, timed out, or a reply whose usage could not be believed —
counts at its worst case, in the report and when a resumed run checks its cap.

Before a request is reserved, the ledger is read (the lines appended since the last look) and the
request is refused with :class:`BudgetReached` when spent + reserved + its worst case would pass the
cap: the ledger's total never exceeds the cap. Reading and appending happen under an exclusive
``flock`` of the file, so concurrent clients (threads, processes) cannot both take the last dollars.

Lines, one JSON object each, each appended with one ``write`` on an ``O_APPEND`` file::

    {"kind": "cap", "usd": 1.0 | null}                  the spending cap from here on (null: none)
    {"kind": "reserved", "request": ID, "phase", "endpoint", "prompt_tokens", "completion_tokens", "usd"}
    {"kind": "settled", "request": ID, ... the same fields: the reply's usage and its price}
    {"kind": "released", "request": ID, "phase", "endpoint", "reason"}
    a line without "kind": one paid request, as ledgers written before reservations hold them

(each with its ``time``). ``endpoint`` is ``model@base_url`` (never a key); ``usd`` comes from
``Endpoint.cost`` (the one price rule), ``null`` when the endpoint is unpriced: a phase with any
unpriced request has an unknown cost, never $0 (and the cap cannot hold it: the plan says so).
A request id counts once: a second reservation or settlement of it is ignored.

Every line is checked when read (``preftune.checked``): one that is JSON but not a ledger line (``[]``,
``"usd": "free"``) is refused with one line naming the file and line, and the file is never rewritten;
one that is not JSON at all was cut short by a crash or a full disk: skipped, with a warning.

Phases written: ``pairs`` (pair generation), ``completions`` (an endpoint model answering the
held-out prompts), ``rubric`` (the auto rubric) and ``evaluation`` (judge verdicts).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from preftune.checked import parse_line, read_checked
from preftune.errors import RunEnded, UserError

if TYPE_CHECKING:
    from preftune.endpoint import Endpoint

LEDGER_FILE = "ledger.jsonl"

# The report's cost rows and the ledger phases each one sums (the plan estimates the same: the
# generators, and the judge). "completions" (an endpoint answering held-out prompts, only from
# `preftune evaluate`: the flow's candidates are local) is listed in the report's ledger line.
REPORT_PHASES = {"pair_generation": ("pairs",), "evaluation": ("rubric", "evaluation")}

NANO = 10**9  # sums are kept in integer nano-dollars: a cap comparison never drifts with float sums


class BudgetReached(RunEnded):
    """The run's spending cap would be passed by the next request: nothing more is sent, the run ends failed."""

    def __init__(self, cap: float, committed: float, worst: float, path: Path):
        super().__init__("failed", f"budget cap ${cap:.2f} reached: ${committed:.2f} spent or reserved "
                         f"({path}); the next request (up to ${worst:.4f}) was not sent")
        self.cap, self.committed, self.worst = cap, committed, worst


# ---- the line schemas ----------------------------------------------------------------------------
_STRICT = ConfigDict(strict=True, extra="allow")


class _Paid(BaseModel):
    model_config = _STRICT
    time: str
    kind: Literal["reserved", "settled"] | None = None  # None: a paid line from before reservations
    request: str | None = Field(None, min_length=1)
    phase: str = Field(min_length=1)
    endpoint: str
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    usd: float | None = Field(ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _request_named(self):
        if self.kind is not None and self.request is None:
            raise ValueError(f"a {self.kind} line names its request")
        return self


class _Released(BaseModel):
    model_config = _STRICT
    time: str
    kind: Literal["released"]
    request: str = Field(min_length=1)
    phase: str = Field(min_length=1)
    endpoint: str
    reason: str


class _Cap(BaseModel):
    model_config = _STRICT
    time: str
    kind: Literal["cap"]
    usd: float | None = Field(ge=0, allow_inf_nan=False)


_KINDS: dict[Any, type[BaseModel]] = {None: _Paid, "reserved": _Paid, "settled": _Paid, "released": _Released,
                                      "cap": _Cap}


def _pick(obj: dict) -> type[BaseModel] | None:
    return _KINDS.get(obj.get("kind"))


# ---- the tally: what the file says, request by request --------------------------------------------
def _nano(usd: float | None) -> int:
    return 0 if usd is None else round(usd * NANO)


@dataclass
class _Book:
    """The ledger's lines folded into one entry per request that counts, and their USD sum."""

    cap: float | None = None
    entries: dict[str, dict] = field(default_factory=dict)  # request id (or "#line") -> its entry
    closed: set[str] = field(default_factory=set)  # ids settled or released: later lines change nothing
    committed: int = 0  # nano-USD of every entry: settled at their price, open reservations at worst

    def add(self, line: BaseModel, number: int) -> None:
        if isinstance(line, _Cap):
            self.cap = line.usd
            return
        rid = line.request or f"#{number}"
        if rid in self.closed:  # a duplicate settlement or release: counted once already
            return
        if isinstance(line, _Released):
            self.committed -= _nano(self.entries.pop(rid, {}).get("usd"))
            self.closed.add(rid)
            return
        assert isinstance(line, _Paid)
        if line.kind == "reserved" and rid in self.entries:
            return  # a second reservation of the same request
        self.committed -= _nano(self.entries.get(rid, {}).get("usd"))
        self.entries[rid] = {"time": line.time, "phase": line.phase, "endpoint": line.endpoint,
                             "prompt_tokens": line.prompt_tokens, "completion_tokens": line.completion_tokens,
                             "usd": line.usd, "settled": line.kind != "reserved"}
        self.committed += _nano(line.usd)
        if line.kind != "reserved":
            self.closed.add(rid)


@dataclass
class _Tally:
    """A process's running read of one ledger file: only lines appended since ``offset`` are parsed."""

    inode: tuple[int, int]
    offset: int = 0
    lines: int = 0
    book: _Book = field(default_factory=_Book)
    stopped: bool = False  # a request was refused at the cap: nothing more leaves until a cap is set again


_TALLIES: dict[str, _Tally] = {}
_GUARD = threading.Lock()  # one reader/appender per process at a time (the flock orders processes)


def _refresh(path: Path, fd: int) -> _Tally:
    st = os.fstat(fd)
    key = str(path.absolute())
    tally = _TALLIES.get(key)
    if tally is None or tally.inode != (st.st_dev, st.st_ino) or st.st_size < tally.offset:
        tally = _TALLIES[key] = _Tally((st.st_dev, st.st_ino))  # a new or replaced file: read it all
    if st.st_size > tally.offset:
        data = os.pread(fd, st.st_size - tally.offset, tally.offset)
        end = data.rfind(b"\n") + 1  # a last line without its newline is still being written
        try:
            for raw in data[:end].split(b"\n")[:-1]:
                tally.lines += 1
                line = parse_line(raw, path, tally.lines, _pick, "ledger")
                if line is not None:
                    tally.book.add(line, tally.lines)
        except UserError:
            _TALLIES.pop(key, None)
            raise
        tally.offset += end
    return tally


def _append(fd: int, path: Path, entry: dict) -> None:
    line = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        line = b"\n" + line  # a line cut short before (a full disk) stays a line of its own
    written = os.write(fd, line)  # unbuffered: in the file (the kernel's page cache) when this returns
    if written != len(line):
        raise OSError(errno.ENOSPC, "no space left on device", str(path))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Ledger:
    """Where requests are reserved and settled, and under which phase."""

    path: Path
    phase: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def with_phase(self, phase: str) -> Ledger:
        return replace(self, phase=phase)

    @contextlib.contextmanager
    def _open(self) -> Iterator[tuple[int, _Tally]]:
        """The file locked for this process (and others), with what it holds read up to its end."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _GUARD:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield fd, _refresh(self.path, fd)
            finally:
                os.close(fd)  # releases the flock

    def reserve(self, endpoint: Endpoint, prompt_tokens: int, completion_tokens: int) -> Hold:
        """Put a request about to be sent on record at its worst case; BudgetReached (nothing written)
        when spent + reserved + this worst case would pass the cap, and for every request after that
        (one that would still fit must not leave either: the phase is ending)."""
        usd = endpoint.cost(prompt_tokens, completion_tokens)
        hold = Hold(self, str(endpoint), uuid.uuid4().hex, usd)
        with self._open() as (fd, tally):
            book = tally.book
            over = usd is not None and book.committed + _nano(usd) > _nano(book.cap or 0.0)
            if book.cap is not None and (tally.stopped or over):
                tally.stopped = True
                raise BudgetReached(book.cap, book.committed / NANO, usd or 0.0, self.path)
            _append(fd, self.path, self._entry("reserved", hold.request, hold.endpoint,
                                               prompt_tokens, completion_tokens, usd))
        return hold

    def _entry(self, kind: str, request: str, endpoint: str, prompt_tokens: int, completion_tokens: int,
               usd: float | None) -> dict[str, Any]:
        return {"time": _now(), "kind": kind, "request": request, "phase": self.phase, "endpoint": endpoint,
                "prompt_tokens": int(prompt_tokens), "completion_tokens": int(completion_tokens),
                "usd": None if usd is None else round(usd, 9)}

    def set_cap(self, usd: float | None) -> None:
        """The most the requests on this ledger may cost from now on (None: no cap); written when it changes."""
        if usd is None and not self.path.exists():
            return  # nothing to hold and nothing spent: no file
        with self._open() as (fd, tally):
            tally.stopped = False  # a new approval: requests that fit may leave again
            if tally.book.cap != usd:
                _append(fd, self.path, {"time": _now(), "kind": "cap", "usd": usd})

    def totals(self) -> tuple[float | None, float]:
        """(the cap, USD spent or reserved so far)."""
        with self._open() as (_, tally):
            return tally.book.cap, tally.book.committed / NANO


@dataclass(frozen=True)
class Hold:
    """One reserved request, to be settled (the reply's usage) or released (an HTTP error: not billed)."""

    ledger: Ledger
    endpoint: str
    request: str
    worst_usd: float | None

    def settle(self, endpoint: Endpoint, prompt_tokens: int, completion_tokens: int) -> None:
        entry = self.ledger._entry("settled", self.request, self.endpoint, prompt_tokens, completion_tokens,
                                   endpoint.cost(prompt_tokens, completion_tokens))
        with self.ledger._open() as (fd, _):
            _append(fd, self.ledger.path, entry)

    def release(self, reason: str) -> None:
        entry = {"time": _now(), "kind": "released", "request": self.request, "phase": self.ledger.phase,
                 "endpoint": self.endpoint, "reason": reason}
        with self.ledger._open() as (fd, _):
            _append(fd, self.ledger.path, entry)


def read_ledger(path: str | Path) -> list[dict[str, Any]]:
    """One entry per request that counts, in the order first sent: settled ones with their usage, ones
    never settled at their worst case (``"settled": False``); released ones are left out. A line that
    is not a ledger line raises UserError naming file:line."""
    book = _Book()
    for number, line in read_checked(path, _pick, "ledger"):
        book.add(line, number)
    return list(book.entries.values())


def phase_totals(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ledger phase: requests, tokens, usd (None as soon as one request was unpriced), and how many
    requests count at their worst case (never settled)."""
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        t = out.setdefault(e["phase"], {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0,
                                        "unpriced": [], "unsettled": 0})
        t["requests"] += 1
        t["unsettled"] += not e.get("settled", True)
        t["prompt_tokens"] += int(e.get("prompt_tokens") or 0)
        t["completion_tokens"] += int(e.get("completion_tokens") or 0)
        if e.get("usd") is None:
            if e.get("endpoint") not in t["unpriced"]:
                t["unpriced"].append(e.get("endpoint"))
        else:
            t["usd"] += float(e["usd"])
    for t in out.values():
        t["usd"] = None if t["unpriced"] else round(t["usd"], 6)
    return out


def usd_of(entries: list[dict[str, Any]], phases: tuple[str, ...]) -> float | None:
    """USD paid in these phases; None (unknown) when any paid request among them was unpriced."""
    chosen = [e for e in entries if e["phase"] in phases]
    if any(e.get("usd") is None for e in chosen):
        return None
    return round(sum(float(e["usd"]) for e in chosen), 6)
