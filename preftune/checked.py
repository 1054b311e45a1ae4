"""Append-only JSONL records read back with a schema check: the cost ledger and the approvals log.

A resumed run believes these files (what was spent, what a person decided), so each line is checked
when read. A line that is JSON but not a valid record (``[]``, ``"usd": "free"``) is refused with one
line naming the file and the line; the file is never rewritten. A line that is not JSON at all is one
cut short by a crash or a full disk while it was appended: skipped, with a warning naming it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from preftune.errors import UserError

log = logging.getLogger(__name__)

Pick = Callable[[dict], "type[BaseModel] | None"]  # the schema of one line (None: no such kind of line)


def check_line(obj: Any, pick: Pick) -> tuple[BaseModel | None, str]:
    """(the validated line, "") or (None, the problem in a few words)."""
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {json.dumps(obj)[:40]}"
    model = pick(obj)
    if model is None:
        return None, f"kind: unknown value {json.dumps(obj.get('kind'))[:40]}"
    try:
        return model.model_validate(obj), ""
    except ValidationError as err:
        first = err.errors()[0]
        msg = first["msg"].removeprefix("Value error, ")
        return None, f"{'.'.join(str(p) for p in first['loc'])}: {msg}" if first["loc"] else msg


def parse_line(raw: bytes | str, path: Path, number: int, pick: Pick, what: str) -> BaseModel | None:
    """One line: the checked record; None for a blank line or one cut short (not JSON: skipped, with a
    warning); a UserError naming file:line for a JSON line that is not a `what` record."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        log.warning("%s:%d: a line cut short (not JSON) is skipped", path, number)
        return None
    line, problem = check_line(obj, pick)
    if line is None:
        raise UserError(f"not a valid {what} line: {problem}; preftune never rewrites this file: restore the "
                        "line or move the file aside", path=path, line=number)
    return line


def read_checked(path: str | Path, pick: Pick, what: str) -> list[tuple[int, BaseModel]]:
    """Every record of the file with its line number (none when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            line = parse_line(raw, path, number, pick, what)
            if line is not None:
                out.append((number, line))
    return out
