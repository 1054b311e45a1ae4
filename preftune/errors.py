"""User-facing errors: one line naming the file, the line and the problem; the CLI exits 2."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with what the user gave us (a file, a flag, an endpoint), not a bug.

    The CLI prints ``str(err)`` on one line and exits with code 2, never a traceback.
    """

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.line = line
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = self.path or ""
        if self.path and self.line is not None:
            where = f"{self.path}:{self.line}"
        return f"{where}: {self.message}" if where else self.message


class RunEnded(Exception):
    """The run stops here on purpose (a rejection, too little to go on): not a crash. `status` is
    what outcome.json records ("rejected", "failed"), `reason` the one line a person reads."""

    def __init__(self, status: str, reason: str, outcome: dict | None = None):
        super().__init__(reason)
        self.status, self.reason = status, reason
        self.outcome = outcome  # what outcome.json holds, once the flow has written it


def run_outcome(result: object) -> object:
    """The outcome dict of a flow's result: a run that ended on purpose carries it on its RunEnded
    (the state's data must be an exception: Prefect's engine re-raises a Failed or Cancelled state's
    data after a deployment run, and a dict there is a TypeError with a traceback)."""
    if isinstance(result, RunEnded) and result.outcome is not None:
        return result.outcome
    return result
