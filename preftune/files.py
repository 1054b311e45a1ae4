"""File primitives every phase shares: atomic writes, locks, content fingerprints.

A crash (or a full disk) at any moment must leave either the old file or the new one, never a
half-written file that a re-run would trust: every output goes through a temporary name in the
same folder, is flushed to disk, and is renamed into place. Locks are `fcntl` advisory locks on a
side file, so concurrent processes (sweep jobs, two servers, a second zoo build) wait instead of
racing, and a lock dies with the process that held it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_output(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path` (mode "w" or "wb"); on a clean exit it is fsynced and
    renamed over `path`, on an error it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_output(path) as fh:
        fh.write(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    with atomic_output(path) as fh:
        json.dump(obj, fh, indent=2, default=str)
        fh.write("\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> None:
    """Replace `path` with one JSON object a line, atomically."""
    with atomic_output(path) as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside `path` to fill; on a clean exit it replaces `path` (the old
    folder is moved aside first, then removed), on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(new: Path, path: Path) -> None:
    """Put the finished folder `new` at `path` (same filesystem), moving an old `path` aside first:
    `path` is at every moment either the old folder, missing for an instant, or the new one."""
    if path.exists():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
        old.rmdir()
        path.rename(old)
        new.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(path)


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# A record a resume reads back (a job's summary, the pair phase's done.json) carries the sha256 of
# its own canonical JSON under this key: a torn, truncated or edited file is found out, not believed.
SEAL = "content_sha256"
log = logging.getLogger("preftune")


def content_digest(record: dict) -> str:
    """sha256 of ``record``'s canonical JSON, its seal left out (what the seal is taken over)."""
    body = {k: v for k, v in record.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def sealed(record: dict) -> dict:
    """``record`` as it reads back from JSON, with its seal."""
    plain = json.loads(json.dumps(record, default=str))
    return plain | {SEAL: content_digest(plain)}


def write_sealed_json(path: str | Path, record: dict) -> dict:
    """Write ``record`` with its seal, atomically; returns what was written."""
    out = sealed(record)
    write_json_atomic(path, out)
    return out


def read_sealed_json(path: str | Path, action: str = "it is recomputed") -> dict | None:
    """The sealed record at ``path``, or None when it is missing, unreadable, not a JSON object or
    not what was sealed (torn, truncated, edited): that is logged in one line, and the caller
    recomputes it, as it would a missing one."""
    path = Path(path)
    try:
        record = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return stale(path, f"unreadable ({type(err).__name__})", action)
    if not isinstance(record, dict) or record.get(SEAL) != content_digest(record):
        return stale(path, "does not match its content hash (torn or edited)", action)
    return record


def stale(path: str | Path, problem: str, action: str = "it is recomputed") -> None:
    """One log line for an artifact a resume will not trust (``action``: what happens instead);
    returns None, what a missing artifact reads as."""
    log.warning("%s: %s; %s", path, problem, action)
    return None


def read_jsonl_rows(path: str | Path) -> list[dict]:
    """The JSON objects of an append-only JSONL file, in order ([] when it is missing); a line a
    crash tore (or any line that is not an object) is skipped, as ``append_jsonl`` promises."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one line and fsync it: an appended record survives a crash right after; a crash
    during the write leaves a torn last line, which ``read_jsonl_rows`` skips."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing), held for the block; other processes wait."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _Hashing:
    """A write-only file that hashes what passes through it (torch.save needs only ``write``)."""

    def __init__(self, fh: IO) -> None:
        self.fh, self.digest = fh, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


@contextmanager
def digested_output(path: str | Path, digests: str | Path) -> Iterator[IO]:
    """``atomic_output(path, "wb")``, hashed as it is written: its sha256 goes into ``digests`` (a JSON
    list, [new, previous]) before the file is renamed into place, so a crash between the two renames
    still leaves a pair that matches. ``matches_recorded`` checks it on the way back."""
    with atomic_output(path, "wb") as fh:
        sink = _Hashing(fh)
        yield sink
        write_json_atomic(digests, [sink.digest.hexdigest(), *recorded_digests(digests)[:1]])


def recorded_digests(digests: str | Path) -> list:
    """The sha256s ``digested_output`` recorded ([] when none can be read)."""
    try:
        found = read_json(digests)
    except (OSError, ValueError):
        return []
    return found if isinstance(found, list) else []


def matches_recorded(path: str | Path, digests: str | Path) -> bool:
    """Whether ``path``'s bytes are the ones ``digested_output`` wrote (a torn or edited file is not)."""
    return file_sha256(path) in recorded_digests(digests)


def file_sha256(path: str | Path) -> str:
    """Content hash of a file, read in 1 MiB chunks (datasets and weights can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_fingerprint(path: str | Path, *, content: bool = True) -> str:
    """Identity of a folder: sha256 over each file's relative name and either its bytes
    (`content=True`: an adapter that was retrained to the same bytes keeps its identity) or its
    size and mtime (`content=False`: cheap, for multi-GB model folders where a re-save counts as new)."""
    root = Path(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(root)).encode() + b"\x00")
        if content:
            digest.update(bytes.fromhex(file_sha256(f)))
        else:
            st = f.stat()
            digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


class LockHeld(Exception):
    """Another live process holds the lock; `holder` is what it wrote into the lock file."""

    def __init__(self, path: Path, holder: dict):
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


@contextmanager
def exclusive(path: str | Path, holder: dict) -> Iterator[None]:
    """Hold `path` exclusively for the block, without waiting: LockHeld at once when a live process
    holds it. `holder` (pid, run id, ...) is written into the file so a refused caller can name the
    holder. The kernel drops the lock when its process dies, however it dies (kill -9 included),
    so a lock left by a killed run is simply taken over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as fh:  # "a+": opening must not wipe the holder's record
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            try:
                found = json.loads(fh.read() or "{}")
            except ValueError:
                found = {}
            raise LockHeld(path, found) from None
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps(holder))
            fh.flush()
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
