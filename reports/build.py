"""Phase 7: gather the run's files into one context and render `final_report.md`.

Everything in the report is read back from the workspace — the report shows what was written,
not what the flow remembers — so it can be re-rendered for any finished or resumed run.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from preftune import cost
from preftune.approvals_log import read_approvals
from preftune.endpoint import Endpoint
from preftune.files import read_json
from preftune.judges import decision as decision_file
from preftune.judges import selection
from preftune.ledger import REPORT_PHASES, phase_totals, read_ledger, usd_of
from preftune.reports.changes import not_better, what_changed
from preftune.reports.figures import data_uri, plot_curves, read_metrics
from preftune.reports.measures import THRESHOLDS, answer_changes
from preftune.templating import render
from preftune.workspace import Workspace, short_name


def _maybe(path: Path) -> dict | list | None:
    return read_json(path) if path.exists() else None




def _sweep_rows(ws: Workspace) -> tuple[list[dict], dict[str, list[dict]]]:
    sweep = _maybe(ws.sweep_results) or []
    rows, curves = [], {}
    for entry in sweep:
        job, summary = entry["job"], entry.get("summary") or {}
        rows.append({"id": job["id"], "base_model": short_name(job["base_model"]), "beta": job["beta"],
                     "loss": job["loss_label"], "status": entry["status"], "summary": summary,
                     "error": entry.get("error"), "health": entry.get("health") or summary.get("health")})
        metrics = read_metrics(ws.job_dir(job["id"]) / "metrics.jsonl")
        if metrics:
            curves[job["id"]] = metrics
    return rows, curves


def _usage_usd(usage: dict | None, endpoint: dict | None) -> float | None:
    """USD of the recorded usage by ``Endpoint.cost`` (the one price rule); None when unpriced."""
    if not usage or not endpoint:
        return 0.0
    return Endpoint.model_validate(endpoint).cost(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))


def _sum(values: list[float | None]) -> float | None:
    """A total is unknown as soon as one part is: an unpriced endpoint is not $0."""
    return None if any(v is None for v in values) else round(sum(values), 6)  # type: ignore[arg-type]


def actual_cost(spec: dict, rows: list[dict], provenance: dict | None, scores: dict | None,
                device: str, prices: dict | None = None, ledger: list[dict] | None = None) -> dict:
    """What was spent, per phase, priced the same way as the estimate.

    Endpoint spending is the cost ledger's sum per phase (``ledger``: its entries, the workspace's
    ``ledger.jsonl``): every paid request once, whether it was paid before a crash, during an
    early-stop evaluation or in a run that a later one resumed from the cache. A phase with an
    unpriced paid request is unknown (None), never $0. Without a ledger (a workspace written before
    it existed) the usage recorded in provenance.json and scores.json is priced instead."""
    prices = prices or cost.load_prices()
    remote = spec.get("work_pool") is not None
    training = 0.0
    tokens = 0
    for row in rows:
        summary = row["summary"]
        if not summary:
            continue
        tokens += int(summary.get("train_tokens", 0))
        if remote:
            params = cost.model_params(summary.get("base_model") or row["base_model"])
            training += summary.get("train_tokens", 0) * cost.training_usd_per_1m(
                params, spec["full"], prices) / 1e6
        else:
            training += summary.get("wall_seconds", 0.0) * prices["local_usd_per_hour"][device] / 3600
    if ledger is not None:
        pairs_usd = usd_of(ledger, REPORT_PHASES["pair_generation"])
        eval_usd = usd_of(ledger, REPORT_PHASES["evaluation"])
    else:
        usage = (provenance or {}).get("usage") or {}
        pairs_usd = _sum([_usage_usd(usage.get(role), spec.get(role)) for role in ("strong", "weak")])
        eval_usd = _sum([_usage_usd((scores or {}).get("judge_usage"), spec.get("judge"))])
    return {"training": round(training, 6), "train_tokens": tokens, "pair_generation": pairs_usd,
            "evaluation": eval_usd, "total": _sum([training, pairs_usd, eval_usd]),
            "ledger": phase_totals(ledger) if ledger is not None else None}


def yields(spec: dict, inspection: dict, data: dict | None, scores: dict | None) -> dict:
    """What each phase kept of what it was given, with a warning wherever it is too little to trust:
    the report shows this first."""
    out: dict = {"warnings": []}
    pair_yield = (data or {}).get("yield")
    if pair_yield:
        out["pairs"] = pair_yield
        minimum = spec.get("min_pair_yield", 0.5)
        if pair_yield["share"] < minimum:
            out["warnings"].append(f"only {pair_yield['pairs']} of {pair_yield['prompts']} prompts gave a usable pair "
                                   f"({pair_yield['share']:.0%}, below the minimum {minimum:.0%})")
    if inspection:
        out["split"] = {"train": inspection.get("train_examples"), "test": inspection.get("test_examples")}
    out["why"] = shrinkage(spec, inspection, pair_yield, scores)
    counts = {m: selection.rated(e) for m, e in ((scores or {}).get("models") or {}).items()}
    if counts:
        out["evaluated"] = counts
        small = sorted(m for m, n in counts.items() if n < 20)
        if small:
            out["warnings"].append(f"evaluated on fewer than 20 held-out prompts: {', '.join(small)} "
                                   "(the win rates are rough)")
    return out


def shrinkage(spec: dict, inspection: dict, pair_yield: dict | None, scores: dict | None) -> list[str]:
    """Why each count shrinks between phases (examples → split → prompts paired → pairs → evaluated →
    rated), one sentence each, from the files that decided it."""
    why = []
    if inspection:
        split = inspection.get("split") or {}
        how = (f"the given test file `{split.get('test_source')}`" if split.get("method") == "test_file"
               else f"a hash of each prompt puts ~{split.get('test_percent', '?')}% of prompts in the held-out split")
        overlap = split.get("overlap_removed") or 0
        why.append(f"split: {inspection.get('examples', 0):,} examples read, {inspection.get('duplicates', 0):,} exact "
                   f"duplicates removed{f', {overlap:,} training examples sharing a held-out prompt removed' if overlap else ''}"
                   f"; {inspection.get('train_examples', 0):,} train / {inspection.get('test_examples', 0):,} held-out "
                   f"({how})")
    if pair_yield:
        total = (inspection.get("train_examples") or 0) + (inspection.get("test_examples") or 0)
        budget = (f": the run's pair budget (max_pair_prompts = {spec.get('max_pair_prompts')})"
                  if pair_yield["prompts"] < total else "")
        dropped = ", ".join(f"{k} {v}" for k, v in pair_yield.get("by_reason", {}).items() if v) or "none"
        why.append(f"pairing: {pair_yield['prompts']:,} of {total:,} prompts sent to the strong and weak models{budget}; "
                   f"{pair_yield['pairs']:,} gave a usable pair (dropped: {dropped})")
    models = (scores or {}).get("models") or {}
    if models:
        held = (pair_yield or {}).get("test_pairs", inspection.get("test_examples") if inspection else None)
        n = max(int(m.get("n") or 0) for m in models.values())
        cap = spec.get("max_eval_prompts")
        limit = f": the run's max_eval_prompts = {cap}" if cap is not None and held is not None and n < held else ""
        invalid = sum(int(m.get("invalid") or 0) for m in models.values())
        why.append(f"evaluation: {n:,} of {held if held is not None else '?'} held-out prompts evaluated (distinct "
                   f"prompts){limit}; a candidate's rated count leaves out its invalid verdicts ({invalid:,} in all)")
    return why


def collect(ws: Workspace) -> dict:
    run = _maybe(ws.run_record) or {}
    spec = run.get("spec", {})
    plan = _maybe(ws.plan) or {}
    rows, curves = _sweep_rows(ws)
    scores = _maybe(ws.scores)
    provenance = _maybe(ws.pairs_dir / "provenance.json")
    device = (plan.get("estimate") or {}).get("device", "cpu")
    outcome = _maybe(ws.outcome) or {}
    decision = _maybe(ws.root / decision_file.FILE)
    return {
        "spec": spec, "plan": plan, "inspection": _maybe(ws.inspection) or {}, "rows": rows,
        "curves": curves, "scores": scores, "provenance": provenance,
        "endpoint": _maybe(ws.endpoint), "approvals": read_approvals(ws.approvals),
        "outcome": outcome, "decision": decision,
        "rubric": (ws.eval_dir / "rubric.md").read_text() if (ws.eval_dir / "rubric.md").exists() else None,
        "actual": actual_cost(spec, rows, provenance, scores, device,
                              ledger=read_ledger(ws.ledger) if ws.ledger.exists() else None) if spec else None,
        "yields": yields(spec, _maybe(ws.inspection) or {}, _maybe(ws.pairs_done), scores),
        "changes": what_changed(ws, outcome, scores, decision),
        "measures": answer_changes(ws.eval_dir, scores), "thresholds": THRESHOLDS, "not_better": not_better(outcome, scores),
        "estimate": (plan.get("approved") or {}).get("estimate") or plan.get("estimate"),
        "groups": candidate_groups(scores) if scores else [], "verdict": verdict_line(scores) if scores else None,
        "stop_command": stop_command(ws),
        "diagnostics": _maybe(ws.root / "diagnostics.json"),  # tasks/diagnostics.py, written by the flow
    }


def stop_command(ws: Workspace) -> str:
    """The command that stops the workspace's deployed server (preftune/cli/deploy.py: --stop)."""
    return f"preftune deploy --stop --workspace {shlex.quote(str(ws.root.resolve()))}"


