"""The client's on-disk response cache: a re-run never pays twice for a finished request.

Keyed by a sha256 of exactly what determines a reply — where (base_url, or the endpoint's
``cache_id`` for a local server whose port changes between runs), the model, the messages and the
sampling parameters; never the key.

Storage is append-only: each cache object appends ``<key>\\t<json>\\n`` lines to a segment file of
its own (``seg-*.log`` — its own, so concurrent processes never interleave lines), with one
``write`` per reply and no file created per reply: at 64 requests in flight, creating a file per
reply (open + write + rename) was a large share of the client's CPU (bench/bench_pairs.py).
Opening a cache indexes every segment (key → file, offset, length) without parsing the replies;
``get`` reads one line back. Each line carries the sha256 of its own record (``files.sealed``): a
line torn by a crash, or a reply edited by hand, fails its checks and reads as a miss, so a crash
can cost one request, never a wrong reply. Caches written by earlier versions (one
``??/<key>.json`` file per reply) are still read.

A reply the caller rejected (a judge reply without a verdict) is stored with ``"rejected": n`` (how
many replies to that request were rejected so far): it is not final, and the client asks again
(``preftune.client``). When one key has several lines (a re-ask, a race), the index keeps the most
final one: an accepted reply over any rejected one, then the most re-asked, then the last read.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.files import SEAL, content_digest, sealed

if TYPE_CHECKING:
    from preftune.endpoint import Endpoint

KEY_LEN = 64  # hex sha256
MAX_REPLY_BYTES = 1_000_000  # a chat reply larger than this is a bad reply (preftune.client): never stored
# A cache line longer than any reply within that limit can be (JSON escaping at most doubles it) was
# written before replies were bounded (issue 21: 10 MB judge replies): not read back, asked again.
MAX_LINE = 2 * MAX_REPLY_BYTES + 65_536


def request_key(endpoint: Endpoint, messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
    """sha256 of exactly what determines the reply: where, which model, the messages, sampling params."""
    where = endpoint.cache_id or endpoint.base_url.rstrip("/")
    canonical = json.dumps({"base_url": where, "model": endpoint.model,
                            "messages": messages, "params": params},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResponseCache:
    """Append-only segments of ``<key>\\t<json>\\n`` lines, indexed when opened; see the module docstring."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._index: dict[str, tuple[Path, int, int]] = {}  # key -> (segment, offset, length)
        self._fds: dict[Path, int] = {}  # open segments, read with pread: no open() per hit
        self._segment: Path | None = None  # our own segment, created on the first put
        self._offset = 0
        # The older layout (a file per reply, in folders named by the key's first two characters) is not
        # read: its replies were unsealed, so a planted file could not be told from a reply (#21).
        if self.root.is_dir():
            for seg in sorted(self.root.glob("seg-*.log")):
                self._scan(seg)

    def _scan(self, seg: Path) -> None:
        offset = 0
        with open(seg, "rb") as fh:
            for line in fh:
                if (KEY_LEN + 1 < len(line) <= MAX_LINE and line.endswith(b"\n")
                        and line[KEY_LEN:KEY_LEN + 1] == b"\t"):
                    key = line[:KEY_LEN].decode("ascii", errors="replace")
                    old = self._index.get(key)
                    # a key seen twice (rare: a re-ask): parse both, keep the more final reply
                    if old is None or _rank(_checked(_parse(line), key)) >= _rank(_checked(self._read(old), key)):
                        self._index[key] = (seg, offset, len(line))
                offset += len(line)

    def _read(self, where: tuple[Path, int, int]) -> dict[str, Any] | None:
        seg, offset, length = where
        try:
            if seg not in self._fds:
                self._fds[seg] = os.open(seg, os.O_RDONLY)
            return _parse(os.pread(self._fds[seg], length, offset))
        except OSError:
            return None

    def __len__(self) -> int:
        return len(self._index)

    def get(self, key: str) -> dict[str, Any] | None:
        where = self._index.get(key)
        if where is None:
            return None
        return _checked(self._read(where), key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        if len(key) != KEY_LEN:
            raise ValueError(f"cache keys are {KEY_LEN} hex characters")
        record = sealed({"key": key, **entry})  # an edited reply no longer matches: a miss, asked again
        line = key.encode("ascii") + b"\t" + json.dumps(record, ensure_ascii=False).encode() + b"\n"
        if self._segment is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._segment = self.root / f"seg-{uuid.uuid4().hex}.log"
            self._fds[self._segment] = os.open(self._segment, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        written = os.write(self._fds[self._segment], line)  # one write per reply: a crash tears at most this line
        if written == len(line):
            self._index[key] = (self._segment, self._offset, len(line))
        self._offset += written

    def close(self) -> None:
        """Close the open segments; a later put starts a new segment of its own."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds, self._segment, self._offset = {}, None, 0

    def __del__(self) -> None:
        self.close()


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(line[KEY_LEN + 1:])
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def _rank(entry: dict[str, Any] | None) -> tuple[int, int]:
    """How final a stored reply is: unreadable < rejected (more re-asks higher) < accepted."""
    if entry is None:
        return (0, 0)
    rejected = int(entry.get("rejected") or 0)
    return (1, rejected) if rejected else (2, 0)


def _checked(entry: Any, key: str) -> dict[str, Any] | None:
    """The entry when it is the reply stored for ``key``, as stored (a torn, foreign or edited
    record is a miss)."""
    if not (isinstance(entry, dict) and entry.get("key") == key and entry.get(SEAL) == content_digest(entry)):
        return None
    return {k: v for k, v in entry.items() if k != SEAL}
