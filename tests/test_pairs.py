"""Phase 3 (delta-learning pairs) against real HTTP servers: a scripted faulty one and transformers serve."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from preftune.cli import main
from preftune.endpoint import Endpoint
from preftune.errors import UserError
from preftune.records import load_pairs, prompt_hash
from preftune.tasks.pairs import generate_pairs
from tests.stub_server import Reply, StubRequest, StubServer

N = 40  # prompts q0..q39; the last digit picks the scripted behaviour below


def write_prompts(path: Path, n: int = N) -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": f"q{i}"}]}) + "\n")
    return path


class Script:
    """Per prompt ``q<i>``, by i % 10, for the strong ("big") and weak ("small") model:

    0 strong always 500 -> failed      5 weak answers "" -> empty
    1 weak always 429 -> failed        6 weak answers like strong -> identical
    2 first attempt 500, then ok       7 strong hits max_tokens -> truncated
    3 first attempt stalls past the    8 first attempt drops the connection, then ok
      client's timeout, then ok        9 ok
    4 strong always malformed JSON -> failed
    ``healed`` turns the permanent failures (0, 1, 4) into answers, as if the outage ended.
    """

    def __init__(self) -> None:
        self.healed = False

    def __call__(self, req: StubRequest) -> Reply:
        i, side = int(req.last_user[1:]), req.body["model"]
        kind, strong = i % 10, side == "big"
        text = f"{side} answer {i}"
        if not self.healed:
            if (kind == 0 and strong) or (kind == 1 and not strong):
                return Reply(status=500 if kind == 0 else 429, headers={"Retry-After": "0"})
            if kind == 4 and strong:
                return Reply(raw_body='{"choices": [{"message": ')
        if kind == 2 and req.attempt == 1:
            return Reply(status=500)
        if kind == 3 and req.attempt == 1:
            return Reply(delay=4.0, text="too late")
        if kind == 8 and req.attempt == 1:
            return Reply(drop=True)
        if kind == 5 and not strong:
            return Reply(text="  ")
        if kind == 6:
            return Reply(text="the same answer", prompt_tokens=3, completion_tokens=3)
        if kind == 7 and strong:
            return Reply(text=text, finish_reason="length")
        return Reply(text=text, prompt_tokens=5, completion_tokens=3)


def run_pairs(srv: StubServer, prompts: Path, out: Path, **kw) -> dict:
    # timeout 1.5 s against a 4 s stall: a full garbage collection with torch loaded pauses the
    # process (server thread included) for ~0.3 s, which must not read as a timeout.
    kw.setdefault("max_tokens", 16)
    kw.setdefault("concurrency", 8)
    return generate_pairs(prompts, Endpoint(base_url=srv.base_url, model="big"),
                          Endpoint(base_url=srv.base_url, model="small"), out, max_retries=2, timeout=1.5,
                          progress=False, **kw)


def test_faults_every_prompt_paired_or_listed_once_and_rerun_resumes(tmp_path: Path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    before = (prompts.read_bytes(), prompts.stat().st_mtime_ns)
    script = Script()
    with StubServer(script) as srv:
        prov = run_pairs(srv, prompts, tmp_path / "pairs")
        first_requests = len(srv.requests)

        assert prov["counts"] == {"prompts": 40, "pairs": 16, "dropped": 24,
                                  "by_reason": {"failed": 12, "empty": 4, "identical": 4, "truncated": 4}}
        pairs = load_pairs(prov["pairs_file"])  # the canonical format, as phase 4 will read it
        paired = [int(p["input"]["messages"][-1]["content"][1:]) for p in pairs]
        assert paired == [i for i in range(N) if i % 10 in (2, 3, 8, 9)]  # prompt order kept
        for i, pair in zip(paired, pairs, strict=True):
            assert pair["input"]["messages"][0] == {"role": "system", "content": "be brief"}
            assert pair["preferred_output"] == [{"role": "assistant", "content": f"big answer {i}"}]
            assert pair["non_preferred_output"] == [{"role": "assistant", "content": f"small answer {i}"}]

        expected_reason = {0: "failed", 1: "failed", 4: "failed", 5: "empty", 6: "identical", 7: "truncated"}
        dropped = {d["line"]: d for d in prov["dropped"]}
        assert sorted(dropped) == [i + 1 for i in range(N) if i % 10 in expected_reason]
        for line, d in dropped.items():
            i = line - 1
            assert d["reason"] == expected_reason[i % 10]
            assert d["prompt_hash"] == prompt_hash([{"role": "system", "content": "be brief"},
                                                    {"role": "user", "content": f"q{i}"}])
        assert dropped[1]["detail"] == "strong: http 500 after 3 attempt(s)"
        assert dropped[2]["detail"] == "weak: http 429 after 3 attempt(s)"
        assert dropped[5]["detail"] == "strong: malformed after 3 attempt(s)"
        assert dropped[6]["detail"] == "weak completion empty"
        assert dropped[8]["detail"] == "strong completion hit max_tokens"

        # Requests: 80 first attempts; +2 retries each for the 12 permanent failures; +1 for each
        # side of kinds 2, 3 and 8 (both sides are scripted to fail once) = 80 + 24 + 24.
        assert first_requests == 128
        strong, weak = prov["usage"]["strong"], prov["usage"]["weak"]
        assert strong["requests"] + weak["requests"] == 128
        assert (strong["failed"], weak["failed"]) == (8, 4)
        assert strong["completion_tokens"] == 3 * 4 * 6 + 3 * 4 + 3 * 4  # kinds 2,3,5,7,8,9 + 6 + 7(3 words)
        assert json.loads((tmp_path / "pairs" / "provenance.json").read_text()) == prov
        assert prov["endpoints"]["strong"] == {"base_url": srv.base_url, "model": "big"}
        assert prov["sampling"]["max_tokens"] == 16 and prov["sampling"]["temperature"] == 0.0

        # The outage ends; a re-run sends only the 12 requests that failed for good, nothing else.
        script.healed = True
        again = run_pairs(srv, prompts, tmp_path / "pairs")
        assert len(srv.requests) - first_requests == 12
        assert again["counts"]["pairs"] == 28 and again["counts"]["by_reason"]["failed"] == 0
        assert again["usage"]["strong"]["cache_hits"] + again["usage"]["weak"]["cache_hits"] == 80 - 12
        assert again["pairs_file"] != prov["pairs_file"] and Path(prov["pairs_file"]).exists()

        # Keeping truncated completions needs no request at all.
        kept = run_pairs(srv, prompts, tmp_path / "pairs", keep_truncated=True)
        assert len(srv.requests) - first_requests == 12
        assert kept["counts"]["pairs"] == 32 and kept["counts"]["by_reason"]["truncated"] == 0
    assert (prompts.read_bytes(), prompts.stat().st_mtime_ns) == before
    assert sorted(p.name for p in (tmp_path / "pairs").glob("pairs-*.jsonl")) == sorted(
        Path(p["pairs_file"]).name for p in (prov, again, kept))


def test_a_pairs_file_is_refused_before_any_request(tmp_path: Path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text("\n".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) for i in range(3)))
    with StubServer(lambda req: Reply(text="x")) as srv:
        with pytest.raises(UserError, match="expected a prompts dataset"):
            run_pairs(srv, bad, tmp_path / "out")
        assert srv.requests == []
    assert not (tmp_path / "out").exists()


def test_cli_json_and_one_line_errors(tmp_path: Path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl", n=5)
    with StubServer(lambda req: Reply(text=f"{req.body['model']}: {req.last_user}")) as srv:
        code = main(["pairs", "--prompts", str(prompts), "--strong", f"big@{srv.base_url}",
                     "--weak", f"small@{srv.base_url}", "--out", str(tmp_path / "out"), "--max-tokens", "9",
                     "--concurrency", "2", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    prov = json.loads(out)
    assert prov["counts"]["pairs"] == 5 and prov["sampling"]["max_tokens"] == 9
    assert [json.loads(line)["preferred_output"][0]["content"] for line in open(prov["pairs_file"])] == [
        f"big: q{i}" for i in range(5)]

    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}]}\n{oops\n')
    code = main(["pairs", "--prompts", str(tmp_path / "bad.jsonl"), "--strong", "a@http://127.0.0.1:9/v1",
                 "--weak", "b@http://127.0.0.1:9/v1", "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"preftune pairs: error: {tmp_path / 'bad.jsonl'}")
    assert "Traceback" not in err
    code = main(["pairs", "--prompts", str(prompts), "--strong", "no-url-here", "--weak", "b@http://x/v1",
                 "--out", str(tmp_path / "o3")])
    assert code == 2 and "MODEL@BASE_URL" in capsys.readouterr().err


def _serve_processes(model_dirs: list[str]) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "serve" in cmd and any(d in cmd for d in model_dirs):
            found.append(p)
    return found


def test_end_to_end_with_transformers_serve(tmp_path: Path, zoo: dict, monkeypatch, capsys):
    """The zoo's strong and weak generators, given as folders, are served and stopped by the CLI."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))  # a private server registry
    strong, weak = zoo["models"]["tiny-strong"], zoo["models"]["tiny-weak"]
    # servers of the same folders run by someone else (a demo beside the tests) are not ours
    others = {p.pid for p in _serve_processes([strong, weak])}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in (
        "Write a short note about the sea.", "What is a good breakfast?", "Describe a quiet town.")))
    code = main(["pairs", "--prompts", str(prompts), "--strong", strong, "--weak", weak, "--out",
                 str(tmp_path / "pairs"), "--max-tokens", "12", "--keep-truncated", "--json"])
    assert code == 0
    prov = json.loads(capsys.readouterr().out)
    assert prov["models"] == {"strong": str(Path(strong).resolve()), "weak": str(Path(weak).resolve())}
    counts = prov["counts"]
    assert counts["prompts"] == 3
    # Two different models, greedy, truncation kept: at least one prompt must give a real pair.
    assert counts["pairs"] > 0, prov["dropped"]
    assert counts["pairs"] + counts["dropped"] == 3
    assert sum(counts["by_reason"].values()) == counts["dropped"] == len(prov["dropped"])
    assert counts["by_reason"]["failed"] == 0 and counts["by_reason"]["truncated"] == 0  # --keep-truncated
    for side in ("strong", "weak"):
        usage = prov["usage"][side]
        assert usage["requests"] == 3 and usage["succeeded"] == 3
        assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 3 * 12
    pairs = load_pairs(prov["pairs_file"])
    assert len(pairs) == counts["pairs"]
    for pair in pairs:
        assert pair["preferred_output"][0]["content"] != pair["non_preferred_output"][0]["content"]
        assert pair["preferred_output"][0]["content"].strip() and pair["non_preferred_output"][0]["content"].strip()
    logs = sorted(p.name for p in (tmp_path / "pairs" / "logs").glob("server-*.log"))
    assert len(logs) == 2
    assert [p for p in _serve_processes([strong, weak]) if p.pid not in others] == []  # both were stopped
    registry = tmp_path / "cache" / "servers" / "registry.json"
    assert json.loads(registry.read_text()) == {}
    assert os.environ["PREFTUNE_CACHE"] == str(tmp_path / "cache")


