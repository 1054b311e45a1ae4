"""The seven-phase preference-learning flow (docs/ARCHITECTURE.md): inspect → plan and approve → pairs →
sweep → evaluate → deploy → report. Each phase is a task over plain functions in `tasks/`;
every output is a file in the workspace, so the same spec and workspace resume a crashed run.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import os
import threading
import time

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled, Completed, Failed, State

from preftune import fmt
from preftune.approvals_log import read_approvals
from preftune.backends import check_local_backend
from preftune.errors import RunEnded, UserError
from preftune.files import LockHeld, exclusive, write_json_atomic
from preftune.flows import cards, questions
from preftune.flows.approvals import spending_cap
from preftune.judges import selection
from preftune.ledger import Ledger, read_ledger
from preftune.placement import Placement, inventory, plan_for
from preftune.records import validate_files
from preftune.reports.build import write_report
from preftune.server import device_name
from preftune.spec import RunSpec
from preftune.tasks.deploy import deploy_phase as _deploy_phase
from preftune.tasks.diagnostics import diagnostics_path, reference_views, run_diagnostics, with_reference_view
from preftune.tasks.evaluate_candidates import evaluate_candidates
from preftune.tasks.inspect import inspect_phase as _inspect_phase
from preftune.tasks.instruction.resolve import explicit_fields, plan_rows, resolve
from preftune.tasks.pairs import check_generators
from preftune.tasks.pairs import pairs_phase as _pairs_phase
from preftune.tasks.plan import build_plan, job_grid, with_approved
from preftune.tasks.sweep import job_threads, local_launcher, run_sweep, sweep_rows, with_health
from preftune.tasks.throughput import calibrate
from preftune.workspace import Workspace, in_use_message


class _OneLine(logging.Filter):
    """Bad input (UserError) and a run that ends on purpose (RunEnded) are one line in the run's log,
    the line the CLI prints: Prefect's engines log every failed task and flow with its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if isinstance(err, UserError | RunEnded):
            record.msg, record.args = "%s", (err.reason if isinstance(err, RunEnded) else str(err),)
            record.exc_info, record.exc_text = None, None
        return True


def _one_line_user_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OneLine) for f in logger.filters):
            logger.addFilter(_OneLine())


# What the terminal's heartbeat line says while each phase's task runs (flows/cards.Heartbeat).
PHASES = {"instruction": "reading the instruction", "inspect": "phase 1/7 inspect: reading the dataset",
          "pairs": "phase 3/7 pairs: generating preference pairs", "evaluate": "phase 5/7 evaluate: scoring candidates",
          "deploy": "phase 6/7 deploy: starting the model server", "report": "phase 7/7 report: writing the report"}


def _task(fn, name: str, retries: int = 0):
    if name in PHASES:
        fn = cards.announced(fn, PHASES[name])
    return task(fn, name=name, cache_policy=NO_CACHE, retries=retries)


inspect_phase = _task(_inspect_phase, "inspect")
pairs_phase = _task(_pairs_phase, "pairs")
evaluate_phase = _task(evaluate_candidates, "evaluate")
deploy_phase = _task(_deploy_phase, "deploy")
report_phase = _task(write_report, "report")
instruction_phase = _task(resolve, "instruction")
train_job_task = _task(lambda launch, job: launch(job), "train-job")


# Progress a person watches in the UI is refreshed at least this often (while it changes). A table
# artifact cannot be updated in place: each refresh of the sweep table is a new version, so less often.
REFRESH_S = 5.0
TABLE_REFRESH_S = 10.0


class _Live:
    """Publishes `render()` to the UI every `every` seconds while it changes, from a thread of its own in
    this run's context: the phases report through plain callbacks (cheap, from any thread or event
    loop) and never wait on the API. `close()` publishes the last value."""

    def __init__(self, render, publish, every: float = REFRESH_S):
        self.render, self.publish, self.every, self.shown = render, publish, every, object()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._loop,), daemon=True,
                                       name="preftune-progress")
        self.thread.start()

    def _once(self) -> None:
        value = self.render()
        if value != self.shown:
            self.publish(value)
            self.shown = value

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self._once()
            except Exception as err:  # a missed refresh is not worth failing the run over
                get_run_logger().debug("progress refresh failed: %s", err)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self._once()
        cards.show_progress(None)


