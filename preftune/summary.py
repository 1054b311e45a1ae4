"""A training job's ``summary.json``: written sealed, believed only once verified.

Its presence means "this job is finished": a re-run skips the job, phase 5 evaluates the weights it
names and deploy serves them. So it is written with its content hash and the content fingerprint of
the job's weights folder, and read back only when both still hold and the folder it names is the
job's own (``<job>/adapter`` or ``<job>/model``): a truncated or edited summary, a foreign
``adapter_dir`` or weights changed behind it make the job unfinished (one log line), and it trains
again.
"""

from __future__ import annotations

from pathlib import Path

from preftune.files import read_sealed_json, stale, tree_fingerprint, write_sealed_json
from preftune.job import SUMMARY_FILE

_RERUN = "the job runs again"


def weights_dir(out: str | Path, full: bool) -> Path:
    """Where a job writes its trained weights: a PEFT adapter, or a full model after --full."""
    return Path(out) / ("model" if full else "adapter")


def write_summary(out: str | Path, summary: dict) -> dict:
    """Seal ``summary`` with the fingerprint of the job's weights folder and write it (last)."""
    folder = weights_dir(out, bool(summary.get("full")))
    return write_sealed_json(Path(out) / SUMMARY_FILE, summary | {"weights_sha256": tree_fingerprint(folder)})


def verified_summary(out: str | Path) -> dict | None:
    """The job's summary when it is intact and names the job's own, unchanged weights; else None."""
    path = Path(out) / SUMMARY_FILE
    summary = read_sealed_json(path, _RERUN)
    if summary is None:
        return None
    folder = weights_dir(out, bool(summary.get("full")))
    named = summary.get("model_dir" if summary.get("full") else "adapter_dir")
    # A workspace moved or copied elsewhere names its old path: the same <job>/<weights> tail is this
    # job's own folder (checked by content below), and the summary handed on names where it is now.
    if not isinstance(named, str) or Path(named).parts[-2:] != folder.parts[-2:]:
        return stale(path, f"names weights outside the job folder ({named!r})", _RERUN)
    if not folder.is_dir() or tree_fingerprint(folder) != summary.get("weights_sha256"):
        return stale(path, f"{folder} is missing or changed since the job finished", _RERUN)
    return summary | {"model_dir" if summary.get("full") else "adapter_dir": str(folder)}