def test_no_usable_pair_exits_1_with_the_reasons(tmp_path: Path):
    """Both models answer the same text for every prompt: nothing usable, so not a success."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", n=5)
    with StubServer(lambda req: Reply(text="same answer")) as srv:
        proc = subprocess.run([sys.executable, "-m", "preftune.cli", "pairs", "--prompts", str(prompts),
                               "--strong", f"big@{srv.base_url}", "--weak", f"small@{srv.base_url}",
                               "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"preftune pairs: no usable pair from 5 prompts (identical 5); see {tmp_path / 'out' / 'provenance.json'}"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_disk_full_is_one_line_and_resumes(tmp_path: Path):
    """A full disk while a paid reply is recorded (the ledger appends to /dev/full, which answers
    every write with ENOSPC): one line, exit 2; after space is freed the same command finishes
    from where it was, and no file left behind is half-written."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", n=4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "ledger.jsonl").symlink_to("/dev/full")
    cmd = [sys.executable, "-m", "preftune.cli", "pairs", "--prompts", str(prompts), "--out", str(out)]
    with StubServer(lambda req: Reply(text=f"{req.body['model']}: {req.last_user}")) as srv:
        cmd += ["--strong", f"big@{srv.base_url}", "--weak", f"small@{srv.base_url}"]
        full = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert full.returncode == 2, full.stderr
        lines = full.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("preftune pairs: error: disk full"), full.stderr
        assert not list(out.glob("pairs-*.jsonl")) and not list(out.glob(".*.tmp"))
        (out / "ledger.jsonl").unlink()
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    (pairs_file,) = out.glob("pairs-*.jsonl")
    assert len(pairs_file.read_text().splitlines()) == 4


