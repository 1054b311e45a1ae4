"""The whole seven-phase flow under a real Prefect API server, with zoo models and real training.

Approvals are answered through `resume_flow_run` from the test thread, the way the UI does.
"""

from __future__ import annotations

import difflib
import json
import shutil
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.endpoint import Endpoint
from preftune.paths import EXAMPLES_DIR
from preftune.reports.figures import data_uri
from preftune.spec import RunSpec
from tests.flow_helpers import (
    answer,
    api_post,
    artifact_data,
    flow_state,
    start_flow,
    wait_for_end,
    wait_for_question,
)
from tests.stub_server import Reply, StubServer

pytestmark = pytest.mark.usefixtures("prefect_api")

EVALUATOR = "preftune.judges.builtin:answer_quality"


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory) -> Path:
    """60 pairs of the bundled example file (enough for a 48/12 split), copied: never the original."""
    lines = (EXAMPLES_DIR / "pairs.jsonl").read_text(encoding="utf-8").splitlines()[:60]
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _spec(zoo: dict, data: Path, ws: Path, **kw) -> RunSpec:
    base = dict(dataset=str(data), workspace=str(ws), base_models=[zoo["models"]["tiny-llama"]],
                betas=[0.1, 0.5], evaluator=EVALUATOR, epochs=1, batch_size=8, max_length=128,
                eval_max_new_tokens=24, max_eval_prompts=12, lr=1e-3, target_win_rate=None,
                max_concurrent_jobs=2, approval_poll_s=1, approval_timeout_s=600)
    return RunSpec(**(base | kw))


