"""The budget cap: held against the plan's estimate of the jobs that run (dropping betas brings a plan
under it), and held while money is spent (issue 21: $195.01 spent under a $1 cap, "run completed")."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import LlamaConfig

from preftune.cli import main
from preftune.errors import RunEnded
from preftune.flows.approvals import PlanDecision
from preftune.flows.questions import apply_decision
from preftune.ledger import phase_totals, read_ledger
from preftune.paths import EXAMPLES_DIR
from preftune.spec import RunSpec
from preftune.tasks.plan import build_plan, job_grid, with_approved
from preftune.workspace import Workspace
from tests.flow_helpers import flow_state
from tests.stub_server import Reply, StubRequest, StubServer
from tests.test_ledger import report_actual, report_rows
from tests.test_pairs import write_prompts

EVALUATOR = "preftune.judges.builtin:answer_quality"


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A remote-priced plan (work pool, $ per trained token) of 1 model x 3 betas: each job costs the same."""
    model = tmp_path_factory.mktemp("cfg") / "m"
    LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2).save_pretrained(model)
    insp = {"format": "pairs", "examples": 120, "train_examples": 100, "test_examples": 20,
            "token_stats": {str(model): {"prompt": {"mean": 10.0}, "preferred": {"mean": 20.0},
                                         "non_preferred": {"mean": 30.0}}}}
    spec = RunSpec(dataset="d.jsonl", base_models=[str(model)], betas=[0.1, 0.3, 0.5], work_pool="gpus",
                   target_win_rate=None, evaluator="preftune.judges.builtin:answer_quality")
    jobs = job_grid(spec, [str(model)])
    plan = build_plan(spec, insp, jobs, "evaluator", "gpu")
    return spec, insp, jobs, plan


def _decide(grid, **answer):
    spec, insp, jobs, plan = grid
    return apply_decision(spec, plan, jobs, PlanDecision(decision="approve", **answer),
                          lambda kept: with_approved(spec, insp, plan, kept, "evaluator"))


def test_a_cap_below_the_full_grid_is_met_by_dropping_betas(grid):
    full = grid[3]["estimate"]["total"]["high"]
    assert full > 0
    cap = full * 0.7  # two of three equal jobs fit (2/3 < 0.7), three do not
    with pytest.raises(RunEnded) as err:
        _decide(grid, budget_usd=cap)
    assert err.value.status == "rejected" and f"${full:.2f} exceeds the budget cap ${cap:.2f}" in str(err.value)
    kept, plan = _decide(grid, budget_usd=cap, drop_betas=[0.5])
    assert [j["beta"] for j in kept] == [0.1, 0.3]
    approved = plan["approved"]["estimate"]["total"]["high"]
    assert approved == pytest.approx(full * 2 / 3, rel=1e-3) and approved <= cap
    assert plan["approved"]["dropped"] == [j["id"] for j in grid[2] if j["beta"] == 0.5]
    with pytest.raises(RunEnded) as err:  # one more than fits
        _decide(grid, budget_usd=full / 2, drop_betas=[0.5])
    assert "of the approved jobs" in str(err.value)


def test_rejected_or_empty_grids_end_the_run(grid):
    spec, _, jobs, plan = grid
    with pytest.raises(RunEnded, match="too dear"):
        apply_decision(spec, plan, jobs, PlanDecision(decision="reject", note="too dear"), lambda kept: plan)
    with pytest.raises(RunEnded, match="every job was dropped"):
        _decide(grid, drop_betas=[0.1, 0.3, 0.5])


# ---- the cap while money is spent ------------------------------------------------------------------
def _prompts(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join((EXAMPLES_DIR / "prompts.jsonl").read_text().splitlines()[:n]) + "\n")
    return path


def _run_args(zoo: dict, prompts: Path, ws: Path, url: str) -> list[str]:
    """`preftune run` headless on prompts-only data, both generators priced $10/$30 per 1M tokens."""
    return ["run", "--dataset", str(prompts), "--workspace", str(ws), "--base-model", zoo["models"]["tiny-llama"],
            "--evaluator", EVALUATOR, "--beta", "0.1", "--no-deploy", "--approval-poll-s", "1",
            "--strong", f"big@{url}", "--strong-price-in", "10", "--strong-price-out", "30",
            "--weak", f"small@{url}", "--weak-price-in", "10", "--weak-price-out", "30"]


