"""The seven-phase preference-learning flow (docs/ARCHITECTURE.md): inspect → plan and approve → pairs →
sweep → evaluate → deploy → report. Each phase is a task over plain functions in `tasks/`;
every output is a file in the workspace, so the same spec and workspace resume a crashed run.
"""

from __future__ import annotations

import contextvars
import threading

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from preftune.endpoint import Endpoint
from preftune.errors import RunEnded
from preftune.files import write_json_atomic
from preftune.flows.approvals import (
    CatalogueChoice,
    ComparisonChoice,
    EvaluatorChoice,
    PlanDecision,
    PromotionDecision,
    ask,
)
from preftune.judges import selection
from preftune.reports.build import comparison_markdown, write_report
from preftune.server import device_name
from preftune.spec import RunSpec
from preftune.tasks.deploy import deploy_phase as _deploy_phase
from preftune.tasks.evaluate_candidates import evaluate_candidates
from preftune.tasks.inspect import inspect_phase as _inspect_phase
from preftune.tasks.pairs import check_generators
from preftune.tasks.pairs import pairs_phase as _pairs_phase
from preftune.tasks.plan import build_plan, job_grid, plan_digest, plan_markdown
from preftune.tasks.sweep import job_threads, local_launcher, run_sweep
from preftune.workspace import Workspace, short_name


def _task(fn, name: str, retries: int = 0):
    return task(fn, name=name, cache_policy=NO_CACHE, retries=retries)


inspect_phase = _task(_inspect_phase, "inspect")
pairs_phase = _task(_pairs_phase, "pairs")
evaluate_phase = _task(evaluate_candidates, "evaluate")
deploy_phase = _task(_deploy_phase, "deploy")
report_phase = _task(write_report, "report")
train_job_task = _task(lambda launch, job: launch(job), "train-job")


def _auto(spec: RunSpec, values: dict) -> dict | None:
    return values if spec.auto_approve_max_usd is not None else None


def _resolve_base_models(spec: RunSpec, ws: Workspace) -> list[str]:
    if spec.base_models:
        return list(spec.base_models)
    from preftune.catalogue import catalogue

    models = catalogue()
    listing = "\n".join(f"- `{m}`" for m in models)
    answer = ask(ws, "base-models", f"No base model was given. Sweep the configured catalogue?\n\n{listing}",
                 CatalogueChoice, context={"catalogue": models}, auto=_auto(spec, {"sweep_catalogue": True}),
                 timeout_s=spec.approval_timeout_s, poll_s=spec.approval_poll_s)
    if answer.base_models:
        return list(answer.base_models)
    if not answer.sweep_catalogue:
        raise RunEnded("rejected", "no base model chosen")
    return models


def _resolve_evaluator(spec: RunSpec, ws: Workspace) -> tuple[RunSpec, str]:
    """Evaluator id > rubric text > auto rubric; a judge is needed unless an evaluator id is given."""
    if spec.evaluator:
        return spec, "evaluator"
    if spec.judge is not None:
        return spec, "rubric" if spec.rubric else "auto"
    answer = ask(ws, "evaluator", "No evaluator id and no judge endpoint were given. Name a Python evaluator "
                 "(`package.module:function`), or a judge endpoint (model + base URL + the NAME of the env var "
                 "or Prefect Secret block holding its key).", EvaluatorChoice, context={"spec": spec.digest()},
                 timeout_s=spec.approval_timeout_s, poll_s=spec.approval_poll_s)
    if answer.evaluator:
        return spec.model_copy(update={"evaluator": answer.evaluator}), "evaluator"
    if not answer.judge_model:
        raise RunEnded("rejected", "no evaluator and no judge given")
    judge = Endpoint(model=answer.judge_model, base_url=answer.judge_base_url or None,
                     api_key_env=answer.judge_api_key_env, api_key_block=answer.judge_api_key_block)
    spec = spec.model_copy(update={"judge": judge, "rubric": answer.rubric or spec.rubric})
    return spec, "rubric" if spec.rubric else "auto"


