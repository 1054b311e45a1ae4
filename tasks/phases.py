"""Each phase as one plain function of (spec, workspace, ...): what the flow wraps in tasks.

These adapt the RunSpec to the phase modules (inspect, pairs, training, evaluate, deploy,
report) and decide where in the workspace each output goes. No Prefect in here, so each can
be called and tested alone.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

from preftune.records import iter_records, prompt_hash
from preftune.server import device_name, resolve_run_endpoints
from preftune.spec import RunSpec
from preftune.tasks.plan import prompt_quota
from preftune.workspace import Workspace, read_json, write_json_atomic


class RunEnded(Exception):
    """The run stops here on purpose (a rejection, nothing to do): not a crash."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def device() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


# ---- phase 1 ------------------------------------------------------------------------------
def inspect_phase(spec: RunSpec, ws: Workspace, base_models: list[str]) -> dict:
    from preftune.tasks.inspect import inspect_dataset

    return inspect_dataset(spec.dataset, test_path=spec.test_dataset, models=base_models,
                           max_length=spec.max_length, workspace=ws)


def check_generators(spec: RunSpec, inspection: dict) -> None:
    if inspection["format"] == "prompts" and (spec.strong is None or spec.weak is None):
        raise RunEnded("failed", "the dataset holds prompts only: pair generation needs a strong and a weak "
                       "model (RunSpec strong/weak; `--strong`, `--weak`)")


# ---- phase 3 ------------------------------------------------------------------------------
def _split_by_test_prompts(pairs_file: Path, ws: Workspace) -> dict:
    """Generated pairs follow phase 1's split: a pair is test iff its prompt was a test prompt."""
    test_hashes = {prompt_hash(r["messages"], r.get("tools")) for _, r in iter_records(ws.test_data)}
    train_out, test_out = ws.data_dir / "train_pairs.jsonl", ws.data_dir / "test_pairs.jsonl"
    with open(train_out, "w", encoding="utf-8") as tr, open(test_out, "w", encoding="utf-8") as te:
        for _, rec in iter_records(pairs_file, expect="pairs"):
            side = te if prompt_hash(rec["input"]["messages"], rec["input"].get("tools")) in test_hashes else tr
            side.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return {"train": str(train_out), "test": str(test_out)}


