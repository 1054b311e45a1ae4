"""The approvals log, ``approvals.jsonl``: every accepted decision of a run, one line each, appended by
``flows/approvals.py``. A resumed run reads it (a question answered before is not asked again) and the
report lists it; each line is checked when read (``preftune.checked``), before anything is spent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from preftune.checked import read_checked


class Approval(BaseModel):
    """One recorded decision: which question (`kind`, `context`), who answered, and the answer."""

    model_config = ConfigDict(strict=True, extra="allow")
    time: str
    kind: str = Field(min_length=1)
    by: str
    flow_run_id: str
    values: dict[str, Any]
    context: dict[str, Any]


def read_approvals(path: str | Path) -> list[dict[str, Any]]:
    """Every decision in the file, checked (a UserError names file:line of one that is not a decision)."""
    return [line.model_dump() for _, line in read_checked(path, lambda obj: Approval, "approvals")]