def _snippet(endpoint: dict | None) -> str | None:
    path = Path(endpoint["snippet"]) if endpoint and endpoint.get("snippet") else None
    return path.read_text(encoding="utf-8") if path and path.exists() else None


def write_report(ws: Workspace, extra: dict | None = None) -> str:
    """Render ``final_report.md`` (linking the PNGs in ``figures/``) and return the same report for the
    Prefect artifact, with the figures embedded as data URIs: the UI cannot resolve a relative link.
    One template renders both (``embed``)."""
    context = collect(ws) | (extra or {})
    context["snippet"] = _snippet(context["endpoint"])
    figures = plot_curves(context["curves"], ws.figures) if context["curves"] else {}
    context["figures"] = {key: f"figures/{name}" for key, name in figures.items()}
    ws.report.write_text(render("final_report.md.j2", **context), encoding="utf-8")
    context["figures"] = {key: data_uri(ws.figures / name) for key, name in figures.items()}
    return render("final_report.md.j2", **context)


def candidate_groups(scores: dict) -> list[dict]:
    """The candidates under their base model, with the base's own scores where the evaluator gives
    it one (a Python evaluator scores the base too; a pairwise judge only compares against it)."""
    groups: dict[str, dict] = {}
    for name, entry in (scores.get("models") or {}).items():
        base = entry.get("base_model") or "?"
        group = groups.setdefault(base, {"base": base, "own": (scores.get("bases") or {}).get(base),
                                         "candidates": []})
        group["candidates"].append({"name": name, **entry})
    return list(groups.values())


