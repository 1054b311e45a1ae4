"""Phase 2: the job grid, the cost and wall-time estimate, and the plan shown for approval.

Nothing here spends: it reads the inspection report and model configs; the wall time of pair and
evaluation generation comes from speeds measured on this machine's local models before the plan
(``tasks/throughput.py``: free local CPU time, never a paid endpoint).
"""

from __future__ import annotations

import math

from preftune import cost
from preftune.spec import RunSpec
from preftune.templating import render
from preftune.workspace import short_name


def job_id(base_model: str, loss_label: str, beta: float) -> str:
    return f"{short_name(base_model)}-{loss_label}-b{beta:g}"


def job_grid(spec: RunSpec, base_models: list[str]) -> list[dict]:
    """base models x loss settings x betas, in that nesting order (one model's jobs together,
    so its reference log-probs are computed once and shared). SimPO/ORPO ignore no beta: they use it."""
    jobs = []
    for model in base_models:
        for loss in spec.losses:
            for beta in spec.betas:
                jobs.append({"id": job_id(model, loss.label, beta), "base_model": model, "beta": beta,
                             "loss": loss.model_dump(mode="json"), "loss_label": loss.label})
    seen: set[str] = set()
    for job in jobs:  # two models with the same folder name: keep ids unique
        while job["id"] in seen:
            job["id"] += "-2"
        seen.add(job["id"])
    return jobs


def _stat(stats: dict, field: str, key: str) -> float:
    return float(stats.get(field, {}).get(key) or 0.0)


def example_tokens(spec: RunSpec, inspection: dict, model: str, prices: dict) -> cost.Range:
    """Trained tokens of one example for `model`, from phase 1's token statistics."""
    stats = inspection["token_stats"][model]
    prompt = _stat(stats, "prompt", "mean")
    if inspection["format"] == "pairs":
        exact = cost.pair_tokens(prompt, _stat(stats, "preferred", "mean"),
                                 _stat(stats, "non_preferred", "mean"), spec.max_length)
        # Means of capped sums differ a little from caps of means; padding is not trained.
        return cost.Range(exact, exact * 1.05)
    lo_share, hi_share = prices["unknown_completion_share"]
    return cost.Range(cost.pair_tokens(prompt, lo_share * spec.pair_max_tokens,
                                       lo_share * spec.pair_max_tokens, spec.max_length),
                      cost.pair_tokens(prompt, spec.pair_max_tokens, spec.pair_max_tokens, spec.max_length))


def prompt_quota(spec: RunSpec, inspection: dict) -> tuple[int, int]:
    """Train and test examples the run uses: all, or for prompts-only data at most
    `max_pair_prompts`, split in phase 1's proportion."""
    train, test = inspection["train_examples"], inspection["test_examples"]
    cap = spec.max_pair_prompts
    if inspection["format"] != "prompts" or cap is None or cap >= train + test:
        return train, test
    n_test = max(1, round(cap * test / (train + test))) if test else 0
    return cap - n_test, n_test


def eval_tokens_estimate(spec: RunSpec, inspection: dict) -> int:
    """The evaluation's max new tokens as the plan prices it: the run's setting, else (0: fitted at
    evaluation) the largest p95 of preferred answers over the base models' tokenizers, or for
    prompts-only data the pair answers' limit, within phase 5's bounds (tasks/evaluate.py)."""
    from preftune.tasks.evaluate_checks import EVAL_TOKENS_BOUNDS, EVAL_TOKENS_FALLBACK

    if spec.eval_max_new_tokens:
        return spec.eval_max_new_tokens
    p95 = [st["preferred"]["p95"] for st in (inspection.get("token_stats") or {}).values() if "preferred" in st]
    guess = spec.pair_max_tokens if inspection.get("format") == "prompts" else max(p95, default=EVAL_TOKENS_FALLBACK)
    return int(max(EVAL_TOKENS_BOUNDS[0], min(EVAL_TOKENS_BOUNDS[1], math.ceil(guess))))


WALL_SPREAD = (0.75, 1.5)  # a measured generation time, as a range: load on the machine, lengths


