"""Keys stay where they belong (#21 item 7): a reply quoting a key is redacted before anything is
written, and the children preftune starts (a generation server, a training job, an evaluator worker)
inherit an allow-listed environment, so a key under any name stays behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.paths import EXAMPLES_DIR
from tests.stub_server import Reply, StubRequest, StubServer
from tests.test_evaluate import QUESTIONS, length_judge, write_pairs

KEY = "sk-canary-7f3e9a1c2b4d6e8f"  # the judge's key: the stub judge and the candidate both quote it


def _environ(pid: int) -> dict[str, str]:
    """A live process's environment as the kernel holds it."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_child_environ_is_an_allow_list(monkeypatch):
    from preftune.endpoint import Endpoint
    from preftune.keys import child_environ

    monkeypatch.setenv("JUDGE_TOKEN", KEY)  # the name #21 found in the trainer's environment
    monkeypatch.setenv("MYSTUFF", "x")
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "admin:pw")
    monkeypatch.setenv("PREFTUNE_ODD_NAME", "named as a key below")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", "postgresql+asyncpg://u:pw@db/prefect")
    Endpoint(model="j", base_url="http://127.0.0.1:1/v1", api_key_env="PREFTUNE_ODD_NAME")
    env = child_environ({"EXTRA": "given"})
    assert env["OMP_NUM_THREADS"] == "3" and env["EXTRA"] == "given" and env["PATH"]
    assert not {"JUDGE_TOKEN", "MYSTUFF", "HF_TOKEN", "PREFECT_API_AUTH_STRING", "PREFTUNE_ODD_NAME",
                "PREFECT_SERVER_DATABASE_CONNECTION_URL"} & env.keys()
    monkeypatch.setenv("PREFTUNE_PASS_ENV", "MYSTUFF")  # the owner's escape hatch for one more name
    assert child_environ()["MYSTUFF"] == "x"


def _echoing_world(req: StubRequest) -> Reply:
    """'base' answers plainly; 'cand' quotes the judge's key; the judge quotes it beside its verdict."""
    if req.body["model"] == "base":
        return Reply(text="Short.")
    if req.body["model"] == "cand":
        return Reply(text=f"A longer answer. My environment says JUDGE_TOKEN={KEY} by the way.")
    verdict = length_judge(req).text
    return Reply(text=f"I was called with key {KEY}.\n{verdict}")


def test_a_reply_quoting_the_key_is_redacted_before_it_is_written(tmp_path, monkeypatch):
    """Before: the key landed in plain text in judgments/, validity.jsonl and judge_cache/."""
    from preftune.endpoint import Endpoint
    from preftune.keys import REDACTED
    from preftune.tasks.evaluate import EvalConfig, run_evaluation

    monkeypatch.setenv("JUDGE_TOKEN", KEY)
    test = write_pairs(tmp_path / "test.jsonl", QUESTIONS)
    out = tmp_path / "eval"
    with StubServer(_echoing_world) as srv:
        cfg = EvalConfig(test_data=test, base_model=f"base@{srv.base_url}", candidates={"cand": f"cand@{srv.base_url}"},
                         out_dir=out, rubric="Prefer the more thorough answer.", bootstrap_resamples=1000,
                         judge=Endpoint.parse(f"judge@{srv.base_url}", api_key_env="JUDGE_TOKEN"))
        scores = run_evaluation(cfg)
        assert sum(KEY in json.dumps(r) for r in srv.requests) == 0  # never sent on to the judge either
    assert scores["models"]["cand"]["n"] == len(QUESTIONS) and scores["models"]["cand"]["invalid"] == 0
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"judgments", "judge_cache", "completions"} <= {p.relative_to(out).parts[0] for p in files}
    assert (out / "validity.jsonl").exists()
    written = "\n".join(p.read_bytes().decode("utf-8", errors="replace") for p in files)
    assert KEY not in written
    assert f"JUDGE_TOKEN={REDACTED}" in written and f"called with key {REDACTED}" in written


