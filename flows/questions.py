"""Every question the pipeline asks a person, with the checks on each answer and the headless
(auto-approval) answers. Each returns the decision or ends the run (`RunEnded`) with one line."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger
from pydantic import ValidationError

from preftune import fmt
from preftune.endpoint import Endpoint
from preftune.errors import RunEnded, UserError
from preftune.files import write_json_atomic
from preftune.flows.approvals import (
    CatalogueChoice,
    CatalogueDecision,
    EvaluatorChoice,
    EvaluatorKind,
    PlanDecision,
    PromotionDecision,
    YieldChoice,
    YieldDecision,
    ask,
    comparison_form,
    previous_answer,
)
from preftune.judges import decision, selection
from preftune.reports.build import comparison_markdown
from preftune.spec import RunSpec, evaluator_kind
from preftune.tasks.plan import plan_digest, plan_markdown
from preftune.workspace import Workspace, short_name


def _auto(spec: RunSpec, values: dict) -> dict | None:
    return values if spec.auto_approve_max_usd is not None else None


def _timing(spec: RunSpec) -> dict:
    return {"timeout_s": spec.approval_timeout_s, "poll_s": spec.approval_poll_s}


def _hinted(hint: str, text: str) -> str:
    """A question with what the instruction said above it (e.g. a model name nothing matched)."""
    return f"> {hint}\n\n{text}" if hint else text


def _model_path(name: str, known: list[str], field: str) -> str:
    """A bare model name (`tiny-llama`) as the folder preftune knows by that name; a folder or a hub id
    (`org/name`) as it is. A bare name nothing knows is one line naming the near matches."""
    if "/" in name or Path(name).expanduser().is_dir():
        return name
    by_name = {Path(m).name: m for m in reversed(known)}  # the first known wins (catalogue, then folders)
    if name in by_name:
        return by_name[name]
    near = difflib.get_close_matches(name, list(by_name), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(f'`{n}`' for n in near)}? " if near else ""
    raise UserError(f"{field}: {name!r} is neither a local folder nor a model preftune knows; {hint}"
                    f"(known: {', '.join(sorted(by_name)) or 'none'}: the zoo, the catalogue and the folders "
                    "under PREFTUNE_MODEL_DIRS)")


def resolve_model_names(spec: RunSpec) -> RunSpec:
    """The model names `preftune run --instruction` resolves (zoo names, catalogue names, folders under
    PREFTUNE_MODEL_DIRS) resolve the same way when typed in the UI form's model fields."""
    from preftune.tasks.instruction.resolve import known_models

    local = {role: ep for role in ("strong", "weak", "judge") if (ep := getattr(spec, role)) is not None and ep.is_local}
    names = [*spec.base_models, *(ep.model for ep in local.values())]
    if all("/" in n or Path(n).expanduser().is_dir() for n in names):
        return spec  # folders and hub ids only: nothing to look up (and no zoo to build for it)
    known = known_models()
    update: dict = {"base_models": [_model_path(m, known, "base_models") for m in spec.base_models]}
    for role, ep in local.items():
        update[role] = ep.model_copy(update={"model": _model_path(ep.model, known, f"{role}.model")})
    return spec.model_copy(update=update)


def resolve_base_models(spec: RunSpec, ws: Workspace, hint: str = "") -> list[str]:
    if spec.base_models:
        return list(spec.base_models)
    from preftune.catalogue import catalogue

    models = catalogue()
    listing = "\n".join(f"- `{m}`" for m in models)

    def check(answer: CatalogueChoice) -> str | None:
        if answer.decision is CatalogueDecision.use_base_models and not answer.base_models:
            return "'use the base models I list' needs at least one base model"
        return None

    question = _hinted(hint, f"No base model was given. Sweep the configured catalogue?\n\n{listing}")
    answer = ask(ws, "base-models", question,
                 CatalogueChoice, context={"catalogue": models}, check=check,
                 # A model the instruction named that nothing matched is a person's call, even headless.
                 auto=None if hint else _auto(spec, {"decision": CatalogueDecision.sweep_catalogue}), **_timing(spec))
    if answer.decision is CatalogueDecision.stop:
        raise RunEnded("rejected", "no base model chosen")
    return list(answer.base_models) if answer.decision is CatalogueDecision.use_base_models else models


