"""Phase 1 — inspect: validate a dataset, dedupe it, measure it, and split it 80/20 by prompt.

The source file is streamed once (never held in memory) and only read; canonical records go to
``data/train.jsonl`` and ``data/test.jsonl`` in the workspace, the report to ``inspection.json``.
The split is keyed by ``prompt_hash`` so it is the same on every machine and run, and one prompt
never lands on both sides. A re-run with the same inputs finds ``inspection.json`` and returns it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from preftune.errors import UserError
from preftune.files import file_sha256, read_json, write_json_atomic
from preftune.hf import load_tokenizer
from preftune.records import PAIR_FORMATS, RecordReader, check_dataset_path, prompt_hash, prompt_of
from preftune.spec import RunSpec
from preftune.tasks.diagnostics import diagnose
from preftune.tasks.inspect_stats import Stats, TokenCounter, summarize
from preftune.workspace import Workspace, default_workspace

TEST_PERCENT = 20  # prompts whose hash bucket (0..99) is below this go to the test split
REPORT_VERSION = 2  # 2: pair diagnostics (tasks/diagnostics.py)


def split_bucket(phash: str) -> int:
    """0..99 from the prompt hash; stable across machines because the hash is sha256 of canonical JSON."""
    return int(phash[:16], 16) % 100


def is_test(phash: str) -> bool:
    return split_bucket(phash) < TEST_PERCENT


class _Sink:
    """Writes canonical records to temporary train/test files, renamed into place only on success."""

    def __init__(self, ws: Workspace):
        ws.data_dir.mkdir(parents=True, exist_ok=True)
        self.final = {"train": ws.train_data, "test": ws.test_data}
        self.tmp = {s: p.with_name(f".{p.name}.tmp") for s, p in self.final.items()}
        self.fh = {s: open(p, "w", encoding="utf-8") for s, p in self.tmp.items()}
        self.counts = {"train": 0, "test": 0}

    def write(self, side: str, text: str) -> None:
        self.fh[side].write(text + "\n")
        self.counts[side] += 1

    def close(self) -> None:
        for fh in self.fh.values():
            fh.close()

    def commit(self) -> None:
        self.close()
        for side, tmp in self.tmp.items():
            os.replace(tmp, self.final[side])

    def abort(self, created: list[Path]) -> None:
        self.close()
        for tmp in self.tmp.values():
            tmp.unlink(missing_ok=True)
        for folder in created:  # leave no empty workspace behind a failed first run
            try:
                folder.rmdir()
            except OSError:
                pass

    def move_prompt(self, phash: str, src: str, dst: str) -> None:
        """Move every record of one prompt from one side to the other (a second pass over ``src``)."""
        self.close()
        moved = self.tmp[src].with_suffix(".moving")
        with open(self.tmp[src], encoding="utf-8") as fin, open(moved, "w", encoding="utf-8") as keep, \
                open(self.tmp[dst], "a", encoding="utf-8") as other:
            for line in fin:
                if prompt_hash(*prompt_of(json.loads(line))) == phash:
                    other.write(line)
                    self.counts[src] -= 1
                    self.counts[dst] += 1
                else:
                    keep.write(line)
        os.replace(moved, self.tmp[src])


class _Ingest:
    """One streaming pass state: dedupe keys, split bookkeeping, statistics."""

    def __init__(self, sink: _Sink, stats: Stats):
        self.sink = sink
        self.stats = stats
        self.seen: set[bytes] = set()  # 16-byte digests of canonical records: ~80 bytes an example
        self.duplicates = 0
        self.overlap_removed = 0
        self.prompts: set[str] | None = None  # test-file mode: the test prompts
        self.extremes: dict[str, tuple[int, str]] = {}  # lowest/highest bucket prompt, for tiny sets
        self.distinct_prompts = 0  # counted up to 2 only: enough to know a split is possible

    def feed(self, reader: RecordReader, side: str | None, exclude: set[str] | None = None) -> None:
        first = None
        for _, record in reader:
            text = json.dumps(record, ensure_ascii=False)
            key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if key in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(key)
            phash = prompt_hash(*prompt_of(record))
            if exclude is not None and phash in exclude:
                self.overlap_removed += 1
                continue
            if self.prompts is not None:
                self.prompts.add(phash)
            if first is None:
                first, self.distinct_prompts = phash, max(self.distinct_prompts, 1)
            elif phash != first:
                self.distinct_prompts = 2
            self._track(phash)
            self.sink.write(side or ("test" if is_test(phash) else "train"), text)
            self.stats.add(record)

    def _track(self, phash: str) -> None:
        pos = (split_bucket(phash), phash)
        if pos < self.extremes.get("low", (100, "")):
            self.extremes["low"] = pos
        if pos > self.extremes.get("high", (-1, "")):
            self.extremes["high"] = pos

    def rebalance(self) -> None:
        """Tiny datasets can hash all prompts to one side; move the nearest prompt across."""
        counts = self.sink.counts
        if self.distinct_prompts < 2:
            return
        if counts["test"] == 0:
            self.sink.move_prompt(self.extremes["low"][1], "train", "test")
        elif counts["train"] == 0:
            self.sink.move_prompt(self.extremes["high"][1], "test", "train")


def _inputs_key(sha: str, test_sha: str | None, models: Sequence[str], max_length: int | None) -> dict:
    return {"version": REPORT_VERSION, "sha256": sha, "test_sha256": test_sha, "models": list(models),
            "max_length": max_length, "test_percent": TEST_PERCENT}


def _resume(ws: Workspace, key: dict) -> dict | None:
    if not (ws.inspection.is_file() and ws.train_data.is_file() and ws.test_data.is_file()):
        return None
    try:
        report = read_json(ws.inspection)
    except (OSError, ValueError):
        return None
    return report if report.get("inputs") == key else None


def inspect_dataset(path: str | Path, *, test_path: str | Path | None = None, models: Sequence[str] = (),
                    max_length: int | None = None, workspace: str | Path | Workspace | None = None) -> dict:
    """Validate, dedupe, measure and split a dataset; write the workspace files; return the report.

    Raises ``preftune.records.DatasetError`` (a UserError) listing bad lines, or UserError for a
    missing model or file. Nothing is written to ``data/`` or ``inspection.json`` on failure.
    """
    path = Path(path)
    test_path = Path(test_path) if test_path is not None else None
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace or default_workspace(Path(path).stem))
    if max_length is not None and max_length < 1:
        raise UserError(f"--max-length must be a positive number of tokens, got {max_length}")
    for p in (path, test_path):
        if p is not None:
            check_dataset_path(p)
    key = _inputs_key(file_sha256(path), file_sha256(test_path) if test_path else None, models, max_length)
    if (done := _resume(ws, key)) is not None:
        return done
    tokenizers = {m: load_tokenizer(m) for m in models}  # fail on a bad model before reading data

    pairs = _peek_kind(path)
    test_reader = RecordReader(test_path, expect="pairs" if pairs else "prompts") if test_path else None
    reader = RecordReader(path)
    created = [p for p in (ws.data_dir, ws.root, *ws.root.parents) if not p.exists()]  # deepest first
    sink = _Sink(ws)
    try:
        counters = [TokenCounter(name, tok, pairs) for name, tok in tokenizers.items()]
        report = _run(reader, test_reader, sink, Stats(pairs, counters), max_length)
    except BaseException:
        sink.abort(created)
        raise
    sink.commit()
    report.update(inputs=key, workspace=str(ws.root),
                  files={"train": str(ws.train_data), "test": str(ws.test_data)})
    report["diagnostics"] = dataset_diagnostics(report, ws)
    write_json_atomic(ws.inspection, report)
    return report


def dataset_diagnostics(report: dict, ws: Workspace) -> dict:
    """Pair diagnostics of the split just written (prompts-only data: the near-duplicate check only;
    the pair checks run on the generated pairs after phase 3)."""
    pairs = report["format"] == "pairs"
    shares = {m: s.get("preferred_longer_share") for m, s in report["token_stats"].items()} if pairs else {}
    return diagnose(ws.train_data, ws.test_data, pairs=pairs, token_shares=shares, cut=report.get("cut"),
                    source="dataset" if pairs else "dataset prompts")


def _peek_kind(path: Path) -> bool:
    """True when the file holds pairs: read records until the first valid one decides the format."""
    probe = RecordReader(path, min_examples=0)
    try:
        for _ in probe:
            break
    except UserError:
        pass
    return probe.format in PAIR_FORMATS if probe.format else True


def _run(reader: RecordReader, test_reader: RecordReader | None, sink: _Sink, stats: Stats,
         max_length: int | None) -> dict:
    ingest = _Ingest(sink, stats)
    split: dict[str, Any] = {"method": "hash", "test_percent": TEST_PERCENT}
    if test_reader is not None:
        ingest.prompts = set()
        ingest.feed(test_reader, "test")
        test_prompts, ingest.prompts = ingest.prompts, None
        ingest.feed(reader, "train", exclude=test_prompts)
        split = {"method": "test_file", "test_source": str(test_reader.path), "test_sha256": test_reader.sha256,
                 "test_source_format": test_reader.format, "test_examples_read": test_reader.count}
    else:
        ingest.feed(reader, None)
        ingest.rebalance()
    split["overlap_removed"] = ingest.overlap_removed
    report: dict[str, Any] = {
        "format": "pairs" if reader.format in PAIR_FORMATS else "prompts",
        "source_format": reader.format,
        "source": str(reader.path),
        "sha256": reader.sha256,
        "examples": reader.count,
        "duplicates": ingest.duplicates,
        "unique_examples": len(ingest.seen),
        "train_examples": sink.counts["train"],
        "test_examples": sink.counts["test"],
        "split": split,
        "models": [c.name for c in stats.counters],
        "max_length": max_length,
    }
    report.update(summarize(ingest.stats, max_length))
    if max_length is not None and not stats.counters:
        report["warnings"].append("--max-length counts truncated examples only with --model (token counts)")
    for side in ("train", "test"):
        if sink.counts[side] == 0:
            report["warnings"].append(f"the {side} split is empty (too few distinct prompts to split)")
    return report


def inspect_phase(spec: RunSpec, ws: Workspace, base_models: list[str]) -> dict:
    """Phase 1 of the flow: the run's dataset (and test set) with each base model's tokenizer."""
    return inspect_dataset(spec.dataset, test_path=spec.test_dataset, models=base_models,
                           max_length=spec.max_length, workspace=ws)
