"""A run is exclusive, honest and asks before it spends: the workspace lock, the yield guard, the
spend guard for unpriced endpoints, answers checked before they are recorded, and Prefect states
that say what outcome.json says. Real Prefect API, real processes, a real local server that
counts requests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from preftune.endpoint import Endpoint
from preftune.files import LockHeld, exclusive
from preftune.flows.approvals import PlanDecision, PromotionDecision
from preftune.paths import EXAMPLES_DIR
from preftune.records import prompt_hash
from preftune.spec import RunSpec
from preftune.tasks.inspect import is_test
from tests.flow_helpers import answer, flow_state, question_text, start_flow, wait_for_question
from tests.stub_server import Reply, StubServer

pytestmark = pytest.mark.usefixtures("prefect_api")

EVALUATOR = "preftune.judges.builtin:answer_quality"


def _prompts(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "prompts.jsonl"
    lines = (EXAMPLES_DIR / "prompts.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _spec(zoo: dict, data: Path, ws: Path, **kw) -> RunSpec:
    base = dict(dataset=str(data), workspace=str(ws), base_models=[zoo["models"]["tiny-llama"]], betas=[0.1],
                evaluator=EVALUATOR, epochs=1, batch_size=8, max_length=128, eval_max_new_tokens=16,
                max_eval_prompts=8, target_win_rate=None, approval_poll_s=1, approval_timeout_s=600, deploy=False)
    return RunSpec(**(base | kw))


def _approvals(ws: Path) -> list[dict]:
    path = ws / "approvals.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_decisions_are_required_choices():
    """A bare Submit decides nothing: the plan and the promotion gate have no default answer."""
    for form in (PlanDecision, PromotionDecision):
        schema = form.model_json_schema()
        assert "decision" in schema["required"]
        assert "default" not in schema["properties"]["decision"]


def test_a_second_run_on_a_live_workspace_is_refused(zoo, tmp_path):
    """Run A holds the workspace while it waits for its plan; a second run on the same workspace is
    refused at once (the CLI: exit 2, one line naming A's pid and flow run), spends nothing and
    touches none of A's files; once A has ended, the workspace is free again."""
    prompts = _prompts(tmp_path, 12)
    with StubServer(lambda req: Reply(text="an answer")) as srv:
        ws = tmp_path / "ws"
        spec = _spec(zoo, prompts, ws, strong=Endpoint(model="s", base_url=srv.base_url),
                     weak=Endpoint(model="w", base_url=srv.base_url))
        fut = start_flow(spec)
        run_id, _ = wait_for_question(ws, fut)
        record = (ws / "run.json").read_text()
        proc = subprocess.run(
            [sys.executable, "-m", "preftune.cli", "run", "--dataset", str(prompts), "--workspace", str(ws),
             "--base-model", zoo["models"]["tiny-llama"], "--strong", f"s@{srv.base_url}", "--weak",
             f"w@{srv.base_url}", "--evaluator", EVALUATOR, "--yes", "--allow-unpriced"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"preftune run: error: workspace {ws} is in use")
        assert f"pid {os.getpid()}" in lines[0] and f"flow run {run_id}" in lines[0]

        second = start_flow(spec).result(timeout=300)  # the same, inside Prefect (e.g. from the UI)
        assert second["status"] == "refused" and str(run_id) in second["reason"]
        assert (ws / "run.json").read_text() == record and srv.requests == []

        answer(ws, fut, "decision", {"decision": "reject"})
        assert fut.result(timeout=300)["status"] == "rejected"
    with exclusive(ws / ".preftune.lock", {"pid": os.getpid()}):
        pass  # free again


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    lock = tmp_path / ".preftune.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom preftune.files import exclusive\n"
         f"with exclusive({str(lock)!r}, {{'pid': 1}}):\n    print('held', flush=True)\n    time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld) as err, exclusive(lock, {"pid": 2}):
            pass
        assert err.value.holder == {"pid": 1}
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with exclusive(lock, {"pid": 3}):
        assert json.loads(lock.read_text()) == {"pid": 3}


def test_low_pair_yield_stops_a_headless_run_before_training(zoo, tmp_path):
    """16 prompts, the strong model answers only 4 of them (25% < 50%): a headless run stops after
    pair generation with the yield and the drop reasons, trains nothing, and its state is Failed."""
    prompts = _prompts(tmp_path, 16)
    records = [json.loads(line)["messages"] for line in prompts.read_text().splitlines()]
    test_side = [is_test(prompt_hash(m, None)) for m in records]
    # 3 training prompts and 1 held-out prompt answered: enough to split, too few to be worth training on
    chosen = [m for m, t in zip(records, test_side, strict=True) if not t][:3] + [
        m for m, t in zip(records, test_side, strict=True) if t][:1]
    answered = {m[-1]["content"] for m in chosen}
    assert len(answered) == 4

    def reply(req):
        if req.body["model"] == "strong" and req.last_user not in answered:
            return Reply(text="")
        return Reply(text=f"{req.body['model']}: {req.last_user[:40]}")

    with StubServer(reply) as srv:
        ws = tmp_path / "ws"
        spec = _spec(zoo, prompts, ws, auto_approve_max_usd=0.0, allow_unpriced=True,
                     strong=Endpoint(model="strong", base_url=srv.base_url),
                     weak=Endpoint(model="weak", base_url=srv.base_url))
        outcome = start_flow(spec).result(timeout=600)
    assert outcome["status"] == "failed", outcome
    assert outcome["reason"].startswith("stopped after pair generation: 4 of 16 prompts gave a usable pair (25%)")
    assert "; dropped: empty 12, below the minimum 50%" in outcome["reason"], outcome["reason"]
    assert [a["kind"] for a in _approvals(ws)] == ["plan", "pairs-yield"]
    assert _approvals(ws)[-1]["values"] == {"decision": "stop"} and _approvals(ws)[-1]["by"] == "auto"
    assert not (ws / "jobs").exists()
    state = flow_state(ws)
    assert state.type.value == "FAILED" and state.message.startswith("failed: stopped after pair generation")


def test_auto_approval_refuses_unpriced_remote_calls(zoo, tmp_path):
    """Remote endpoints without prices: the plan's cost is unknown (never $0.00), auto-approval
    refuses it, and not one request goes out."""
    prompts = _prompts(tmp_path, 12)
    with StubServer(lambda req: Reply(text="an answer")) as srv:
        ws = tmp_path / "ws"
        spec = _spec(zoo, prompts, ws, auto_approve_max_usd=100.0,
                     strong=Endpoint(model="s", base_url=srv.base_url),
                     weak=Endpoint(model="w", base_url=srv.base_url, price_input_per_m=1.0, price_output_per_m=2.0))
        outcome = start_flow(spec).result(timeout=300)
        assert srv.requests == []
    assert outcome["status"] == "rejected"
    assert outcome["reason"].startswith(f"auto-approval refused: the plan calls endpoints without prices (s@{srv.base_url})")
    plan = json.loads((ws / "plan.json").read_text())
    assert plan["estimate"]["unpriced"] == [f"s@{srv.base_url}"]
    from preftune.tasks.plan import plan_markdown

    md = plan_markdown(plan)
    assert "| pair generation | unknown | unknown |" in md and "| **total** | **unknown** | **unknown** |" in md
    assert flow_state(ws).type.value == "CANCELLED"


def test_an_answer_that_does_not_fit_is_asked_again_and_not_recorded(zoo, tmp_path):
    """Dropping a beta the plan does not have is not an answer: nothing is recorded, the question
    comes back with the problem above it; the next, valid answer is the one that counts."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join((EXAMPLES_DIR / "pairs.jsonl").read_text().splitlines()[:40]) + "\n")
    ws = tmp_path / "ws"
    fut = start_flow(_spec(zoo, pairs, ws, betas=[0.1, 0.5]))
    answer(ws, fut, "decision", {"decision": "approve", "drop_betas": [9.9]})
    run_id, _ = wait_for_question(ws, fut)
    text = question_text(run_id)
    assert text.startswith("### ⚠ Your last answer was not used\n\n"
                           "**drop_betas: [9.9] not in the plan (its betas: [0.1, 0.5])** Answer again below.")
    assert _approvals(ws) == []
    answer(ws, fut, "decision", {"decision": "reject", "note": "second thoughts"})
    outcome = fut.result(timeout=300)
    assert outcome == {"status": "rejected", "reason": "second thoughts", "workspace": str(ws)}
    assert [(a["kind"], a["values"]["decision"]) for a in _approvals(ws)] == [("plan", "reject")]
    assert not (ws / "jobs").exists()


def test_cli_exit_codes_follow_the_outcome(zoo, tmp_path):
    """`preftune run` exits 3 for a rejected run, with the reason on its first line."""
    prompts = _prompts(tmp_path, 12)
    with StubServer(lambda req: Reply(text="x")) as srv:
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "preftune.cli", "run", "--dataset", str(prompts), "--workspace",
             str(tmp_path / "ws"), "--base-model", zoo["models"]["tiny-llama"], "--strong", f"s@{srv.base_url}",
             "--weak", f"w@{srv.base_url}", "--evaluator", EVALUATOR, "--yes"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert srv.requests == [], time.monotonic() - t0
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("run rejected: auto-approval refused")