def worst_usd(body: dict) -> float:
    """The reservation of one request as the server received it: (its body's bytes + the template
    allowance) prompt tokens and max_tokens completion tokens, at $10/$30 per 1M."""
    from preftune.client import PROMPT_ALLOWANCE

    size = len(json.dumps(body, ensure_ascii=False).encode())
    return ((size + PROMPT_ALLOWANCE) * 10.0 + body["max_tokens"] * 30.0) / 1e6


@pytest.mark.usefixtures("prefect_api")
def test_the_cap_is_held_while_money_is_spent(zoo, tmp_path, capsys):
    """The reproduction: `--yes --max-cost-usd 1 --budget-usd 1`, an endpoint priced $10/$30 that bills
    200,000 completion tokens per answer (128 asked). The plan's high estimate is under $1, so it is
    approved; every reply's usage is impossible, so each request counts at its worst case (~$0.012).

    Guaranteed bound: the ledger's total (settled + reserved) never exceeds the cap — a request is sent
    only if spent + reserved + its worst case fit — and, as every reservation here stands, the run stops
    within one request's worst case of the cap: cap - worst < total <= cap."""
    prompts, ws = _prompts(tmp_path, 60), tmp_path / "ws"
    with StubServer(lambda req: Reply(text=f"{req.body['model']}: {req.last_user[:30]}", prompt_tokens=20,
                                      completion_tokens=200_000)) as srv:
        code = main(_run_args(zoo, prompts, ws, srv.base_url) + ["--yes", "--max-cost-usd", "1", "--budget-usd", "1"])
        sent = list(srv.requests)
        time.sleep(1.0)
        assert len(srv.requests) == len(sent)  # nothing leaves after the stop
    out = capsys.readouterr().out
    plan = json.loads((ws / "plan.json").read_text())
    assert plan["estimate"]["total"]["high"] <= 1.0  # approved automatically: the estimate was under the cap
    entries = read_ledger(ws / "ledger.jsonl")
    total, worst = sum(e["usd"] for e in entries), max(worst_usd(b) for b in sent)
    assert code == 1
    outcome = json.loads((ws / "outcome.json").read_text())
    assert outcome["status"] == "failed"
    assert outcome["reason"].startswith(f"budget cap $1.00 reached: ${total:.2f} spent or reserved ({ws / 'ledger.jsonl'})")
    assert out.splitlines()[0] == f"run failed: {outcome['reason']}"
    state = flow_state(ws)
    assert state.type.value == "FAILED" and state.message == f"failed: {outcome['reason']}"
    assert 1.0 - worst < total <= 1.0
    assert 60 < len(sent) < 120  # stopped part-way through the 120 requests the prompts need
    # every request the server saw is on record (a request sent is money possibly spent), at its worst case
    assert len(sent) <= len(entries) <= len(sent) + 2 * 16
    assert all(e["settled"] is False for e in entries)
    assert not (ws / "jobs").exists()


