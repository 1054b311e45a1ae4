"""Input that breaks Python's JSON decoder or is not a file: one line `FILE:LINE: problem`, exit 2,
no traceback — through `preftune inspect`, `preftune run` (its precheck) and `preftune pairs`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from preftune.errors import UserError
from preftune.records import load_prompts

PREFTUNE = [sys.executable, "-m", "preftune.cli"]
GOOD = [json.dumps({"messages": [{"role": "user", "content": f"question {i}"}]}) for i in range(3)]
BAD_LINES = {  # name: (line 3 of the file, the problem)
    "nested": ("[" * 100_000 + "]" * 100_000, "invalid JSON: nested too deeply"),
    "bigint": ('{"messages": [{"role": "user", "content": "x"}], "n": ' + "9" * 5000 + "}",
               "invalid JSON: number too large (more than 4,300 digits)"),
    "surrogate": ('{"messages": [{"role": "user", "content": "bad \\ud800 here"}]}',
                  "invalid text: lone surrogate \\ud800 (a \\uD800-\\uDFFF escape without its pair)"),
    "dupkey": ('{"messages": [{"role": "user", "content": "a", "content": "b"}]}',
               'duplicate key "content" in one JSON object'),
}


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    out = {}
    for name, (line, problem) in BAD_LINES.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(GOOD[:2] + [line] + GOOD[2:]) + "\n", encoding="utf-8")
        out[name] = (path, f"{path}:3: {problem}")
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    out["directory"] = (folder, f"{folder}: is a directory, not a dataset file")
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    out["fifo"] = (fifo, f"{fifo}: not a regular file (a FIFO, socket or device); give a JSONL file")
    return out


def test_reader_reports_each_problem(tmp_path):
    for name, (path, expected) in bad_files(tmp_path).items():
        before = path.read_bytes() if path.is_file() else None
        with pytest.raises(UserError) as info:
            load_prompts(path)
        assert str(info.value) == expected, name
        assert (path.read_bytes() if path.is_file() else None) == before  # never modified


def test_surrogate_pairs_and_distinct_keys_still_pass(tmp_path):
    path = tmp_path / "ok.jsonl"
    emoji = '{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}], "id": 1, "meta": {"id": 2}}'
    path.write_text("\n".join(GOOD + [emoji]) + "\n", encoding="utf-8")
    records = load_prompts(path)
    assert records[-1]["messages"][0]["content"] == "smile \U0001F600"


@pytest.mark.parametrize("command", ["inspect", "run", "pairs"])
def test_cli_one_line_exit_2(tmp_path, command):
    for name, (path, expected) in bad_files(tmp_path).items():
        args = {"inspect": ["inspect", str(path), "--workspace", str(tmp_path / "ws")],
                "run": ["run", "--dataset", str(path), "--workspace", str(tmp_path / "ws")],
                "pairs": ["pairs", "--prompts", str(path), "--strong", "m@http://127.0.0.1:9/v1",
                          "--weak", "m@http://127.0.0.1:9/v1", "--out", str(tmp_path / "out")]}[command]
        res = subprocess.run(PREFTUNE + args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert res.returncode == 2, (name, res.stderr[-2000:])
        assert res.stderr == f"preftune {command}: error: {expected}\n", name
        assert not (tmp_path / "ws").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("record, problem", [
    ("[]", "not a run record: expected an object with a flow_run_id text (and an api_url)"),
    ('{"flow_run_id": 5}', "not a run record: expected an object with a flow_run_id text (and an api_url)"),
    ("{", "cannot read the run's record (JSONDecodeError)"),
])
def test_approve_refuses_a_broken_run_record_in_one_line(tmp_path, record, problem):
    """Before: `preftune approve WORKSPACE` with a run.json of `[]` or a number for its id was a traceback."""
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "run.json").write_text(record)
    proc = subprocess.run(PREFTUNE + ["approve", str(tmp_path / "ws")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"preftune approve: error: {tmp_path / 'ws' / 'run.json'}: {problem}"]