def wall_parts(spec: RunSpec, inspection: dict, jobs: list[dict], evaluator_kind: str, min_jobs: int,
               training: cost.Range, throughput: dict | None) -> dict[str, dict]:
    """Wall seconds per phase (pairs, training, evaluation) as {low, high, note}; a part that was not
    measured has low/high None and says why."""
    lo, hi = WALL_SPREAD
    measured = throughput or {}
    parts: dict[str, dict] = {}
    if inspection["format"] == "prompts":
        pairs = measured.get("pairs")
        if pairs:
            # The calibration's prompts are done already: the pairs phase reads them from its cache.
            n = max(0, sum(prompt_quota(spec, inspection)) - pairs["prompts"])
            point = pairs["seconds_per_prompt"] * n + pairs.get("server_start_s", 0.0)
            parts["pairs"] = {"low": point * lo, "high": point * hi,
                              "note": f"{n} more prompts at {pairs['seconds_per_prompt']:.2f} s each (measured: "
                                      f"{pairs['prompts']} prompts, {pairs['tokens_per_s']:g} tokens/s, kept)"}
        else:
            parts["pairs"] = {"low": None, "high": None,
                              "note": "not estimated: a remote generator's speed is not measured before approval"}
    train_note = "one pair timed on each base model (measured)" if measured.get("training") \
        else "from the model size and trained tokens"
    parts["training"] = {"low": training.low, "high": training.high, "note": train_note}
    evals = measured.get("evaluation") or {}
    if evals:
        n_eval = min(spec.max_eval_prompts, prompt_quota(spec, inspection)[1])
        low = high = 0.0
        for base in sorted({j["base_model"] for j in jobs}):
            m = evals.get(base)
            if m is None:
                continue
            one = m["load_s"] + n_eval * m["seconds_per_prompt"]  # the base, then each candidate of it
            n_jobs = sum(1 for j in jobs if j["base_model"] == base)
            low += one * (1 + min(n_jobs, min_jobs))
            high += one * (1 + n_jobs)
        note = f"generation on {n_eval} held-out prompts per model (measured)"
        if evaluator_kind != "evaluator":
            note += "; judge calls not included"
        parts["evaluation"] = {"low": low * lo, "high": high * hi, "note": note}
    else:
        parts["evaluation"] = {"low": None, "high": None, "note": "not measured"}
    return {k: {**v, "low": None if v["low"] is None else round(v["low"], 1),
                "high": None if v["high"] is None else round(v["high"], 1)} for k, v in parts.items()}


def estimate(spec: RunSpec, inspection: dict, jobs: list[dict], evaluator_kind: str, device: str,
             prices: dict | None = None, throughput: dict | None = None, placement: dict | None = None) -> dict:
    """Cost ranges per phase and the wall time: its parts (``wall_parts``) and their sum.
    ``throughput``: the measured generation speeds (``tasks/throughput.calibrate``); ``placement``: the
    jobs' layout on this machine's GPUs (``preftune/placement.py``), whose slots run at once."""
    prices = prices or cost.load_prices()
    models = sorted({j["base_model"] for j in jobs})
    per_example = {m: example_tokens(spec, inspection, m, prices) for m in models}
    first = inspection["token_stats"][models[0]]
    prompt_mean = _stat(first, "prompt", "mean")
    n_train, n_test = prompt_quota(spec, inspection)
    min_jobs = 1 if spec.target_win_rate is not None else len(jobs)
    phases: dict[str, cost.PhaseEstimate] = {
        "training": cost.estimate_training(
            jobs, per_example, n_train, epochs=spec.epochs, full=spec.full,
            remote=spec.work_pool is not None, device=device, min_jobs=min_jobs, prices=prices,
            measured=(throughput or {}).get("training"))}

    pair_calls = n_train + n_test if inspection["format"] == "prompts" else 0
    share = prices["unknown_completion_share"]
    factor = prices["pair_input_token_factor"]
    gen_in = cost.Range(prompt_mean * factor[0], prompt_mean * factor[1])
    gen_out = cost.Range(share[0] * spec.pair_max_tokens, share[1] * spec.pair_max_tokens)
    pair_phase = cost.PhaseEstimate(cost.ZERO, {"calls": 0})
    for ep in (spec.strong, spec.weak):
        if pair_calls:
            one = cost.estimate_inference(pair_calls, gen_in, gen_out, ep)
            unpriced = pair_phase.detail.get("unpriced", []) + one.detail.get("unpriced", [])
            pair_phase = cost.PhaseEstimate(pair_phase.usd + one.usd, {
                "calls": pair_phase.detail["calls"] + pair_calls} | ({"unpriced": unpriced} if unpriced else {}))
    phases["pair_generation"] = pair_phase

    n_eval = min(spec.max_eval_prompts, n_test)
    if evaluator_kind == "evaluator":
        phases["evaluation"] = cost.PhaseEstimate(cost.ZERO, {"calls": 0, "note": "Python evaluator, no API calls"})
    else:
        judge = prices["judge"]
        tokens = eval_tokens_estimate(spec, inspection)
        completion = cost.Range(share[0] * tokens, share[1] * tokens)
        overhead = judge["prompt_overhead_tokens"]
        per_call_in = cost.Range(overhead + prompt_mean + 2 * completion.low, overhead + prompt_mean * factor[1]
                                 + 2 * completion.high)
        validity = min(spec.judge_calibration_pairs, n_test)  # the judge's calibration on labelled pairs
        calls_high = 2 * n_eval * len(jobs) + 2 * validity + (1 if evaluator_kind == "auto" else 0)
        phases["evaluation"] = cost.estimate_inference(
            calls_high, per_call_in, cost.Range(*judge["output_tokens"]), spec.judge)
        low_calls = 2 * n_eval * min_jobs + 2 * validity
        phases["evaluation"].usd = cost.Range(phases["evaluation"].usd.low * low_calls / max(calls_high, 1),
                                              phases["evaluation"].usd.high)
    total = cost.total(phases)
    train = phases["training"].detail
    # Concurrent jobs share the machine: on CPU they run no faster together than in turn; on GPUs the
    # placement's slots (one job each) run at once; a work pool runs up to max_concurrent_jobs.
    parallel = placement["concurrent"] if placement else 1 if device == "cpu" else spec.max_concurrent_jobs
    waves = math.ceil(len(jobs) / parallel)
    training_wall = cost.Range(train["job_seconds_low"] * min_jobs, train["job_seconds_high"] * waves)
    parts = wall_parts(spec, inspection, jobs, evaluator_kind, min_jobs, training_wall, throughput)
    if placement:
        parts["training"]["note"] += (f"; {waves} wave(s) of up to {parallel} job(s), "
                                      f"{placement['gpus_per_job']} GPU(s) each")
    wall = cost.Range(sum(p["low"] or 0.0 for p in parts.values()), sum(p["high"] or 0.0 for p in parts.values()))
    # The totals count priced endpoints only; `unpriced` names the ones whose cost is unknown.
    unpriced = [name for phase in phases.values() for name in phase.detail.get("unpriced", [])]
    return {"phases": {k: v.to_json() for k, v in phases.items()}, "total": cost.range_json(total),
            "wall_seconds": cost.range_json(wall), "wall_parts": parts, "device": device,
            "unpriced": sorted(set(unpriced))}