def _progress(key: str, description: str, what: str) -> tuple[_Live, object]:
    """A progress artifact kept up to date, and the plain `(done, total)` callback a phase reports to.
    Its description says how far, how fast and how long is left ("118/160 prompts paired, 3.1/s, ~14 s
    left"): a bare percentage says none of that."""
    artifact = create_progress_artifact(progress=0.0, key=key, description=description)
    start, counts = time.monotonic(), [0.0, 0.0]

    def report(done: float, total: float) -> None:
        counts[0], counts[1] = done, total

    def render() -> tuple[float, str]:
        done, total = counts
        line = fmt.progress(int(done), int(total), what, time.monotonic() - start) if total else description
        return round(100.0 * done / max(total, 1), 1), line

    live = _Live(render, lambda v: update_progress_artifact(artifact, v[0], description=v[1], _sync=True))
    cards.show_progress(lambda: render()[1])
    return live, report


def _sweep(spec: RunSpec, ws: Workspace, jobs: list[dict], evaluator_kind: str,
           placement: Placement | None = None) -> list[dict]:
    logger = get_run_logger()
    slots = placement.slots if placement else None  # GPUs: one job per slot, pinned to its devices
    cap = len(slots) if slots else spec.max_concurrent_jobs
    status: dict[str, dict] = {}
    cards.say(f"phase 4/7 sweep: training {len(jobs)} jobs, at most {cap} at once")
    table = _Live(lambda: sweep_rows(ws, jobs, dict(status)), _sweep_table, every=TABLE_REFRESH_S)
    progress, report = _progress("sweep-progress", "Sweep jobs finished", "jobs finished")
    cards.show_progress(lambda: cards.sweep_line(sweep_rows(ws, jobs, dict(status))))
    if spec.work_pool:
        from preftune.flows.train_job import deployment_launcher

        launch = deployment_launcher(spec, ws)
    else:
        launch = local_launcher(spec, ws, job_threads(cap, len(jobs)), slots)

    def run_one(job: dict) -> dict:
        return train_job_task.with_options(task_run_name=f"train-{job['id']}")(launch, job)

    def on_finish(job: dict, summary: dict) -> bool:
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
        if kind == "started":
            status[payload["id"]] = {"status": "running"}
            return
        status[payload["job"]["id"]] = payload
        report(sum(r["status"] in ("finished", "failed") for r in status.values()), len(jobs))
        if kind == "failed":
            logger.error("job %s failed: %s", payload["job"]["id"], payload["error"])

    try:
        results = run_sweep(jobs, run_one, max_concurrent=cap, on_finish=on_finish,
                            on_event=on_event)
        status.update({r["job"]["id"]: r for r in results})
        report(len(jobs), len(jobs))
    finally:
        table.close()
        progress.close()
    results = with_health(ws, results)
    write_json_atomic(ws.sweep_results, results)
    return results


def _pairs(spec: RunSpec, ws: Workspace, inspection: dict) -> dict:
    if inspection["format"] != "prompts":
        return pairs_phase(spec, ws, inspection, None)
    progress, report = _progress("pairs-progress", "Prompts paired", "prompts paired")
    try:
        return pairs_phase(spec, ws, inspection, report)
    finally:
        progress.close()


def _evaluate(spec: RunSpec, ws: Workspace, evaluator_kind: str, jobs: list[dict]) -> dict:
    progress, report = _progress("evaluation-progress", "Evaluation: completions generated and scored",
                                 "completions generated and scored")
    try:
        return evaluate_phase(spec, ws, evaluator_kind, jobs, report)
    finally:
        progress.close()


# Short column names: the sweep table's eleven columns fit a 1280 px window.
SWEEP_LABELS = {"train_loss": "train loss", "eval_loss": "eval loss", "eval_reward_accuracy": "reward acc.",
                "samples_per_s": "samples/s", "ref_cache": "ref. cache"}  # ref. cache: in the report


def _sweep_table(rows: list[dict]) -> None:
    # beta and loss are in the job id (tiny-llama-dpo-b0.1): without their columns the table fits the
    # artifact page at 1280 px (it ran 126 px past its box).
    # A column empty in every row (the device on a CPU machine, health before any step) is left out too:
    # with the health and device columns the table ran 156 px past its box.
    empty = {k for k in (rows[0] if rows else {}) if all(r.get(k) in (None, "", "cpu") for r in rows)}
    rows = [{**{k: v for k, v in r.items() if k not in ("beta", "loss", "ref_cache", *empty)},
             "samples_per_s": fmt.rate(r["samples_per_s"], "")} for r in rows]
    cards.show_table("sweep-results", cards.table_rows(rows, SWEEP_LABELS),
                     description="Every sweep job: running ones with their latest step and training loss")