def test_kill_9_with_requests_in_flight_every_request_sent_is_on_record(tmp_path):
    """`preftune pairs` killed with SIGKILL while 8 slow requests are in flight (issue 21: the server had
    answered 56 requests the ledger never recorded). Each was reserved before it left: the ledger holds
    all 8 at their worst case; the re-run pays the rest, and the report's figures count every request
    the server saw — its count equals the ledger's."""
    prompts, ws = write_prompts(tmp_path / "prompts.jsonl", 20), Workspace(tmp_path / "ws")
    slow = {"on": True}

    def script(req: StubRequest) -> Reply:
        return Reply(text=f"{req.body['model']} {req.last_user}", prompt_tokens=12, completion_tokens=5,
                     delay=300.0 if slow["on"] else 0.0)

    with StubServer(script) as srv:
        cmd = [sys.executable, "-m", "preftune.cli", "pairs", "--prompts", str(prompts), "--out", str(ws.root),
               "--concurrency", "4", "--max-tokens", "32"]
        for role, model in (("strong", "big"), ("weak", "small")):
            cmd += [f"--{role}", f"{model}@{srv.base_url}", f"--{role}-price-in", "10", f"--{role}-price-out", "30"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
        deadline = time.monotonic() + 300
        while len(srv.requests) < 8:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        in_flight = list(srv.requests)
        entries = read_ledger(ws.ledger)
        assert len(in_flight) == 8 == len(entries)  # 4 per side: the concurrency
        assert all(e["settled"] is False for e in entries)
        assert sum(e["usd"] for e in entries) == pytest.approx(sum(worst_usd(b) for b in in_flight))

        slow["on"] = False
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        seen = len(srv.requests)
    assert seen == 8 + 40  # the killed requests were sent again: nothing was cached for them
    entries = read_ledger(ws.ledger)
    totals = phase_totals(entries)["pairs"]
    assert totals["requests"] == seen and totals["unsettled"] == 8
    paid = 40 * (12 * 10.0 + 5 * 30.0) / 1e6
    expected = paid + sum(worst_usd(b) for b in in_flight)
    actual = report_actual(ws, strong={"model": "big", "base_url": srv.base_url},
                           weak={"model": "small", "base_url": srv.base_url})
    assert actual["pair_generation"] == pytest.approx(expected, abs=1e-6)
    assert actual["ledger"]["pairs"]["requests"] == seen
    assert report_rows(ws)["pair generation"] == f"${expected:.2f}"
    assert f"- pairs: {seen} requests (8 counted at their worst case: no usable usage)" in ws.report.read_text()


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize(("name", "line", "problem"), [
    ("approvals.jsonl", "[]", "expected a JSON object, got []"),
    ("ledger.jsonl", '{"time": "t", "phase": "pairs", "endpoint": "e", "prompt_tokens": 1, "completion_tokens": 1, '
     '"usd": "free"}', "usd: Input should be a valid number"),
], ids=["approvals", "ledger"])
def test_a_bad_approvals_or_ledger_line_stops_a_resumed_run_before_anything_is_spent(zoo, tmp_path, capsys, name,
                                                                                     line, problem):
    """Issue 21: these lines gave a TypeError / ValueError at the report phase, after deploying."""
    prompts, ws = _prompts(tmp_path, 12), tmp_path / "ws"
    ws.mkdir()
    (ws / name).write_text(line + "\n")
    with StubServer(lambda req: Reply(text="an answer")) as srv:
        code = main(_run_args(zoo, prompts, ws, srv.base_url) + ["--yes", "--max-cost-usd", "1"])
        assert srv.requests == []
    what = name.split(".")[0].rstrip("s") if name == "ledger.jsonl" else "approvals"
    assert code == 2
    assert capsys.readouterr().err == (f"preftune run: error: {ws / name}:1: not a valid {what} line: {problem}; "
                                       "preftune never rewrites this file: restore the line or move the file aside\n")
    assert (ws / name).read_text() == line + "\n"  # never rewritten
    assert not (ws / "plan.json").exists()  # refused at the start, before the plan
    assert flow_state(ws).type.value == "FAILED"


def test_a_phase_run_alone_stops_at_the_cap_its_ledger_holds(tmp_path):
    """`preftune pairs --out WORKSPACE` on a workspace whose ledger holds a cap of 1 cent: a request's
    worst case is ~$0.008 and a settled one costs $0.00027 (12 + 5 tokens), so a few prompts are paired,
    then the next request would pass the cap: it is not sent; one line, exit 1, no traceback."""
    prompts, out = write_prompts(tmp_path / "prompts.jsonl", 20), tmp_path / "ws"
    out.mkdir()
    (out / "ledger.jsonl").write_text(json.dumps({"time": "t", "kind": "cap", "usd": 0.01}) + "\n")
    with StubServer(lambda req: Reply(text=f"{req.body['model']} {req.last_user}", prompt_tokens=12,
                                      completion_tokens=5)) as srv:
        cmd = [sys.executable, "-m", "preftune.cli", "pairs", "--prompts", str(prompts), "--out", str(out),
               "--concurrency", "1", "--max-tokens", "32"]
        for role, model in (("strong", "big"), ("weak", "small")):
            cmd += [f"--{role}", f"{model}@{srv.base_url}", f"--{role}-price-in", "10", f"--{role}-price-out", "30"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        sent = len(srv.requests)
    entries = read_ledger(out / "ledger.jsonl")
    total = sum(e["usd"] for e in entries)
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.splitlines()
    assert re.fullmatch(rf"preftune pairs: failed: budget cap \$0\.01 reached: \$0\.\d\d spent or reserved "
                        rf"\({re.escape(str(out / 'ledger.jsonl'))}\); the next request \(up to \$0\.00\d\d\) was not "
                        r"sent", line), line
    assert 0 < sent == len(entries) < 40 and total <= 0.01