def _approve_plan(spec: RunSpec, ws: Workspace, plan: dict) -> PlanDecision:
    high = plan["estimate"]["total"]["high"]
    within = spec.auto_approve_max_usd is not None and high <= spec.auto_approve_max_usd
    if spec.auto_approve_max_usd is not None and not within:
        get_run_logger().warning("high estimate $%.2f exceeds the auto-approval limit $%.2f: asking a person",
                                 high, spec.auto_approve_max_usd)
    return ask(ws, "plan", plan_markdown(plan), PlanDecision, context={"plan": plan_digest(plan)},
               defaults={"budget_usd": spec.budget_usd}, auto={"approve": True} if within else None,
               timeout_s=spec.approval_timeout_s, poll_s=spec.approval_poll_s)


def _apply_decision(spec: RunSpec, plan: dict, jobs: list[dict], decision: PlanDecision) -> list[dict]:
    if not decision.approve:
        raise RunEnded("rejected", decision.note or "plan rejected")
    cap = decision.budget_usd if decision.budget_usd is not None else spec.budget_usd
    if cap is not None and plan["estimate"]["total"]["high"] > cap:
        raise RunEnded("rejected", f"high estimate ${plan['estimate']['total']['high']:.2f} "
                              f"exceeds the budget cap ${cap:.2f}")
    dropped = set(decision.drop_models)
    kept = [j for j in jobs if j["beta"] not in decision.drop_betas
            and j["base_model"] not in dropped and short_name(j["base_model"]) not in dropped]
    if not kept:
        raise RunEnded("rejected", "every job was dropped from the grid")
    return kept


def _sweep(spec: RunSpec, ws: Workspace, jobs: list[dict], evaluator_kind: str) -> list[dict]:
    logger = get_run_logger()
    total = len(jobs)
    progress = create_progress_artifact(progress=0.0, key="sweep-progress", description="Sweep jobs finished")
    done: list[str] = []
    if spec.work_pool:
        from preftune.flows.train_job import deployment_launcher

        launch = deployment_launcher(spec, ws)
    else:
        launch = local_launcher(spec, ws, job_threads(spec.max_concurrent_jobs, total))

    def run_one(job: dict) -> dict:
        return train_job_task.with_options(task_run_name=f"train-{job['id']}")(launch, job)

    def on_finish(job: dict, summary: dict) -> bool:
        done.append(job["id"])
        update_progress_artifact(progress, 100.0 * len(done) / total)
        if spec.target_win_rate is None:
            return False
        score = evaluate_phase.with_options(task_run_name=f"early-stop-eval-{job['id']}")(
            spec, ws, evaluator_kind, [job])
        value = selection.target_value(score, job["id"])
        met = value is not None and value >= spec.target_win_rate
        logger.info("job %s: %s = %s (target %.2f)%s", job["id"], selection.TARGET_NAME, value,
                    spec.target_win_rate, " — target met, no new job starts" if met else "")
        return met

    def on_event(kind: str, payload: dict) -> None:
        if kind == "failed":
            logger.error("job %s failed: %s", payload["job"]["id"], payload["error"])

    results = run_sweep(jobs, run_one, max_concurrent=spec.max_concurrent_jobs, on_finish=on_finish, on_event=on_event)
    update_progress_artifact(progress, 100.0)
    _sweep_table(results)
    write_json_atomic(ws.sweep_results, results)
    return results


def _pairs_progress():
    """A progress artifact for pair generation, updated at most every 5% (each update is an API call)."""
    artifact = create_progress_artifact(progress=0.0, key="pairs-progress", description="Prompts paired")
    shown = [0.0]

    def update(done: int, total: int) -> None:
        pct = 100.0 * done / max(total, 1)
        if pct - shown[0] >= 5.0 or done == total:
            shown[0] = pct
            # Called from the generator's event loop, where Prefect's sync API would hand back an
            # un-awaited coroutine: update from a plain thread carrying this run's context.
            worker = threading.Thread(target=contextvars.copy_context().run,
                                      args=(update_progress_artifact, artifact, pct), kwargs={"_sync": True})
            worker.start()
            worker.join()

    return update