def pairs_phase(spec: RunSpec, ws: Workspace, inspection: dict,
                on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Training and held-out pair files: phase 1's split for pairs; delta-learning pairs for prompts."""
    if inspection["format"] == "pairs":
        return {"train": str(ws.train_data), "test": str(ws.test_data)}
    done = ws.pairs_dir / "done.json"
    if done.exists():  # finished before: a re-run does not regenerate
        return read_json(done)
    from preftune.tasks.pairs import generate_pairs

    prompts = ws.data_dir / "prompts_all.jsonl"
    with open(prompts, "w", encoding="utf-8") as out:
        for path, limit in zip((ws.train_data, ws.test_data), prompt_quota(spec, inspection), strict=True):
            with open(path, encoding="utf-8") as src:
                for _, line in zip(range(limit), src, strict=False):
                    out.write(line)
    with contextlib.ExitStack() as stack:
        strong, weak = resolve_run_endpoints([spec.strong, spec.weak], log_dir=ws.logs_dir,  # type: ignore[list-item]
                                             stack=stack)
        provenance = generate_pairs(prompts, strong, weak, ws.pairs_dir, max_tokens=spec.pair_max_tokens,
                                    temperature=0.0, keep_truncated=spec.keep_truncated,
                                    cache_dir=ws.pairs_dir / "cache", progress=False, on_progress=on_progress)
    if provenance["counts"]["pairs"] < 3:
        raise RunEnded("failed", f"only {provenance['counts']['pairs']} usable pairs were generated "
                       f"(dropped: {provenance['counts']['by_reason']}); see pairs/provenance.json")
    result = _split_by_test_prompts(Path(provenance["pairs_file"]), ws) | {"pairs_file": provenance["pairs_file"]}
    write_json_atomic(done, result)
    return result


# The performance target is always the win rate vs base: the judge's, or for a Python evaluator the
# per-prompt comparison of its scores (evaluate_phase puts both in `win_rate`).
TARGET_NAME = "win rate vs base"


# ---- phase 5 ------------------------------------------------------------------------------
def trained_weights(ws: Workspace, job_id: str) -> str:
    """The job's LoRA adapter folder, or its full model folder after full fine-tuning."""
    summary = read_json(ws.job_dir(job_id) / "summary.json")
    return summary.get("adapter_dir") or summary["model_dir"]


def _eval_dir(ws: Workspace, base_model: str) -> Path:
    return ws.eval_dir / Path(base_model.rstrip("/")).name


def _candidate_entry(entry: dict, mode: str) -> dict:
    """One row of the merged table: for a Python evaluator, the paired win rate vs base leads and
    the mean score is kept beside it."""
    if mode != "evaluator":
        return dict(entry)
    vs = entry.get("vs_base", {})
    return {**vs, "mean_score": entry["mean_score"], "score_ci_low": entry["ci_low"],
            "score_ci_high": entry["ci_high"], "errors": entry.get("errors", 0),
            "mean_length": entry.get("mean_length")}


def evaluate_phase(spec: RunSpec, ws: Workspace, evaluator_kind: str, jobs: list[dict]) -> dict:
    """Each candidate against its own base model, grouped by base (base completions generated once
    per base and cached, judgments cached), merged into eval/scores.json."""
    from preftune.judges.stats import clear_winner
    from preftune.tasks.evaluate import BASE, EvalConfig, run_evaluation

    data = read_json(ws.pairs_dir / "done.json") if (ws.pairs_dir / "done.json").exists() else {
        "train": str(ws.train_data), "test": str(ws.test_data)}
    groups: dict[str, list[dict]] = {}
    for job in jobs:
        groups.setdefault(job["base_model"], []).append(job)
    merged: dict = {"kind": evaluator_kind, "models": {}, "bases": {}, "warnings": [], "judge_agreement": None,
                    "position_consistency": None, "judge_usage": {"prompt_tokens": 0, "completion_tokens": 0}}
    with contextlib.ExitStack() as stack:
        judge = (resolve_run_endpoints([spec.judge], log_dir=ws.logs_dir, stack=stack)[0]
                 if spec.judge and evaluator_kind != "evaluator" else None)
        for base, group in groups.items():
            cfg = EvalConfig(test_data=data["test"], base_model=base, out_dir=_eval_dir(ws, base),
                             candidates={j["id"]: trained_weights(ws, j["id"]) for j in group},
                             evaluator=spec.evaluator if evaluator_kind == "evaluator" else None,
                             rubric=spec.rubric, auto_rubric=evaluator_kind == "auto", train_data=data["train"],
                             judge=judge, max_prompts=spec.max_eval_prompts,
                             max_new_tokens=spec.eval_max_new_tokens, seed=spec.seed)
            scores = run_evaluation(cfg)
            name = Path(base.rstrip("/")).name
            for model, entry in scores["models"].items():
                if model == BASE:
                    merged["bases"][name] = entry
                else:
                    merged["models"][model] = _candidate_entry(entry, scores["mode"]) | {"base_model": name}
            merged["warnings"] += [f"{name}: {w}" for w in scores.get("warnings", [])]
            for key in ("judge_agreement", "position_consistency", "judge"):
                if scores.get(key) is not None:
                    merged[key] = scores[key]
            for key in ("prompt_tokens", "completion_tokens"):
                merged["judge_usage"][key] += (scores.get("judge_usage") or {}).get(key, 0)
            if scores.get("rubric"):
                merged["rubric"] = scores["rubric"]
    merged["clear_winner"] = clear_winner(merged["models"])
    if merged.get("rubric"):
        (ws.eval_dir / "rubric.md").write_text(Path(merged["rubric"]["path"]).read_text(), encoding="utf-8")
    write_json_atomic(ws.eval_dir / "scores.json", merged)
    return merged


def target_value(scores: dict, job_id: str) -> float | None:
    value = scores["models"].get(job_id, {}).get("win_rate")
    return None if value is None or value != value else float(value)  # NaN: nothing valid to rate


def target_met(spec: RunSpec, scores: dict) -> bool | None:
    if spec.target_win_rate is None:
        return None
    values = [target_value(scores, name) for name in scores["models"]]
    return any(v is not None and v >= spec.target_win_rate for v in values)


def recommended(scores: dict) -> str | None:
    """The clear winner; otherwise the best candidate that beats its base on the point estimate."""
    if scores.get("clear_winner"):
        return scores["clear_winner"]
    rated = [(target_value(scores, n), n) for n in scores["models"]]
    rated = [(v, n) for v, n in rated if v is not None and v > 0.5]
    return max(rated)[1] if rated else None


def comparison_markdown(scores: dict, recommended_job: str | None) -> str:
    from preftune.templating import render

    return render("comparison.md.j2", scores=scores, recommended=recommended_job)


# ---- phases 6 and 7 -----------------------------------------------------------------------
def deploy_phase(spec: RunSpec, ws: Workspace, chosen: str, jobs: dict[str, dict]) -> dict:
    from preftune.tasks.deploy import deploy

    if chosen == "base":
        base, adapter = next(iter(jobs.values()))["base_model"], None
    elif spec.lora.full:  # a full model folder stands alone
        base, adapter = trained_weights(ws, chosen), None
    else:
        base, adapter = jobs[chosen]["base_model"], trained_weights(ws, chosen)
    return deploy(base, ws.root, adapter=adapter, port=spec.deploy_port, device=device_name())


def report_phase(spec: RunSpec, ws: Workspace) -> str:
    from preftune.reports.build import write_report

    return write_report(ws)