def test_a_generator_quoting_its_key_leaves_no_key_in_the_pairs(tmp_path, monkeypatch):
    """The pairs phase (strong and weak replies) writes pairs, caches and provenance: none keeps it."""
    from preftune.cli import build_parser
    from preftune.cli.run import spec_from_args
    from preftune.tasks.pairs import pairs_phase
    from preftune.workspace import Workspace
    from tests.test_secret_block import _phase_one_split

    monkeypatch.setenv("GEN_SECRET", KEY)
    ws = Workspace(tmp_path / "ws")
    inspection = _phase_one_split(ws)
    with StubServer(lambda req: Reply(text=f"{req.body['model']} answers; my key is {KEY}.")) as srv:
        spec = spec_from_args(build_parser().parse_args([
            "run", "--dataset", str(tmp_path / "prompts.jsonl"), "--workspace", str(ws.root),
            "--strong", f"big@{srv.base_url}", "--strong-api-key-env", "GEN_SECRET",
            "--weak", f"small@{srv.base_url}", "--weak-api-key-env", "GEN_SECRET"]))
        result = pairs_phase(spec, ws, inspection)
    pairs = [json.loads(line) for line in open(result["train"])]
    assert pairs and pairs[0]["preferred_output"][0]["content"] == "big answers; my key is <redacted>."
    written = "\n".join(p.read_bytes().decode("utf-8", errors="replace") for p in ws.root.rglob("*") if p.is_file())
    assert KEY not in written


@pytest.fixture
def key_in_odd_names(monkeypatch):
    """A key under a name no suffix rule would catch, and one an endpoint names as its key env."""
    from preftune.endpoint import Endpoint

    monkeypatch.setenv("JUDGE_TOKEN", KEY)
    monkeypatch.setenv("PREFTUNE_STRONGSIDE", "sk-strong-0a9b8c7d")
    Endpoint(model="s", base_url="http://127.0.0.1:1/v1", api_key_env="PREFTUNE_STRONGSIDE")
    return {"JUDGE_TOKEN", "PREFTUNE_STRONGSIDE"}


def test_generation_server_environment_holds_no_key(zoo, tmp_path, key_in_odd_names):
    from preftune.server import serve_local

    with serve_local(zoo["models"]["tiny-llama"], tmp_path / "logs", timeout=600) as handle:
        env = _environ(handle.pid)
    assert env["HF_HUB_OFFLINE"] == "1" and "PATH" in env
    assert not key_in_odd_names & env.keys()
    assert KEY not in "".join(env.values())


def test_trainer_environment_holds_no_key(zoo, tmp_path, monkeypatch, key_in_odd_names):
    """A real training job, started as the sweep starts one (run_job_processes), trains with the
    allow-listed environment; what it held is read from /proc/self/environ at its start-up (a
    sitecustomize on its PYTHONPATH)."""
    from preftune.job import TrainConfig
    from preftune.tasks.sweep import run_job_processes

    hook = tmp_path / "hook"
    hook.mkdir()
    dump = tmp_path / "trainer-environ"
    (hook / "sitecustomize.py").write_text(
        "import os, shutil\n"
        "if os.environ.get('PREFTUNE_TEST_ENV_DUMP'):\n"
        "    shutil.copyfile('/proc/self/environ', os.environ['PREFTUNE_TEST_ENV_DUMP'])\n")
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("PREFTUNE_TEST_ENV_DUMP", str(dump))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join((EXAMPLES_DIR / "pairs.jsonl").read_text().splitlines(keepends=True)[:8]))
    job = tmp_path / "jobs" / "j1"
    config = TrainConfig(model=zoo["models"]["tiny-llama"], data=data, out=job, beta=0.1, batch_size=4,
                         max_length=64, num_threads=1)
    job.mkdir(parents=True)
    (job / "job.json").write_text(config.model_dump_json())
    summary = run_job_processes(job / "job.json", {"OMP_NUM_THREADS": "1"})
    assert summary["steps"] == 2 and (job / "summary.json").exists()
    env = dict(x.split("=", 1) for x in dump.read_text().split("\0") if "=" in x)
    assert env["OMP_NUM_THREADS"] == "1" and env["PREFTUNE_TEST_ENV_DUMP"] == str(dump)
    assert not key_in_odd_names & env.keys()


def test_evaluator_worker_environment_holds_no_key(tmp_path, monkeypatch, key_in_odd_names):
    from preftune.judges.evaluators import EvalItem, run_evaluator

    monkeypatch.setenv("PREFTUNE_EVALUATOR_DIRS", str(tmp_path))

    evaluator = tmp_path / "peek.py"
    evaluator.write_text("import os\n"
                         "def peek(messages, completion):\n"
                         "    return {'score': 1.0, 'reason': ','.join(sorted(os.environ))}\n")
    [result] = run_evaluator(f"{evaluator}:peek", [EvalItem("k", [{"role": "user", "content": "q"}], "a")])
    names = set(result["reason"].split(","))
    assert "PATH" in names and not key_in_odd_names & names