def _sweep_table(results: list[dict]) -> None:
    rows = []
    for r in results:
        s = r.get("summary") or {}
        rows.append({"job": r["job"]["id"], "status": r["status"], "beta": r["job"]["beta"],
                     "loss": r["job"]["loss_label"], "train_loss": s.get("train_loss"),
                     "eval_loss": s.get("eval_loss"), "eval_reward_accuracy": s.get("eval_reward_accuracy"),
                     "samples_per_s": s.get("train_samples_per_second"), "ref_cache": s.get("ref_cache")})
    create_table_artifact(table=rows, key="sweep-results", description="Every sweep job and its metrics")


def _choose_deployment(spec: RunSpec, ws: Workspace, scores: dict, results: dict) -> str | None:
    recommended = selection.recommended(scores)
    md = comparison_markdown(scores, recommended)
    auto = _auto(spec, {"deploy": "recommended"})
    choice = ask(ws, "comparison", md, ComparisonChoice, context={"scores": plan_digest(scores)}, auto=auto,
                 timeout_s=spec.approval_timeout_s, poll_s=spec.approval_poll_s).deploy
    if choice == "none" or not spec.deploy:
        return None
    if choice == "recommended":
        if recommended is None:
            return None
        if scores.get("clear_winner") == recommended:
            gate = ask(ws, "promotion", f"`{recommended}` is the clear winner. Deploy it now?", PromotionDecision,
                       context={"winner": recommended, "scores": plan_digest(scores)},
                       auto=_auto(spec, {"promote": True}),
                       timeout_s=spec.approval_timeout_s, poll_s=spec.approval_poll_s)
            if not gate.promote:
                return None
        return recommended
    if choice != "base" and choice not in results:
        raise RunEnded("failed", f"unknown job {choice!r} chosen for deployment")
    return choice


@flow(name="preference-learning", log_prints=True, persist_result=False)
def preference_learning(spec: RunSpec) -> dict:
    """Inspect → plan and approve → pairs → sweep → evaluate → deploy → report."""
    ws = Workspace(spec.workspace_path()).ensure()
    write_json_atomic(ws.run_record, {"flow_run_id": str(runtime.flow_run.id or ""),
                                             "spec": spec.model_dump(mode="json")})
    try:
        return _run(spec, ws)
    except RunEnded as end:
        outcome = {"status": end.status, "reason": end.reason, "workspace": str(ws.root)}
        write_json_atomic(ws.outcome, outcome)
        get_run_logger().warning("run ended: %s (%s)", end.status, end.reason)
        return outcome


def _run(spec: RunSpec, ws: Workspace) -> dict:
    base_models = _resolve_base_models(spec, ws)
    spec, evaluator_kind = _resolve_evaluator(spec, ws)
    inspection = inspect_phase(spec, ws, base_models)
    check_generators(spec, inspection)
    jobs = job_grid(spec, base_models)
    plan = build_plan(spec, inspection, jobs, evaluator_kind, "gpu" if device_name() == "cuda" else "cpu")
    write_json_atomic(ws.plan, plan)
    jobs = _apply_decision(spec, plan, jobs, _approve_plan(spec, ws, plan))
    # ---- nothing above this line spends; everything below does ----
    data = pairs_phase(spec, ws, inspection, _pairs_progress() if inspection["format"] == "prompts" else None)
    jobs = [{**j, "train_data": data["train"], "eval_data": data["test"]} for j in jobs]
    results = _sweep(spec, ws, jobs, evaluator_kind)
    finished = [r["job"] for r in results if r["status"] == "finished"]
    if not finished:
        raise RunEnded("failed", "no training job finished; see jobs/*/train.log")
    scores = evaluate_phase(spec, ws, evaluator_kind, finished)
    chosen = _choose_deployment(spec, ws, scores, {r["job"]["id"]: r for r in results})
    endpoint = deploy_phase(spec, ws, chosen, {r["job"]["id"]: r["job"] for r in results}) if chosen else None
    outcome = {"status": "completed", "workspace": str(ws.root), "report": str(ws.report),
               "deployed": chosen, "endpoint": endpoint, "clear_winner": scores.get("clear_winner"),
               "target_met": selection.target_met(spec.target_win_rate, scores)}
    write_json_atomic(ws.outcome, outcome)  # the report reads it back
    report = report_phase(ws)
    create_markdown_artifact(markdown=report, key="final-report", description="preftune final report")
    return outcome


