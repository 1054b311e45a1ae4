"""API keys from Prefect Secret blocks, end to end: `preftune run` flags → RunSpec → the pairs phase
→ real requests, against a real Prefect API and a real HTTP server that records what it was sent."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from preftune.cli import build_parser
from preftune.cli.run import spec_from_args
from preftune.tasks.pairs import pairs_phase
from preftune.workspace import Workspace
from tests.stub_server import recording_server

PROMPTS = [f"question {i}" for i in range(8)]


def _phase_one_split(ws: Workspace) -> dict:
    """What phase 1 leaves for a prompts-only dataset: train/test files and the inspection counts."""
    ws.data_dir.mkdir(parents=True)
    for path, part in ((ws.train_data, PROMPTS[:6]), (ws.test_data, PROMPTS[6:])):
        path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in part))
    return {"format": "prompts", "train_examples": 6, "test_examples": 2}


def test_keys_come_from_secret_blocks_and_are_written_nowhere(prefect_api, tmp_path: Path, caplog, capsys):
    from prefect.blocks.system import Secret

    canaries = {"strong": "sk-canary-STRONG-5e6f7a8b9c", "weak": "sk-canary-WEAK-1d2c3b4a59"}
    for side, key in canaries.items():
        Secret(value=key).save(f"preftune-{side}-canary", overwrite=True)
    caplog.set_level(logging.DEBUG)
    ws = Workspace(tmp_path / "ws")
    inspection = _phase_one_split(ws)
    with recording_server() as (url, seen):
        spec = spec_from_args(build_parser().parse_args([
            "run", "--dataset", str(tmp_path / "prompts.jsonl"), "--workspace", str(ws.root),
            "--strong", f"big@{url}", "--strong-api-key-block", "preftune-strong-canary",
            "--weak", f"small@{url}", "--weak-api-key-block", "preftune-weak-canary"]))
        result = pairs_phase(spec, ws, inspection)

    # Each request carried its own side's key, read from its block when the request was sent.
    assert Counter(seen) == {f"Bearer {canaries['strong']}": 8, f"Bearer {canaries['weak']}": 8}
    assert sum(1 for _ in open(result["train"])) + sum(1 for _ in open(result["test"])) == 8
    provenance = json.loads((ws.pairs_dir / "provenance.json").read_text())
    assert provenance["endpoints"]["strong"]["api_key_block"] == "preftune-strong-canary"  # the name, not the key
    # ...and no key reached any file in the workspace, a log line, the console or the spec.
    files = [p for p in ws.root.rglob("*") if p.is_file()]
    assert len(files) >= 5  # splits, pairs, provenance, cache segments: there was something to search
    written = "\n".join(p.read_bytes().decode("utf-8", errors="replace") for p in files)
    out = capsys.readouterr()
    for key in canaries.values():
        assert key not in written + caplog.text + out.out + out.err + spec.model_dump_json()