def _evaluator_problem(answer: EvaluatorChoice) -> str | None:
    """What is wrong with an evaluator answer (None: it can be used): the chosen kind's fields must be
    filled, a Python evaluator must import, a judge endpoint must parse."""
    from preftune.judges.evaluators import load_function, parse_evaluator_id

    if answer.decision is EvaluatorKind.stop:
        return None
    if answer.decision is EvaluatorKind.evaluator:
        if not answer.evaluator:
            return "'a Python evaluator' needs its id in 'evaluator' (`package.module:function` or `file.py:function`)"
        try:
            load_function(parse_evaluator_id(answer.evaluator))
        except UserError as err:  # names the evaluator already
            return str(err)
        except (LookupError, ValueError) as err:
            return f"evaluator {answer.evaluator!r}: {err}"
        return None
    if not answer.judge_model:
        return "'an LLM judge' needs 'judge_model'"
    try:
        judge = _judge(answer)
    except ValidationError as err:
        first = err.errors()[0]
        return f"judge_{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    if judge.base_url is not None and not judge.base_url.startswith(("http://", "https://")):
        return f"judge_base_url {judge.base_url!r}: expected an http(s):// URL, e.g. https://api.openai.com/v1"
    if judge.is_local and not Path(judge.model).is_dir():
        return f"judge_model {judge.model!r}: no such local model folder; a remote judge needs judge_base_url"
    if judge.api_key_env and not _ENV_NAME.fullmatch(judge.api_key_env):
        return (f"judge_api_key_env: {judge.api_key_env!r} is not an environment variable NAME "
                "(letters, digits, _; never the key itself)")
    return None


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _judge(answer: EvaluatorChoice) -> Endpoint:
    return Endpoint(model=answer.judge_model.strip(), base_url=(answer.judge_base_url or "").strip().rstrip("/") or None,
                    api_key_env=answer.judge_api_key_env or None, api_key_block=answer.judge_api_key_block or None)


def resolve_evaluator(spec: RunSpec, ws: Workspace, hint: str = "") -> tuple[RunSpec, str]:
    """Evaluator id > rubric text > auto rubric; a judge is needed unless an evaluator id is given."""
    from preftune.judges.evaluators import parse_evaluator_id

    kind = evaluator_kind(spec.evaluator, spec.judge, spec.rubric)
    if kind == "evaluator":
        parse_evaluator_id(spec.evaluator)  # one that may not run here is refused before anything is spent
    if kind is not None:
        return spec, kind
    answer = ask(ws, "evaluator", _hinted(hint, "No evaluator id and no judge endpoint were given. Choose a "
                 "Python evaluator (`package.module:function`, it must import), or an LLM judge (model + base URL + "
                 "the NAME of the env var or Prefect Secret block holding its key), or stop."), EvaluatorChoice,
                 context={"spec": spec.digest()}, check=_evaluator_problem, **_timing(spec))
    if answer.decision is EvaluatorKind.stop:
        raise RunEnded("rejected", "no evaluator and no judge given")
    if answer.decision is EvaluatorKind.evaluator:
        return spec.model_copy(update={"evaluator": answer.evaluator}), "evaluator"
    spec = spec.model_copy(update={"judge": _judge(answer), "rubric": answer.rubric or spec.rubric})
    return spec, evaluator_kind(None, spec.judge, spec.rubric)


def approve_plan(spec: RunSpec, ws: Workspace, plan: dict) -> PlanDecision:
    """One approval before anything is spent. Auto-approval only within its limit, and never for a
    plan with unpriced remote calls unless the spec allows them."""
    logger = get_run_logger()
    high, unpriced = plan["estimate"]["total"]["high"], plan["estimate"].get("unpriced", [])
    auto = None
    if spec.auto_approve_max_usd is not None:
        if unpriced and not spec.allow_unpriced:
            raise RunEnded("rejected", "auto-approval refused: the plan calls endpoints without prices "
                           f"({', '.join(unpriced)}), so its cost is unknown; give their prices "
                           "(--ROLE-price-in/-out) or allow unpriced calls (--allow-unpriced)")
        if high <= spec.auto_approve_max_usd:
            auto = {"decision": "approve"}
        else:
            logger.warning("high estimate $%.2f exceeds the auto-approval limit $%.2f: asking a person",
                           high, spec.auto_approve_max_usd)
    return ask(ws, "plan", plan_markdown(plan), PlanDecision, context={"plan": plan_digest(plan)},
               defaults={"budget_usd": spec.budget_usd}, auto=auto, check=_plan_problem(plan),
               summary=plan_summary(plan), **_timing(spec))


