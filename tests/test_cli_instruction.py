"""`preftune plan --instruction` and `preftune run --instruction` from the command line: flags win,
the plan shows each field's source, `plan` sends no request to any endpoint the run would call,
and what the instruction leaves open that no question can settle is one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from preftune.cli import build_parser
from preftune.paths import EXAMPLES_DIR
from tests.stub_server import Reply, StubServer

EVALUATOR = "preftune.judges.builtin:answer_quality"


@pytest.fixture
def place(tmp_path, zoo) -> Path:
    lines = (EXAMPLES_DIR / "pairs.jsonl").read_text(encoding="utf-8").splitlines()[:60]
    (tmp_path / "prefs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "asks.jsonl").write_text((EXAMPLES_DIR / "prompts.jsonl").read_text(encoding="utf-8"),
                                         encoding="utf-8")
    return tmp_path


def _cli(place: Path, zoo: dict, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFTUNE_MODEL_DIRS": zoo["dir"]}  # tiny-strong / tiny-weak are known by name
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", "preftune.cli", *argv], capture_output=True, text=True,
                          timeout=600, cwd=place, env=env)


def test_plan_resolves_and_shows_sources_without_sending_a_request(place, zoo):
    """Prompts-only data with remote generators and a judge on a counting stub: `plan` prints the
    spec and the plan and the stub receives nothing; no workspace is created."""
    with StubServer(lambda req: Reply(text="never")) as srv:
        sentence = (f"Generate preference pairs on asks.jsonl with strong model s@{srv.base_url} and weak model "
                    f"w@{srv.base_url}, then run length-normalized DPO on tiny llama with betas 0.1 and 0.3, "
                    "judge j@" + srv.base_url + ", stop early at 70% win rate, under $20, no deploy")
        flags = ("--instruction", sentence, "--beta", "0.05", "--lora-r", "4")
        proc = _cli(place, zoo, "plan", *flags, "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        text = _cli(place, zoo, "plan", *flags)
        assert srv.requests == []
    assert not (place / "workspaces").exists()
    spec = out["spec"]
    assert spec["dataset"] == "asks.jsonl" and spec["betas"] == [0.05] and spec["lora_r"] == 4
    assert spec["base_models"] == [zoo["models"]["tiny-llama"]] and spec["target_win_rate"] == 0.7
    assert spec["strong"]["base_url"] == srv.base_url and spec["judge"]["model"] == "j"
    assert spec["losses"] == [{"loss_type": "dpo", "normalize_by_length": True, "reference_free": False,
                               "rpo_alpha": 0.0, "simpo_gamma": 0.0, "orpo_lambda": 0.1}]
    assert spec["deploy"] is False and spec["budget_usd"] == 20.0 and spec["auto_approve_max_usd"] is None
    rows = {r["field"]: r["source"] for r in out["resolved"]}
    assert rows["betas"] == "explicit" and rows["method"] == "explicit" and rows["budget_usd"] == "instruction"
    assert rows["judge"] == "instruction" and rows["target_win_rate"] == "instruction"
    assert out["planner"] == "parser" and out["unresolved"] == {} and out["questions"] == []
    plan = out["plan"]
    assert [j["id"] for j in plan["jobs"]] == ["tiny-llama-dpo-lnorm-b0.05"]
    assert plan["pairs"]["strong"] == "s" and plan["estimate"]["unpriced"]  # remote and unpriced: cost unknown
    assert text.returncode == 0, text.stderr
    assert "| betas | 0.05 | explicit: “betas 0.1 and 0.3” |" in text.stdout
    assert "| budget_usd | 20.0 | instruction: “$20” |" in text.stdout
    assert "Nothing was run" in text.stdout


def test_plan_with_a_planner_sends_exactly_its_one_request(place, zoo):
    answer = {"dataset": "prefs.jsonl", "base_models": [zoo["models"]["tiny-qwen"]], "betas": [0.3],
              "evaluator": EVALUATOR}
    with StubServer(lambda req: Reply(text=json.dumps(answer))) as srv:
        proc = _cli(place, zoo, "plan", "--instruction", "DPO on prefs.jsonl with tiny qwen, beta 0.3, scored by "
                    "the answer quality evaluator", "--planner", f"p@{srv.base_url}", "--json")
        assert proc.returncode == 0, proc.stderr
        assert len(srv.requests) == 1 and srv.requests[0]["model"] == "p"
    out = json.loads(proc.stdout)
    assert out["planner"] == "llm" and out["spec"]["evaluator"] == EVALUATOR
    assert [j["id"] for j in out["plan"]["jobs"]] == ["tiny-qwen-dpo-b0.3"]


def test_plan_shows_the_questions_the_run_will_ask(place, zoo):
    proc = _cli(place, zoo, "plan", "--instruction", "Run DPO on prefs.jsonl using Llama 3.1 8B")
    assert proc.returncode == 0, proc.stderr
    assert "The run will ask:" in proc.stdout
    assert "- base_models: the instruction names 'Llama 3.1 8B', which match no model" in proc.stdout
    assert "| base_models | none given: the run asks (sweep the catalogue?) | asked: “Llama 3.1 8B” |" in proc.stdout


@pytest.mark.parametrize(("argv", "line"), [
    (["--instruction", "Run DPO using tiny llama"], "the instruction names no dataset: give --dataset"),
    (["--instruction", "Run DPO on accounts/a/datasets/gone"],
     "the instruction names 'accounts/a/datasets/gone', which is not a file here: give --dataset"),
    (["--instruction", "generate pairs on asks.jsonl with weak model tiny-weak"],
     "the instruction asks to generate pairs but names no strong model: give --strong"),
    (["--dataset", "prefs.jsonl", "--planner", "p@http://127.0.0.1:9/v1"], "--planner reads an --instruction"),
    ([], "give --dataset (or an --instruction that names one)"),
    (["--instruction", "Run DPO on prefs.jsonl using Llama 3.1 8B", "--yes"],
     "'Llama 3.1 8B', which match no model in the catalogue or the local model folders: give --base-model"),
])
@pytest.mark.parametrize("command", ["plan", "run"])
def test_what_no_question_can_settle_is_one_line_exit_2(place, zoo, command, argv, line):
    proc = _cli(place, zoo, command, *argv)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"preftune {command}: error: ") and line in lines[0], proc.stderr


@pytest.mark.usefixtures("prefect_api")
def test_run_with_an_instruction_flags_win(place, zoo, monkeypatch):
    """The whole CLI path into the flow: the instruction's betas and base model are overridden by
    flags, its budget is kept; a priced judge makes the high estimate exceed that budget, so the
    auto-approved plan is rejected by the cap before anything is spent (exit 3, judge never called)."""
    monkeypatch.chdir(place)
    monkeypatch.setenv("PREFTUNE_MODEL_DIRS", zoo["dir"])
    ws = place / "ws"
    with StubServer(lambda req: Reply(text="never")) as srv:
        args = build_parser().parse_args([
            "run", "--instruction", "Run DPO on prefs.jsonl using tiny llama with betas 0.1 and 0.3, stop early at "
            "60% win rate, under $5, no deploy", "--base-model", zoo["models"]["tiny-qwen"], "--beta", "0.2",
            "--judge", f"j@{srv.base_url}", "--judge-price-in", "1000", "--judge-price-out", "1000",
            "--yes", "--max-cost-usd", "100000", "--workspace", str(ws), "--max-length", "128",
            "--max-eval-prompts", "4", "--eval-max-new-tokens", "8", "--approval-poll-s", "1"])
        code = args.func(args)
        assert srv.requests == []
    assert code == 3
    plan = json.loads((ws / "plan.json").read_text())
    assert [j["id"] for j in plan["jobs"]] == ["tiny-qwen-dpo-b0.2"] and plan["target"] == 0.6
    rows = {r["field"]: r for r in plan["instruction"]["fields"]}
    assert rows["base_models"]["source"] == "explicit" and rows["betas"]["source"] == "explicit"
    assert rows["budget_usd"]["source"] == "instruction" and rows["deploy"]["value"] is False
    outcome = json.loads((ws / "outcome.json").read_text())
    assert outcome["status"] == "rejected" and "exceeds the budget cap $5.00" in outcome["reason"]
    assert not (ws / "jobs").exists()