def _task_run_logs(flow_run_id: str) -> dict[str, list[str]]:
    """{task run name: its log messages in the API} for every task run under this flow run."""
    runs = api_post("/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}})
    logs = api_post("/logs/filter", {"logs": {"task_run_id": {"any_": [r["id"] for r in runs]}}})
    names = {r["id"]: r["name"] for r in runs}
    out: dict[str, list[str]] = {name: [] for name in names.values()}
    for log in logs:
        out[names[log["task_run_id"]]].append(log["message"])
    return out


def _stop_deployment(ws: Path) -> dict:
    from preftune.tasks.deploy import stop_deployment

    return stop_deployment(ws)


def _answer_comparison(ws: Path, fut) -> tuple[str, str | None]:
    """Answer the comparison question, then the promotion gate if it must come; return (the job the
    run must deploy, the clear winner or None).

    Tiny models on 12 prompts do not give a clear winner deterministically, so the answer depends on
    the scores the question is about: with a clear winner, "recommended" must lead to the promotion
    gate, answered yes; without one, a job named explicitly is deployed with no gate. Either way the
    run deploys, and approvals.jsonl records exactly what was asked and answered."""
    _, form = wait_for_question(ws, fut)
    assert "deploy" in form["properties"], f"asked {sorted(form['properties'])}, expected the comparison"
    scores = json.loads((ws / "eval/scores.json").read_text())  # written before the question is asked
    winner = scores.get("clear_winner")
    if winner:
        answer(ws, fut, "deploy", {"deploy": "recommended"})
        answer(ws, fut, "decision", {"decision": "deploy it"})  # fails if the gate is not asked
        return winner, winner
    chosen = sorted(scores["models"])[0]
    answer(ws, fut, "deploy", {"deploy": chosen})
    return chosen, None


def test_end_to_end_with_approvals(zoo, small_pairs, tmp_path):
    ws = tmp_path / "ws"
    before = small_pairs.read_bytes()
    fut = start_flow(_spec(zoo, small_pairs, ws))
    plan_form = answer(ws, fut, "decision", {"decision": "approve", "note": "looks fine"})
    assert "budget_usd" in plan_form["properties"] and "drop_betas" in plan_form["properties"]
    try:
        expected, winner = _answer_comparison(ws, fut)  # inside: a wrong answer path may still deploy
        outcome = wait_for_end(ws, fut, timeout=900)  # fails on any further question
        assert outcome["status"] == "completed", outcome
        assert flow_state(ws).type.value == "COMPLETED"
        assert small_pairs.read_bytes() == before  # the user's dataset is never modified
        for rel in ("inspection.json", "plan.json", "data/train.jsonl", "data/test.jsonl", "eval/scores.json",
                    "final_report.md", "figures/loss.png", "figures/margins.png", "jobs/sweep.json"):
            assert (ws / rel).exists(), rel
        sweep = json.loads((ws / "jobs/sweep.json").read_text())
        assert [r["status"] for r in sweep] == ["finished", "finished"]
        for r in sweep:
            assert (ws / "jobs" / r["job"]["id"] / "adapter" / "adapter_config.json").exists()
            assert r["summary"]["train_tokens"] > 0
        scores = json.loads((ws / "eval/scores.json").read_text())
        assert set(scores["models"]) == {r["job"]["id"] for r in sweep}
        for m in scores["models"].values():
            assert 0.0 <= m["ci_low"] <= m["win_rate"] <= m["ci_high"] <= 1.0
        assert scores.get("clear_winner") == winner == outcome["clear_winner"]
        approvals = [json.loads(x) for x in (ws / "approvals.jsonl").read_text().splitlines()]
        # every question asked, in order, and nothing else: the promotion gate exactly when there is a clear winner
        assert [a["kind"] for a in approvals] == ["plan", "comparison"] + (["promotion"] if winner else [])
        assert all(a["by"] == "user" for a in approvals)
        assert approvals[0]["values"]["decision"] == "approve" and approvals[0]["values"]["note"] == "looks fine"
        assert approvals[1]["values"] == {"deploy": "recommended" if winner else expected}
        if winner:
            assert approvals[2]["values"] == {"decision": "deploy it"} and approvals[2]["context"]["winner"] == winner
        report = (ws / "final_report.md").read_text()
        # the artifact is the same report with its figures embedded (the UI cannot resolve figures/*.png)
        embedded = report
        for name in ("loss.png", "margins.png"):
            embedded = embedded.replace(f"](figures/{name})", f"]({data_uri(ws / 'figures' / name)})")
        published = artifact_data("final-report", json.loads((ws / "run.json").read_text())["flow_run_id"])
        assert embedded != report and len(published) == 1
        assert published[0] == embedded, "\n".join(difflib.unified_diff(
            embedded.splitlines(), published[0].splitlines(), "final_report.md, figures embedded", "the artifact",
            lineterm="", n=1))[:4000]
        run_id = json.loads((ws / "run.json").read_text())["flow_run_id"]
        assert artifact_data("sweep-progress", run_id) == [100.0]  # one card, updated in place
        assert artifact_data("evaluation-progress")[0] == 100.0  # this run's, the newest
        # Training jobs run in pool threads; their task runs' logs must still reach this flow run.
        logs = _task_run_logs(json.loads((ws / "run.json").read_text())["flow_run_id"])
        for r in sweep:
            assert any("Completed" in m for m in logs[f"train-{r['job']['id']}"]), logs
        for heading in ("## Summary", "## Dataset", "## Sweep", "## Evaluation", "## Cost: estimated vs actual",
                        "## Approvals"):
            assert heading in report
        for r in sweep:
            assert r["job"]["id"] in report
        # the run deployed the chosen job, and its endpoint answers a real chat-completions request
        assert outcome["deployed"] == expected and outcome["endpoint"]
        ep = json.loads((ws / "deploy/endpoint.json").read_text())
        assert not ep.get("stopped_at")
        from openai import OpenAI

        from preftune.server import healthy

        reply = OpenAI(base_url=ep["base_url"], api_key=Path(ep["api_key_file"]).read_text()).chat.completions.create(
            model=ep["model"], messages=[{"role": "user", "content": "What is Einstein famous for?"}],
            max_tokens=8)
        assert len(reply.choices) == 1 and reply.choices[0].message.content is not None
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert "## Calling the deployed model" in report
        # then stop it: the server is gone and endpoint.json says so
        assert _stop_deployment(ws)["stopped"] is True
        assert not healthy(ep["port"])
        assert json.loads((ws / "deploy/endpoint.json").read_text())["stopped_at"]
    finally:
        _stop_deployment(ws)


def test_rejection_spends_nothing(zoo, tmp_path):
    """Prompts-only data with generator endpoints: a rejected plan calls no endpoint and trains nothing."""
    prompts = tmp_path / "prompts.jsonl"
    lines = (EXAMPLES_DIR / "prompts.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with StubServer(lambda req: Reply(text="an answer")) as srv:
        ws = tmp_path / "ws"
        spec = _spec(zoo, prompts, ws, strong=Endpoint(model="s", base_url=srv.base_url),
                     weak=Endpoint(model="w", base_url=srv.base_url))
        fut = start_flow(spec)
        wait_for_question(ws, fut)
        # answered from a terminal, as a person would: `preftune approve WORKSPACE --reject`
        assert main(["approve", str(ws), "--reject", "--set", "note=too expensive"]) == 0
        outcome = fut.result(timeout=300)
        assert outcome["status"] == "rejected"
        assert srv.requests == []
    state = flow_state(ws)  # the Prefect UI shows what outcome.json says, not a green Completed
    assert state.type.value == "CANCELLED" and state.message == "rejected: too expensive"
    assert not (ws / "jobs").exists() and not (ws / "pairs").exists() and not (ws / "eval").exists()
    approvals = [json.loads(x) for x in (ws / "approvals.jsonl").read_text().splitlines()]
    assert approvals[-1]["kind"] == "plan" and approvals[-1]["values"]["decision"] == "reject"
    assert approvals[-1]["values"]["note"] == "too expensive"


def test_crash_then_resume_does_not_redo_jobs(zoo, small_pairs, tmp_path, monkeypatch):
    """The evaluator fails when it scores, so the run fails after the sweep; fixed, the same spec and
    workspace resume: both jobs are found finished and not trained again. (A missing evaluator file is
    refused at the run's first question, before anything is spent.)"""
    monkeypatch.setenv("PREFTUNE_EVALUATOR_DIRS", str(tmp_path))  # the owner's folder of evaluators
    ws = tmp_path / "ws"
    evaluator_file = tmp_path / "my_eval.py"
    # its worker process dies when asked to score (a per-prompt exception would only be counted)
    evaluator_file.write_text("import os\ndef score(messages, completion):\n    os._exit(3)\n")
    spec = _spec(zoo, small_pairs, ws, evaluator=f"{evaluator_file}:score", auto_approve_max_usd=0.0,
                 deploy=False)
    try:
        crashed = start_flow(spec).result(timeout=900)
    except Exception:  # the flow raised: as good a crash as a failed outcome
        crashed = {"status": "failed"}
    assert crashed["status"] == "failed", crashed
    sweep = json.loads((ws / "jobs/sweep.json").read_text())
    assert [r["status"] for r in sweep] == ["finished", "finished"]
    stamps = {r["job"]["id"]: (ws / "jobs" / r["job"]["id"] / "summary.json").stat().st_mtime_ns for r in sweep}
    metrics = {j: (ws / "jobs" / j / "metrics.jsonl").read_text() for j in stamps}

    evaluator_file.write_text("def score(messages, completion):\n    return min(1.0, len(completion) / 100)\n")
    outcome = start_flow(spec).result(timeout=900)
    assert outcome["status"] == "completed", outcome
    for job, stamp in stamps.items():
        assert (ws / "jobs" / job / "summary.json").stat().st_mtime_ns == stamp
        assert (ws / "jobs" / job / "metrics.jsonl").read_text() == metrics[job]
    assert json.loads((ws / "eval/scores.json").read_text())["models"].keys() == stamps.keys()


def test_early_stop_on_target(zoo, small_pairs, tmp_path):
    """Target 0 is met by the first finished job: with one job at a time, no other job starts."""
    ws = tmp_path / "ws"
    spec = _spec(zoo, small_pairs, ws, betas=[0.1, 0.3, 0.5], target_win_rate=0.0, max_concurrent_jobs=1,
                 auto_approve_max_usd=0.0, deploy=False)
    outcome = start_flow(spec).result(timeout=900)
    assert outcome["status"] == "completed", outcome
    assert outcome["target_met"] is True
    sweep = json.loads((ws / "jobs/sweep.json").read_text())
    assert [r["status"] for r in sweep] == ["finished", "not_started", "not_started"]
    assert not (ws / "jobs" / sweep[1]["job"]["id"]).exists()
    shutil.rmtree(ws)


def test_prompts_only_generates_pairs_then_trains(zoo, tmp_path):
    """Prompts-only data: delta-learning pairs from a scripted strong and weak endpoint, split like
    phase 1, then the sweep trains on them; pair generation reports progress as an artifact."""
    prompts = tmp_path / "prompts.jsonl"
    lines = (EXAMPLES_DIR / "prompts.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = prompts.read_bytes()

    def reply(req):
        strong = req.body["model"] == "strong"
        return Reply(text=(f"A careful answer: {req.last_user[:60]}" if strong else "no idea"))

    with StubServer(reply) as srv:
        ws = tmp_path / "ws"
        spec = _spec(zoo, prompts, ws, betas=[0.1], deploy=False, auto_approve_max_usd=0.0, allow_unpriced=True,
                     strong=Endpoint(model="strong", base_url=srv.base_url),
                     weak=Endpoint(model="weak", base_url=srv.base_url))
        outcome = start_flow(spec).result(timeout=900)
        assert outcome["status"] == "completed", outcome
        assert len(srv.requests) == 80  # 40 prompts x (strong, weak), none twice
    assert prompts.read_bytes() == before
    provenance = json.loads((ws / "pairs/provenance.json").read_text())
    assert provenance["counts"]["prompts"] == 40 and provenance["counts"]["pairs"] == 40
    train = (ws / "data/train_pairs.jsonl").read_text().splitlines()
    test = (ws / "data/test_pairs.jsonl").read_text().splitlines()
    assert len(train) + len(test) == 40
    assert len(test) == len((ws / "data/test.jsonl").read_text().splitlines())
    first = json.loads(train[0])
    assert first["preferred_output"][0]["content"].startswith("A careful answer")
    assert first["non_preferred_output"][0]["content"] == "no idea"
    # this run's card (an earlier test's run stopped at its budget cap keeps its own, under the same key)
    assert artifact_data("pairs-progress", json.loads((ws / "run.json").read_text())["flow_run_id"]) == [100.0]
    assert "## Pair generation (delta learning)" in (ws / "final_report.md").read_text()