def test_local_server_queue_longer_than_the_timeout_is_waited_on_not_stormed(tmp_path: Path):
    """The retry storm, scaled down. Seen with transformers serve without continuous batching:
    16 requests in flight per side to a server that computes one at a time, a 60 s client timeout
    and 6 retries -> 692 requests received for the 160 needed, 54 finished, and pair generation never
    ended: each request timed out in the server's queue, was sent again, and the server (which never
    drops a request whose client has gone) computed the abandoned copies too.

    Here the server of the test's own answers ONE request at a time in 0.1 s (the rest queue), so
    with 32 in flight a request waits up to ~3.2 s; the client's timeout is 0.5 s, shorter than that
    wait, as 60 s was shorter than the real queue. Configured as for a server preftune started
    (``server_pid``: this process, which runs the server thread), the client waits on the live
    server: every prompt is paired and the server receives no more than 1.05x the 128 requests."""
    n = 64
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n"
                               for i in range(n)))
    state: dict = {}

    async def one_at_a_time(req: StubRequest) -> Reply:
        lock = state.setdefault("lock", asyncio.Lock())  # created on the server's loop
        async with lock:
            await asyncio.sleep(0.1)
        return Reply(text=f"{req.body['model']} answers {req.last_user}", prompt_tokens=3, completion_tokens=3)

    with StubServer(one_at_a_time) as srv:
        local = {"base_url": srv.base_url, "server_pid": os.getpid()}
        prov = generate_pairs(prompts, Endpoint(model="big", **local), Endpoint(model="small", **local),
                              tmp_path / "pairs", max_tokens=16, concurrency=16, max_retries=6, timeout=0.5,
                              progress=False)
        received = len(srv.requests)
    assert prov["counts"]["pairs"] == n, prov["dropped"][:3]
    assert received <= 1.05 * 2 * n
    for side in ("strong", "weak"):
        assert prov["usage"][side]["succeeded"] == n and prov["usage"][side]["failed"] == 0