def plan_markdown(plan: dict) -> str:
    return render("plan.md.j2", plan=plan)


def evaluator_summary(kind: str, spec: RunSpec) -> str:
    judge = spec.judge.model if spec.judge else None
    if kind == "evaluator":
        return f"Python evaluator `{spec.evaluator}` on the held-out prompts (mean score and win rate vs base)."
    if kind == "rubric":
        return f"Pairwise LLM judge `{judge}` with your rubric, both orders, on the held-out prompts."
    return f"Pairwise LLM judge `{judge}` with a rubric it writes from a sample of your training pairs."


def build_plan(spec: RunSpec, inspection: dict, jobs: list[dict], evaluator_kind: str, device: str,
               prices: dict | None = None, throughput: dict | None = None, resolved: list[dict] | None = None,
               placement: dict | None = None) -> dict:
    """Everything the approver sees, as data (plan.json) — the Markdown is rendered from it.
    ``resolved``: a run started from an instruction shows its spec, each field with its source
    (``tasks/instruction/resolve.plan_rows``); ``placement``: ``Placement.to_json()`` on a GPU machine."""
    warnings = list(inspection.get("warnings", []))
    pairs = None
    if inspection["format"] == "prompts":
        pairs = {"prompts": sum(prompt_quota(spec, inspection)), "strong": spec.strong.model if spec.strong else None,
                 "weak": spec.weak.model if spec.weak else None, "max_tokens": spec.pair_max_tokens}
    plan = {
        "spec_digest": spec.digest(),
        "dataset": {"path": spec.dataset, "format": inspection["format"],
                    "source_format": inspection.get("source_format"), "examples": inspection["examples"],
                    "duplicates": inspection.get("duplicates", 0), "train_examples": inspection["train_examples"],
                    "test_examples": inspection["test_examples"], "sha256": inspection.get("sha256"),
                    "warnings": warnings},
        "pairs": pairs,
        "diagnostics": inspection.get("diagnostics"),
        "jobs": [{**j, "base_model_name": short_name(j["base_model"])} for j in jobs],
        "max_concurrent_jobs": spec.max_concurrent_jobs,
        "target": spec.target_win_rate,
        "target_label": "win rate vs base",
        "method": spec.method,
        "learning_rate": spec.lr, "epochs": spec.epochs, "batch_size": spec.batch_size,
        "max_length": spec.max_length,
        "evaluator": {"kind": evaluator_kind, "summary": evaluator_summary(evaluator_kind, spec)},
        "estimate": estimate(spec, inspection, jobs, evaluator_kind, device, prices, throughput, placement),
        "budget_usd": spec.budget_usd,
        "placement": placement,
    }
    if resolved is not None:
        plan["instruction"] = {"text": spec.instruction, "planner": (spec.instruction_plan or {}).get("planner"),
                               "notes": (spec.instruction_plan or {}).get("notes", []), "fields": resolved}
    return plan


def with_approved(spec: RunSpec, inspection: dict, plan: dict, kept: list[dict], evaluator_kind: str,
                  throughput: dict | None = None) -> dict:
    """The plan and what was approved of it: when the approver dropped jobs (betas, base models), the
    estimate is recomputed for the jobs that run (``approved``); the full grid's stays in ``estimate``
    so the report can show both against what was spent."""
    kept_ids = {j["id"] for j in kept}
    if kept_ids == {j["id"] for j in plan["jobs"]}:
        return plan
    return {**plan, "approved": {
        "jobs": [j["id"] for j in plan["jobs"] if j["id"] in kept_ids],
        "dropped": [j["id"] for j in plan["jobs"] if j["id"] not in kept_ids],
        "estimate": estimate(spec, inspection, kept, evaluator_kind, plan["estimate"]["device"],
                             throughput=throughput, placement=plan.get("placement"))}}


def plan_digest(plan: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()[:16]