def _no_workspace_failure(reason: str, message: str) -> State:
    """A run that fails before it has a workspace (the instruction gave no usable dataset or value):
    the one line in the log and as the state's message; the outcome rides on the error (run_outcome)."""
    get_run_logger().error("%s", message)
    return Failed(message=message, data=RunEnded("failed", reason, {"status": "failed", "reason": reason,
                                                                     "workspace": None}))


@flow(name="preference-learning", log_prints=True, persist_result=False)
def preference_learning(spec: RunSpec) -> State:
    """Inspect → plan and approve → pairs → sweep → evaluate → deploy → report.

    The run's Prefect state is its outcome: completed → Completed, failed → Failed, rejected or
    refused → Cancelled, each with the one-line reason as its message (outcome.json holds the same).

    A spec with an `instruction` not yet resolved (the UI form) is resolved first: the fields the form
    changed from their defaults win over it."""
    _one_line_user_errors()
    if spec.instruction and spec.instruction_plan is None:
        try:
            spec = instruction_phase(spec.instruction, explicit_fields(spec), planner=spec.planner)
        except UserError as err:  # a value the sentence gives is out of bounds: one line, as the CLI says it
            return _no_workspace_failure(str(err), f"failed: {err}")
    if not spec.dataset:
        reason = (spec.instruction_plan or {}).get("unresolved", {}).get("dataset") or "the instruction names no dataset"
        return _no_workspace_failure(reason, f"failed: no dataset ({reason}); fill in the dataset field")
    try:  # resolved once and checked: every phase writes under this real path
        ws = Workspace(spec.workspace_path()).ensure()
    except UserError as err:
        return _no_workspace_failure(str(err), f"failed: {err}")
    holder = {"pid": os.getpid(), "flow_run_id": str(runtime.flow_run.id or ""),
              "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    try:
        with exclusive(ws.lock, holder):
            return _owned_run(spec, ws)
    except LockHeld as held:  # another live run owns this workspace: touch none of its files
        reason = in_use_message(ws.root, held.holder)
        get_run_logger().error(reason)
        refused = {"status": "refused", "reason": reason, "workspace": str(ws.root)}
        return Cancelled(message=reason, data=RunEnded("refused", reason, refused))


def _api_url() -> str | None:
    """The Prefect API this run reports to: PREFECT_API_URL's, else the temporary server this process
    started (preftune.cli.prefect_server), for `preftune approve WORKSPACE`."""
    from prefect.settings import PREFECT_API_URL

    from preftune.cli.prefect_server import TEMPORARY_API_ENV

    return PREFECT_API_URL.value() or os.environ.get(TEMPORARY_API_ENV)


def _owned_run(spec: RunSpec, ws: Workspace) -> State:
    write_json_atomic(ws.run_record, {"flow_run_id": str(runtime.flow_run.id or ""), "api_url": _api_url(),
                                      "spec": spec.model_dump(mode="json")})
    try:
        with cards.heartbeat():
            outcome = _run(spec, ws)
    except RunEnded as end:
        outcome = {"status": end.status, "reason": end.reason, "workspace": str(ws.root)}
        write_json_atomic(ws.outcome, outcome)
        get_run_logger().warning("run ended: %s (%s)", end.status, end.reason)
        state = Failed if end.status == "failed" else Cancelled
        end.outcome = outcome  # the state's data is the error itself (preftune.errors.run_outcome)
        return state(message=f"{end.status}: {end.reason}", data=end)
    except UserError as err:  # bad input: the one line the CLI prints, no traceback (`preftune run` exits 2)
        outcome = {"status": "failed", "reason": str(err), "user_error": True, "workspace": str(ws.root)}
        write_json_atomic(ws.outcome, outcome)
        get_run_logger().error("%s", err)
        # The error itself as the state's data: the engine of a deployment run re-raises it after the
        # flow (a dict there is a TypeError with a traceback); _OneLine logs it as its one line.
        return Failed(message=str(err), data=err)
    return Completed(message="completed", data=outcome)


def _run(spec: RunSpec, ws: Workspace) -> dict:
    validate_files(spec.dataset, spec.test_dataset)  # bad data: one line before any question is asked
    read_approvals(ws.approvals)  # a resumed run's records are checked before anything is spent: a line
    read_ledger(ws.ledger)  # that is not a decision or a ledger line is one line naming file:line, exit 2
    check_local_backend()  # a local server this machine cannot start: one line, before approval
    spec = questions.resolve_model_names(spec)  # `tiny-llama` typed in the form: the folder the CLI finds
    unresolved = (spec.instruction_plan or {}).get("unresolved", {})
    open_ = {k: v for k, v in unresolved.items() if k not in ("base_models", "evaluator")}
    if open_:  # no question of the run can settle these (the CLI refuses them before a run starts)
        raise RunEnded("failed", "the instruction left open: " + "; ".join(open_.values()))
    asked: dict = {}
    base_models = questions.resolve_base_models(spec, ws, hint=unresolved.get("base_models", ""))
    if not spec.base_models:
        asked["base_models"] = base_models
    had_evaluator = bool(spec.evaluator or spec.judge)
    spec, evaluator_kind = questions.resolve_evaluator(spec, ws, hint=unresolved.get("evaluator", ""))
    if not had_evaluator:
        asked |= {"evaluator": spec.evaluator} if spec.evaluator else {"judge": spec.judge, "rubric": spec.rubric}
    inspection = inspect_phase(spec, ws, base_models)
    check_generators(spec, inspection)
    if inspection["format"] == "pairs" and inspection["test_examples"] == 0:
        raise RunEnded("failed", "the held-out split is empty (too few distinct prompts to split): nothing to "
                       "evaluate on; give a --test-dataset or more prompts")
    jobs = job_grid(spec, base_models)
    placement = plan_for(spec, jobs, inventory())  # a job too big for a GPU is refused here, before any spend
    cards.say("phase 2/7 plan: timing local generation to estimate the plan")
    throughput = calibrate(spec, ws, inspection, base_models)  # free local generation only, timed
    plan = build_plan(spec, inspection, jobs, evaluator_kind, "gpu" if device_name() == "cuda" else "cpu",
                      throughput=throughput, resolved=plan_rows(spec, asked) if spec.instruction else None,
                      placement=placement.to_json() if placement else None)
    plan = with_reference_view(plan, spec, ws, inspection, jobs)  # free local CPU: the base's own margins
    write_json_atomic(ws.plan, plan)
    decision = questions.approve_plan(spec, ws, plan)
    jobs, plan = questions.apply_decision(
        spec, plan, jobs, decision, lambda kept: with_approved(spec, inspection, plan, kept, evaluator_kind, throughput))
    write_json_atomic(ws.plan, plan)
    Ledger(ws.ledger, "plan").set_cap(spending_cap(ws, decision, spec.budget_usd, spec.auto_approve_max_usd))
    # ---- nothing above this line spends; everything below does ----
    data = _pairs(spec, ws, inspection)
    jobs = [{**j, "train_data": data["train"], "eval_data": data["test"]} for j in jobs]
    diag = run_diagnostics(ws.root, inspection, data, (plan.get("diagnostics") or {}).get("reference"))
    questions.check_pair_yield(spec, ws, data)
    if inspection["format"] == "prompts":  # the generated pairs seen by each base, as a dataset's at plan time
        cards.say("phase 3/7 pairs: the base models' own view of the generated pairs (reference log-probs)")
        write_json_atomic(diagnostics_path(ws.root), {**diag, "reference": reference_views(spec, ws, jobs)})
    results = _sweep(spec, ws, jobs, evaluator_kind, placement)
    finished = [r["job"] for r in results if r["status"] == "finished"]
    if not finished:
        raise RunEnded("failed", "no training job finished; see jobs/*/train.log")
    scores = _evaluate(spec, ws, evaluator_kind, finished)
    unrated = sorted(m for m, e in scores["models"].items() if selection.rated(e) <= 0)
    if unrated:
        raise RunEnded("failed", f"evaluation rated nothing (n = 0) for {', '.join(unrated)}: no held-out prompt "
                       "gave a usable comparison; see eval/")
    chosen = questions.choose_deployment(spec, ws, scores, {r["job"]["id"]: r for r in results})
    endpoint = deploy_phase(spec, ws, chosen, {r["job"]["id"]: r["job"] for r in results}) if chosen else None
    outcome = {"status": "completed", "workspace": str(ws.root), "report": str(ws.report),
               "deployed": chosen, "endpoint": endpoint, "clear_winner": scores.get("clear_winner"),
               "target_met": selection.target_met(spec.target_win_rate, scores)}
    write_json_atomic(ws.outcome, outcome)  # the report reads it back
    report = report_phase(ws)
    cards.show_markdown("final-report", report, description="preftune final report")
    return outcome