def test_a_local_servers_batch_size_caps_the_runs_concurrency(tmp_path):
    """A run asking for 16 requests in flight sends a local server no more than it batches
    (``Endpoint.concurrency``): a one-at-a-time ``transformers serve`` starts a thread per request,
    and 16 of them starve the batching server beside it. A remote endpoint gets the 16."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n"
                               for i in range(24)))
    live: dict[str, int] = {}
    peak: dict[str, int] = {}

    async def slow(req: StubRequest) -> Reply:
        model = req.body["model"]
        live[model] = live.get(model, 0) + 1
        peak[model] = max(peak.get(model, 0), live[model])
        await asyncio.sleep(0.05)
        live[model] -= 1
        return Reply(text=f"{model} answers {req.last_user}", prompt_tokens=3, completion_tokens=3)

    with StubServer(slow) as srv:
        served = Endpoint(model="small", base_url=srv.base_url, server_pid=os.getpid(), concurrency=2)
        remote = Endpoint(model="big", base_url=srv.base_url)
        prov = generate_pairs(prompts, remote, served, tmp_path / "pairs", max_tokens=8, concurrency=16,
                              progress=False)
    assert prov["counts"]["pairs"] == 24
    assert prov["sampling"]["concurrency"] == {"strong": 16, "weak": 2}
    assert peak["small"] == 2 and peak["big"] == 16