def plan_summary(plan: dict) -> str:
    """What the Resume dialog shows of the plan: a few lines a person can approve from (jobs, cost and
    time ranges, the problems found); the plan in full is the run's `approval-plan` artifact."""
    est = plan["estimate"]
    models = list(dict.fromkeys(j.get("base_model_name") or short_name(j["base_model"]) for j in plan["jobs"]))
    betas = sorted({j["beta"] for j in plan["jobs"]})
    cost = ("unknown (unpriced: " + ", ".join(est["unpriced"]) + ")" if est.get("unpriced")
            else fmt.usd(est['total']['high']) if est['total']['low'] == est['total']['high']
            else f"{fmt.usd(est['total']['low'])}–{fmt.usd(est['total']['high'])}")
    wall = est["wall_seconds"]
    data = plan["dataset"]
    n = len(plan["jobs"])
    head = (f"**Approve this plan?** {n} training job{'s' if n != 1 else ''} ({', '.join(f'`{m}`' for m in models)} × "
            f"β {', '.join(fmt.number(b) for b in betas)}) on `{Path(data['path']).name}` "
            f"({fmt.number(data['train_examples'])} train / {fmt.number(data['test_examples'])} test)"
            + (f", {fmt.number(plan['pairs']['prompts'])} prompts paired first" if plan.get("pairs") else "") + ".")
    cap = f" (budget cap {fmt.usd(plan['budget_usd'])})" if plan.get("budget_usd") is not None else ""
    problems = [*data.get("warnings", []), *(plan.get("instruction") or {}).get("notes", [])]
    # Paragraphs, not a list: the Resume dialog's Markdown renderer runs list items into one.
    return "\n\n".join([
        head, f"**Cost:** {cost}{cap} · **Time:** {fmt.duration(wall['low'])} to {fmt.duration(wall['high'])}",
        f"**Evaluator:** {plan['evaluator']['summary']}",
        *([f"⚠ {p}" for p in problems] or ["No problems found in the data."]),
        "The full plan (every job, cost by phase, time by part) is this run's **approval-plan** artifact "
        "(Artifacts tab)."])


def _plan_problem(plan: dict):
    models = {j["base_model"] for j in plan["jobs"]} | {short_name(j["base_model"]) for j in plan["jobs"]}
    betas = {j["beta"] for j in plan["jobs"]}

    def check(answer: PlanDecision) -> str | None:
        unknown = [m for m in answer.drop_models if m not in models]
        if unknown:
            return f"drop_models: {', '.join(unknown)} not in the plan (its base models: {', '.join(sorted(models))})"
        unknown_betas = [b for b in answer.drop_betas if b not in betas]
        if unknown_betas:
            return f"drop_betas: {unknown_betas} not in the plan (its betas: {sorted(betas)})"
        return None

    return check


def apply_decision(spec: RunSpec, plan: dict, jobs: list[dict], decision: PlanDecision,
                   approved: Callable[[list[dict]], dict]) -> tuple[list[dict], dict]:
    """The jobs that run and the plan with what was approved of it (``approved(kept)``, e.g.
    ``tasks/plan.with_approved``). The budget cap is held against the estimate of the jobs that
    run: dropping betas or models is how a person brings a plan under a cap."""
    if not decision.approve:
        raise RunEnded("rejected", decision.note or "plan rejected")
    dropped = set(decision.drop_models)
    kept = [j for j in jobs if j["beta"] not in decision.drop_betas
            and j["base_model"] not in dropped and short_name(j["base_model"]) not in dropped]
    if not kept:
        raise RunEnded("rejected", "every job was dropped from the grid")
    result = approved(kept)
    high = (result.get("approved") or result)["estimate"]["total"]["high"]
    cap = decision.budget_usd if decision.budget_usd is not None else spec.budget_usd
    if cap is not None and high > cap:
        scope = "of the approved jobs " if result.get("approved") else ""
        raise RunEnded("rejected", f"high estimate {scope}${high:.2f} exceeds the budget cap ${cap:.2f}")
    return kept, result


