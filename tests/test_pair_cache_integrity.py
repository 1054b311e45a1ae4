"""Phase 3's outputs are verified on resume, not trusted (issue 21, item 4): pairs/done.json and the
pair files it names carry their sha256; a reply edited in the pair cache is a miss. Real requests to
a real local HTTP server that counts them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from preftune.endpoint import Endpoint
from preftune.spec import RunSpec
from preftune.tasks.pairs import pairs_phase
from preftune.workspace import Workspace
from tests.stub_server import Reply, StubServer

PROMPTS = [f"question {i}" for i in range(8)]


def _workspace(tmp_path: Path) -> tuple[Workspace, dict]:
    ws = Workspace(tmp_path / "ws")
    ws.data_dir.mkdir(parents=True)
    for path, part in ((ws.train_data, PROMPTS[:6]), (ws.test_data, PROMPTS[6:])):
        path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in part))
    return ws, {"format": "prompts", "train_examples": 6, "test_examples": 2}


def _texts(path: str) -> set[str]:
    return {json.loads(x)["preferred_output"][0]["content"] for x in open(path, encoding="utf-8")}


def test_edited_pairs_and_cache_are_regenerated_not_used(tmp_path, caplog):
    """Before: pairs/done.json was believed as found, and with it removed an edited cached reply came
    back as the model's answer. Now: an edited train_pairs.jsonl fails done.json's hash and the phase
    runs again from its cache (no request); an edited cache line is a miss and is asked again."""
    ws, inspection = _workspace(tmp_path)
    with StubServer(lambda req: Reply(text=f"{req.body['model']} says {req.last_user}")) as srv:
        spec = RunSpec(dataset=str(tmp_path / "p.jsonl"), workspace=str(ws.root),
                       strong=Endpoint(model="big", base_url=srv.base_url),
                       weak=Endpoint(model="small", base_url=srv.base_url))
        first = pairs_phase(spec, ws, inspection)
        assert len(srv.requests) == 16 and "big says question 0" in _texts(first["train"])

        train = Path(first["train"])
        train.write_text(train.read_text().replace("big says question 0", "something else"))
        with caplog.at_level(logging.WARNING, logger="preftune"):
            second = pairs_phase(spec, ws, inspection)
        assert [r.getMessage() for r in caplog.records] == [
            f"{train}: is missing or changed since pair generation wrote it; "
            "pair generation runs again (paid replies come from its cache)"]
        assert len(srv.requests) == 16  # every reply from the cache: nothing paid twice
        assert _texts(second["train"]) == _texts(first["train"])

        ws.pairs_done.unlink()
        for seg in (ws.pairs_dir / "cache").glob("seg-*.log"):
            seg.write_text(seg.read_text().replace("big says question 1", "an answer someone wrote"))
        third = pairs_phase(spec, ws, inspection)
        assert len(srv.requests) == 17  # the edited reply was asked again, only it
        assert "an answer someone wrote" not in _texts(third["train"])
        assert _texts(third["train"]) == _texts(first["train"])

        ws.pairs_done.write_text(ws.pairs_done.read_text()[:30])  # torn: the phase runs again, no traceback
        assert _texts(pairs_phase(spec, ws, inspection)["train"]) == _texts(first["train"])
        assert len(srv.requests) == 17
