"""The run's one decision record, ``decision.json``: which model was deployed (or none), by which
rule (the verdict of judges/selection.py), chosen by whom or by which default, and the one sentence
that says so. Written once, when the deploy choice is made; the report's summary, its scores table,
the Approvals table and the deploy section all render this record (reports/build.py)."""

from __future__ import annotations

import math

from preftune.judges import selection

FILE = "decision.json"
_VERDICT_TEXT = {
    selection.SIGNIFICANT: "the significant winner",
    selection.NOT_APART: "the best of candidates that cannot be told apart (no significant winner)",
    selection.NONE_BEATS: "no candidate beats its base",
}


def _num(value: float | None) -> str:
    return "?" if value is None or not math.isfinite(value) else f"{value:.3f}"


def rows(scores: dict) -> list[dict]:
    """Every row of the scores table as {name, value, base (its base model, None for a base row)}:
    a Python evaluator's mean score (bases scored too), else the win rate vs base (a base is 0.5)."""
    evaluator = scores.get("kind") == "evaluator" or scores.get("mode") == "evaluator"
    key = "mean_score" if evaluator else "win_rate"
    out = [{"name": name, "value": (m.get(key) if m.get(key) is not None else math.nan), "base": m.get("base_model")}
           for name, m in (scores.get("models") or {}).items()]
    bases = {m.get("base_model") for m in (scores.get("models") or {}).values()}
    for base in sorted(b for b in bases if b):
        own = (scores.get("bases") or {}).get(base) or {}
        value = own.get("mean_score") if evaluator else 0.5
        out.append({"name": base, "value": value if value is not None else math.nan, "base": None})
    return out


def best_row(scores: dict) -> dict | None:
    ranked = [r for r in rows(scores) if math.isfinite(r["value"])]
    return max(ranked, key=lambda r: (r["value"], r["base"] is None, r["name"])) if ranked else None


def base_beats_all(scores: dict) -> bool:
    """Every candidate scores below its own base (rows(): a base row holds its base's value)."""
    table = rows(scores)
    own = {r["name"]: r["value"] for r in table if r["base"] is None}
    cands = [r for r in table if r["base"] is not None and math.isfinite(r["value"])]
    return bool(cands) and all(r["value"] < own.get(r["base"], math.nan) for r in cands)


def _who(by: str | None, answer: str | None, where: str) -> str:
    if by == "auto":
        return f"the headless default (`--yes`: `{answer}`) at the {where}"
    return f"the person's answer `{answer}` at the {where}"


def record(scores: dict, deployed: str | None, *, answer: str | None, by: str | None,
           gate: str | None = None, gate_by: str | None = None, deploy_setting: bool = True) -> dict:
    """The decision record (module docstring), its `summary` the one sentence every place shows."""
    sel = scores.get("selection") or {}
    rec = sel.get("recommended")
    best = best_row(scores)
    record = {"deployed": deployed, "recommended": rec, "winner": sel.get("winner"),
              "verdict": sel.get("verdict"), "rule": sel.get("rule"),
              "chosen_by": "default" if by == "auto" else "person", "answer": answer, "answered_by": by,
              "gate": gate, "gate_by": gate_by, "deploy_setting": deploy_setting,
              "beats_base": selection.beats_base(scores, deployed),
              "best_row": best, "base_beats_all": base_beats_all(scores)}
    record["summary"] = summary(record, scores)
    return record


def _best_candidate(scores: dict) -> str:
    sel = scores.get("selection") or {}
    ranking = sel.get("ranking") or []
    if not ranking:
        return ""
    top = ranking[0]
    vs = (sel.get("vs_base") or {}).get(top) or {}
    return (f" (the best, `{top}`: difference from its base {_num(vs.get('diff'))}, "
            f"95% CI [{_num(vs.get('ci_low'))}, {_num(vs.get('ci_high'))}])")


def summary(rec: dict, scores: dict) -> str:
    """One sentence: what was deployed, by which rule and by whom, and any contradiction with the
    scores (not the best-scoring row, the base beating every candidate, nothing after `recommended`)."""
    who = _who(rec["answered_by"], rec["answer"], "comparison question")
    best, deployed = rec["best_row"], rec["deployed"]
    base_note = ""
    if rec["base_beats_all"] and best is not None:
        base_note = f"; the untuned base `{best['name']}` scores above every candidate ({_num(best['value'])})"
    if deployed is None:
        if not rec["deploy_setting"]:
            why = "the run's setting is not to deploy (deploy = false)"
        elif rec["gate"] is not None:
            why = f"`{rec['recommended']}` was held back by {_who(rec['gate_by'], rec['gate'], 'promotion gate')}"
        elif rec["answer"] == "recommended":
            why = (f"{who} deploys only a candidate that beats its base, and {_VERDICT_TEXT[selection.NONE_BEATS]}"
                   f" by the paired bootstrap{_best_candidate(scores)}")
        else:
            why = f"{who} deploys nothing"
        return f"Nothing was deployed: {why}{base_note}."
    if deployed == "base":
        return f"Deployed the untuned base model, chosen by {who}{base_note}."
    verdict = _VERDICT_TEXT.get(rec["verdict"] or "", "")
    if deployed == rec["recommended"]:
        how = f"`{deployed}`, {verdict}, chosen by {who}"
    else:
        how = f"`{deployed}`, not the recommended candidate (`{rec['recommended'] or 'none'}`: {verdict}), chosen by {who}"
    if best is not None and best["name"] != deployed:
        mine = next((r["value"] for r in rows(scores) if r["name"] == deployed), math.nan)
        what = "the untuned base" if best["base"] is None else "the candidate"
        how += f", although {what} `{best['name']}` scores higher ({_num(best['value'])} vs {_num(mine)})"
        if rec["base_beats_all"]:
            how += " and every candidate scores below its base"
    if not rec["beats_base"]:
        how += ", and it is not shown to beat its base"
    return f"Deployed {how}."
