"""What the tuning changed, for a reader: a few held-out prompts with the base model's answer and the
tuned candidate's, the verdict on each, and a warning when the deployed candidate is not shown to
beat its base.

Everything is read back from phase 5's files (tasks/evaluate.py writes them under
``eval/<base>/``): ``scores.json`` names each model's completion cache, ``judgments/<name>.jsonl``
holds the pairwise judge's verdicts and ``evaluator_scores.jsonl`` a Python evaluator's scores,
both keyed by prompt hash. Nothing is generated or judged again here.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from preftune.files import read_json
from preftune.judges import selection
from preftune.judges.completions import read_cache, read_cut
from preftune.records import iter_records, prompt_hash, prompt_of
from preftune.reports.measures import cache_file
from preftune.workspace import Workspace

SHOWN = 5  # prompts in the What-changed section
PROMPT_CHARS = 300  # longer prompts and answers are cut (at a word) with a note: the report stays readable
ANSWER_CHARS = 600
REASON_CHARS = 400  # the judge's reply shown under a pair (the order with the tuned answer as A)


def shown_candidate(outcome: dict, scores: dict | None, decision: dict | None = None) -> tuple[str | None, bool]:
    """(candidate to show, whether it is the deployed one): the deployed candidate (the decision
    record's, else the outcome's); else (nothing or the base deployed) the recommended one; else the
    best of the selection rule's ranking (win rate, or a Python evaluator's mean score)."""
    models = (scores or {}).get("models") or {}
    deployed = (decision or outcome).get("deployed")
    if deployed in models:
        return deployed, True
    best = selection.recommended(scores) if models else None
    ranking = ((scores or {}).get("selection") or {}).get("ranking") or sorted(models)
    return (best or (ranking[0] if ranking else None)), False


def not_better(outcome: dict, scores: dict | None) -> list[str]:
    """Why the deployed candidate is not shown to be better than its base ([] when it is, or when
    nothing or the base model itself was deployed), by the selection rule (judges/selection.py: the
    paired bootstrap of its per-prompt difference from its base); scores written before that rule
    existed are read by their win rate and its 95% CI against 0.5."""
    name = outcome.get("deployed")
    entry = ((scores or {}).get("models") or {}).get(name) if name else None
    if entry is None:
        return []
    vs = (((scores or {}).get("selection") or {}).get("vs_base") or {}).get(name)
    if vs is not None:
        if vs.get("diff") is None:
            return ["no held-out prompt gave a valid comparison with its base"]
        if vs.get("above"):
            return []
        what = "win rate minus 0.5" if (scores or {}).get("kind") != "evaluator" else "score minus its base's"
        return [f"its per-prompt {what} averages {vs['diff']:.3f}, 95% CI [{_fmt(vs.get('ci_low'))}, "
                f"{_fmt(vs.get('ci_high'))}] (paired bootstrap over {vs['n']} prompts): not above 0"]
    rate, low, high = entry.get("win_rate"), entry.get("ci_low"), entry.get("ci_high")
    if rate is None:
        return ["no held-out prompt gave a valid comparison with its base"]
    if rate <= 0.5:
        return [f"its win rate against its base is {rate:.3f} (at most 0.5: it did not win more than it lost)"]
    if low is None or low <= 0.5:
        return [f"the 95% CI of its win rate, [{_fmt(low)}, {_fmt(high)}], includes 0.5: the gain may be chance"]
    return []


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:.3f}"


def _clip(text: str, limit: int) -> dict:
    """{"text": at most ``limit`` characters, cut at a word, "html": the same escaped for an HTML cell
    (line breaks as <br>: a blank line would end the HTML block), "chars": the full length}."""
    text = text.strip()
    if len(text) <= limit:
        return {"text": text, "html": _html(text), "chars": len(text), "cut": False}
    cut = text[:limit]
    shown = (cut[:cut.rfind(" ")] if cut.rfind(" ") > limit // 2 else cut).rstrip()
    return {"text": shown, "html": _html(shown), "chars": len(text), "cut": True}


def _html(text: str) -> str:
    return html.escape(text).replace("\r", "").replace("\n", "<br>")


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _verdicts(base_dir: Path, name: str, mode: str) -> dict[str, dict]:
    """prompt hash → the verdict on the candidate's answer against the base's answer."""
    if mode == "evaluator":
        rows = {r["key"]: r for r in _jsonl(base_dir / "evaluator_scores.jsonl")}
        out = {}
        for key, mine in rows.items():
            model, _, h = key.rpartition(":")
            theirs = rows.get(f"base:{h}")
            if model != name or theirs is None:
                continue
            s, b = mine.get("score"), theirs.get("score")
            outcome = ("invalid" if s is None or b is None else "win" if s > b else "loss" if s < b else "tie")
            out[h] = {"outcome": outcome, "score": s, "base_score": b, "reason": mine.get("reason"),
                      "base_reason": theirs.get("reason"), "error": mine.get("error") or theirs.get("error")}
        return out
    return {r["key"]: {"outcome": r["outcome"], "candidate_first": r["verdict_candidate_first"],
                       "base_first": r["verdict_baseline_first"], "error": r.get("error"),
                       "reason": _clip(r.get("reply_candidate_first") or "", REASON_CHARS)}
            for r in _jsonl(base_dir / "judgments" / f"{name}.jsonl")}


def what_changed(ws: Workspace, outcome: dict, scores: dict | None, decision: dict | None = None,
                 n: int = SHOWN) -> dict | None:
    """Up to ``n`` held-out prompts (in held-out order; prompts whose two answers differ first) with
    the base model's answer, the shown candidate's answer and the verdict; None when phase 5 left
    nothing to show."""
    name, deployed = shown_candidate(outcome, scores, decision)
    if name is None:
        return None
    base_name = scores["models"][name].get("base_model")
    base_dir = ws.eval_dir / str(base_name)
    info = read_json(base_dir / "scores.json") if (base_dir / "scores.json").exists() else {}
    models = info.get("models_info") or {}
    if "base" not in models or name not in models or not info.get("test_data"):
        return None
    files = {"base": cache_file(models["base"]["completions"], base_dir), "tuned": cache_file(models[name]["completions"], base_dir)}
    base, tuned = read_cache(files["base"]), read_cache(files["tuned"])
    cut = {k: read_cut(p) for k, p in files.items()}
    verdicts = _verdicts(base_dir, name, info.get("mode", "evaluator"))
    found: dict[str, dict] = {}
    for _, rec in iter_records(info["test_data"]):
        messages, tools = prompt_of(rec)
        h = prompt_hash(messages, tools)
        if h in base and h in tuned and h in verdicts and h not in found:
            found[h] = {"prompt": _clip(messages[-1]["content"], PROMPT_CHARS), "base": _clip(base[h], ANSWER_CHARS),
                        "tuned": _clip(tuned[h], ANSWER_CHARS), "verdict": verdicts[h],
                        "same": base[h].strip() == tuned[h].strip(),
                        "base_cut": h in cut["base"], "tuned_cut": h in cut["tuned"]}
        if sum(not e["same"] for e in found.values()) >= n or len(found) == len(verdicts):
            break  # enough differing answers, or every evaluated prompt seen: no need to read further
    shown = sorted(found.values(), key=lambda e: e["same"])[:n]  # stable: held-out order within each group
    return {"model": name, "deployed": deployed, "base_model": base_name, "mode": info.get("mode", "evaluator"),
            "examples": shown, "files": {k: _relative(p, ws.root) for k, p in files.items()},
            "max_new_tokens": info.get("max_new_tokens")}


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