def comparison_markdown(scores: dict, recommended_job: str | None) -> str:
    """The comparison shown at the deploy decision: every candidate's scores beside its base's, the
    selection rule's verdict (the same words the report uses), and what each answer deploys
    (`recommended` names the job, or deploys nothing)."""
    return render("comparison.md.j2", scores=scores, recommended=recommended_job,
                  groups=candidate_groups(scores), verdict=verdict_line(scores))


def verdict_line(scores: dict) -> str:
    """The selection rule's verdict in one sentence (judges/selection.py), for the question and the report."""
    sel = scores.get("selection") or {}
    top = sel.get("top_two") or {}
    if sel.get("verdict") == selection.SIGNIFICANT:
        apart = (f" and is told apart from the runner-up `{top['second']}` (difference 95% CI "
                 f"[{_num(top['ci_low'])}, {_num(top['ci_high'])}])") if top else ""
        return f"Significant winner: `{sel['winner']}` beats its base{apart}."
    if sel.get("verdict") == selection.NOT_APART:
        return (f"No significant winner: `{top['first']}` beats its base but cannot be told apart from "
                f"`{top['second']}` (difference 95% CI [{_num(top['ci_low'])}, {_num(top['ci_high'])}], includes 0).")
    return "No significant winner: no candidate beats its base (no 95% CI of the difference from its base is above 0)."


def _num(value: float | None) -> str:
    return "?" if value is None else f"{value:.3f}"