def check_pair_yield(spec: RunSpec, ws: Workspace, data: dict) -> None:
    """Stop before training when pair generation gave too little to mean anything: fewer usable
    pairs than `min_pair_yield` of the prompts asks a person (headless: stop); no held-out pair, or
    under 3 training pairs, stops at once (evaluation or training would have nothing to work on)."""
    y = data.get("yield")
    if not y:
        return
    dropped = ", ".join(f"{k} {v}" for k, v in y["by_reason"].items() if v) or "none"
    line = f"{y['pairs']} of {y['prompts']} prompts gave a usable pair ({y['share']:.0%}); dropped: {dropped}"
    if y["train_pairs"] < 3 or y["test_pairs"] == 0:
        side = "training" if y["train_pairs"] < 3 else "held-out"
        raise RunEnded("failed", f"too few {side} pairs to go on: {line} (train {y['train_pairs']}, "
                       f"held-out {y['test_pairs']}); see pairs/provenance.json")
    if y["share"] >= spec.min_pair_yield:
        return
    md = (f"**Pair generation yielded little: {line}.**\n\nThe run's minimum is {spec.min_pair_yield:.0%} "
          f"(`min_pair_yield`). Training would use {y['train_pairs']} pairs and evaluation {y['test_pairs']}. "
          "See `pairs/provenance.json` for every dropped prompt. Continue with these pairs, or stop?")
    answer = ask(ws, "pairs-yield", md, YieldDecision, context={"yield": y},
                 auto=_auto(spec, {"decision": YieldChoice.stop}), **_timing(spec))
    if answer.decision is YieldChoice.stop:
        raise RunEnded("failed", f"stopped after pair generation: {line}, below the minimum "
                       f"{spec.min_pair_yield:.0%}")


def judge_caution(scores: dict) -> str:
    """A paragraph naming a judge whose agreement with the labels is not above "the longer answer
    wins" on the same pairs (judges/stats.py: judge_validity); "" otherwise."""
    cal = scores.get("judge_validity") or {}
    if not cal.get("judgments_valid") or cal.get("above_length_baseline"):
        return ""
    scorer = "evaluator" if cal.get("scorer") == "evaluator" else "judge"
    name = scores.get("evaluator") if scorer == "evaluator" else scores.get("judge")
    return (f"\n\n> ⚠ **The {scorer} `{name or '?'}` is not above the length baseline:** it agrees "
            f"with the {cal.get('labels', 'human')} labels on {cal['agreement']:.0%} of judgments (95% CI from "
            f"{cal['agreement_ci_low']:.0%}), while \"the longer answer wins\" scores {cal['length_baseline']:.0%} "
            "on the same pairs: its verdicts may reward length, not quality.")


def _answered_by(ws: Workspace, kind: str, context: dict) -> str | None:
    """Who gave the answer just used ("user" or "auto"), from approvals.jsonl."""
    return (previous_answer(ws, kind, context) or {}).get("by")


def choose_deployment(spec: RunSpec, ws: Workspace, scores: dict, results: dict) -> str | None:
    """The deploy choice, written once as the run's decision record (judges/decision.py)."""
    recommended = selection.recommended(scores)
    md = comparison_markdown(scores, recommended)
    form = comparison_form(sorted(scores["models"]), recommended)
    context = {"scores": plan_digest(scores)}
    choice = ask(ws, "comparison", md, form, context=context,
                 auto=_auto(spec, {"deploy": "recommended"}), **_timing(spec)).deploy
    gate: dict = {}
    chosen = _chosen(spec, ws, scores, results, choice, recommended, gate)
    rec = decision.record(scores, chosen, answer=choice, by=_answered_by(ws, "comparison", context),
                          gate=gate.get("answer"), gate_by=gate.get("by"), deploy_setting=spec.deploy)
    write_json_atomic(ws.root / decision.FILE, rec)
    return chosen


def _chosen(spec: RunSpec, ws: Workspace, scores: dict, results: dict, choice: str, recommended: str | None,
            gate: dict) -> str | None:
    if choice == "none" or not spec.deploy:
        return None
    if choice == "recommended":
        if recommended is None:
            return None
        if scores.get("clear_winner") == recommended:
            context = {"winner": recommended, "scores": plan_digest(scores)}
            # The default deploys only a candidate the rule found better than its base.
            default = "deploy it" if selection.beats_base(scores, recommended) else "do not deploy"
            answer = ask(ws, "promotion", f"`{recommended}` is the significant winner. Deploy it now?"
                         + judge_caution(scores),
                         PromotionDecision, context=context, auto=_auto(spec, {"decision": default}), **_timing(spec))
            gate.update(answer=answer.decision.value, by=_answered_by(ws, "promotion", context))
            if not answer.promote:
                return None
        return recommended
    if choice != "base" and choice not in results:
        raise RunEnded("failed", f"unknown job {choice!r} chosen for deployment")
    return choice
