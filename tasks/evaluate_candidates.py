"""Phase 5 of the flow: every finished candidate against its own base model.

Candidates are grouped by base model, so each base's completions are generated once (cached) and
its judgments are shared; the per-base results of tasks/evaluate.py are merged into one table,
eval/scores.json, that the selection rules (judges/selection.py) and the report read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from preftune.backends import launch_for, local_backend
from preftune.client import AuthError
from preftune.endpoint import Endpoint
from preftune.errors import RunEnded
from preftune.files import write_json_atomic
from preftune.judges import selection
from preftune.server import device_name, is_local_model, resolve_run_endpoints, serve_local
from preftune.spec import RunSpec
from preftune.tasks.evaluate import BASE, EvalConfig, finite, load_test, run_evaluation
from preftune.tasks.evaluate_checks import token_limit_for
from preftune.tasks.pairs import run_data
from preftune.tasks.sweep import trained_weights
from preftune.workspace import Workspace, short_name


def _candidate_entry(entry: dict, mode: str) -> dict:
    """One row of the merged table: for a Python evaluator, the paired win rate vs base leads and
    the mean score is kept beside it."""
    if mode != "evaluator":
        return dict(entry)
    vs = entry.get("vs_base", {})
    return {**vs, "mean_score": entry["mean_score"], "score_ci_low": entry["ci_low"],
            "score_ci_high": entry["ci_high"], "errors": entry.get("errors", 0),
            "mean_length": entry.get("mean_length"), "per_prompt": entry.get("per_prompt", {}),
            **{k: entry[k] for k in ("cut_answers", "baseline_cut_answers", "cut_verdicts") if k in entry}}


def _empty(evaluator_kind: str) -> dict:
    return {"kind": evaluator_kind, "models": {}, "bases": {}, "warnings": [], "judge_agreement": None,
            "position_consistency": None, "judge_usage": {"prompt_tokens": 0, "completion_tokens": 0},
            "max_new_tokens": {}}


def _merge(merged: dict, base: str, scores: dict) -> None:
    name = short_name(base)
    for model, entry in scores["models"].items():
        if model == BASE:
            merged["bases"][name] = entry
        else:
            merged["models"][model] = _candidate_entry(entry, scores["mode"]) | {"base_model": name}
    # A warning every base gives alike (the calibration pairs and the scorer are the run's) is said once.
    said = {w.split(": ", 1)[-1] for w in merged["warnings"]}
    merged["warnings"] += [f"{name}: {w}" for w in scores.get("warnings", []) if w not in said]
    # The calibration pairs and the judge are the same for every base (its replies come from the cache):
    # any base's figures are the run's. Position consistency pools every base's judgments.
    for key in ("judge_agreement", "judge_validity", "judge"):
        if scores.get(key) is not None:
            merged[key] = scores[key]
    pairs = scores.get("position_pairs") or 0
    if pairs:
        merged["position_consistent"] = merged.get("position_consistent", 0) + pairs * scores["position_consistency"]
        merged["position_pairs"] = merged.get("position_pairs", 0) + pairs
        merged["position_consistency"] = merged["position_consistent"] / merged["position_pairs"]
    for key in ("prompt_tokens", "completion_tokens"):
        merged["judge_usage"][key] += (scores.get("judge_usage") or {}).get(key, 0)
    if scores.get("rubric"):
        merged["rubric"] = scores["rubric"]


def label_kind(ws: Workspace) -> str:
    """"strong-vs-weak" when the held-out pairs were generated (phase 3), else "human" (a dataset's)."""
    return "strong-vs-weak" if ws.pairs_done.exists() else "human"


def select_merged(merged: dict, seed: int = 0) -> dict:
    """The one selection rule (judges/selection.py) over every candidate of every base."""
    merged["selection"] = finite(selection.select(merged["models"], seed=seed))
    merged["clear_winner"] = merged["selection"]["winner"]
    return merged


def evaluate_candidates(spec: RunSpec, ws: Workspace, evaluator_kind: str, jobs: list[dict],
                        on_progress: Callable[[float, float], None] | None = None) -> dict:
    """Each candidate against its own base model, merged into eval/scores.json. Every paid judge
    request goes to the workspace's cost ledger when it is paid, so an early-stop evaluation during
    the sweep and the final one (answered from the cache) are each counted once. `on_progress(done,
    total)` reports completions generated and scored so far, of all base models' groups."""
    try:
        return _evaluate_candidates(spec, ws, evaluator_kind, jobs, on_progress)
    except AuthError as err:  # the judge refused the key: the run ends with that one line
        raise RunEnded("failed", str(err)) from None


def lora_server(stack: contextlib.ExitStack, ws: Workspace, base: str, candidates: dict[str, str],
                backend: str | None = None) -> dict[str, Endpoint]:
    """On the vLLM backend: ONE server for ``base`` with every candidate's adapter loaded as a LoRA
    module (named by the job id), released when ``stack`` closes: model name → its endpoint. No
    merge and no reload per candidate. Elsewhere (preftune's server on CPU, a full fine-tune among
    the candidates): {}, and candidates are generated in process, one adapter at a time."""
    if not candidates or not is_local_model(base):
        return {}
    if not all((Path(p) / "adapter_config.json").is_file() for p in candidates.values()):
        return {}
    if (backend or local_backend(base)) != "vllm":
        return {}
    launch = launch_for("vllm", base, adapters=candidates)
    # Recorded under its first adapter's folder: the base's own server (pairs) keeps its registry entry.
    handle = serve_local(next(iter(candidates.values())), ws.logs_dir, device=device_name(), launch=launch,
                         timeout=1800.0)
    stack.callback(handle.release)
    ep = handle.endpoint()
    return {BASE: ep.model_copy(update={"model": base}), **{n: ep.model_copy(update={"model": n}) for n in candidates}}


def _group_progress(report: Callable[[float, float], None] | None, index: int, groups: int, finished: list[int]):
    """One base model's (done, total) items as the whole phase's: the groups before it count what they
    did (`finished`, appended to as each group ends), the ones after it as many items as this one."""
    if report is None:
        return None

    def on_group(done: float, total: float) -> None:
        finished.extend([0] * (index - len(finished)))  # a group before it that reported nothing
        if done >= total:
            finished[index:] = [int(total)]
        report(sum(finished[:index]) + done, sum(finished[:index]) + total * (groups - index))
    return on_group


def _evaluate_candidates(spec: RunSpec, ws: Workspace, evaluator_kind: str, jobs: list[dict],
                         on_progress: Callable[[float, float], None] | None) -> dict:
    data = run_data(ws)
    groups: dict[str, list[dict]] = {}
    for job in jobs:
        groups.setdefault(job["base_model"], []).append(job)
    merged = _empty(evaluator_kind)
    finished: list[int] = []  # items each base model's group scored, for the progress line
    merged["evaluator"] = spec.evaluator if evaluator_kind == "evaluator" else None
    with contextlib.ExitStack() as stack:
        use_judge = spec.judge is not None and evaluator_kind != "evaluator"
        judge = resolve_run_endpoints([spec.judge], log_dir=ws.logs_dir, stack=stack)[0] if use_judge else None
        for index, (base, group) in enumerate(groups.items()):
            weights = {j["id"]: trained_weights(ws, j["id"]) for j in group}
            limit = ({"value": spec.eval_max_new_tokens, "why": "set in the run: eval_max_new_tokens"}
                     if spec.eval_max_new_tokens else token_limit_for(base, load_test(data["test"], spec.max_eval_prompts)[1]))
            cfg = EvalConfig(test_data=data["test"], base_model=base, out_dir=ws.eval_base_dir(base),
                             candidates=weights,
                             evaluator=spec.evaluator if evaluator_kind == "evaluator" else None,
                             rubric=spec.rubric, auto_rubric=evaluator_kind == "auto", train_data=data["train"],
                             judge=judge, ledger=ws.ledger, max_prompts=spec.max_eval_prompts,
                             validity_pairs=spec.judge_calibration_pairs, labels=label_kind(ws),
                             max_new_tokens=limit["value"], seed=spec.seed,
                             served=lora_server(stack, ws, base, weights))
            _merge(merged, base, run_evaluation(cfg, _group_progress(on_progress, index, len(groups), finished)))
            merged["max_new_tokens"][short_name(base)] = limit
    select_merged(merged, spec.seed)
    if merged.get("rubric"):
        (ws.eval_dir / "rubric.md").write_text(Path(merged["rubric"]["path"]).read_text(), encoding="utf-8")
    write_json_atomic(ws.scores, merged)
    return merged
