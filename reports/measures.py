"""What tuning changed in the answers, measured: per candidate against its own base model on the same
held-out prompts — mean answer length, the share of answers cut at the token limit (they hit
``max_new_tokens`` without ending), repetition as distinct-2 (unique word bigrams / all word bigrams,
Li et al. 2016: lower is more repetitive) and the share of refusals. A change past its threshold
(THRESHOLDS) is flagged in the report's *What changed*.

Read back from phase 5's files (each base's ``scores.json`` names every model's completion cache);
nothing is generated again.
"""

from __future__ import annotations

import re
from pathlib import Path

from preftune.files import read_json
from preftune.judges.completions import read_cache, read_cut

REFUSAL = re.compile(r"\b(i can(?:'|no)t|i cannot|i am unable|i'm unable|i won't|i will not|i'm sorry|"
                     r"i am sorry|as an ai)\b", re.I)
# A change is flagged past these (tuned − base): length relative, the others in absolute points.
THRESHOLDS = {"length": 0.25, "cut": 0.10, "distinct2": 0.10, "refusals": 0.05}
WORD = re.compile(r"\w+|[^\w\s]")


def distinct2(texts: list[str]) -> float | None:
    """Unique word bigrams / all word bigrams over the answers; None without any bigram."""
    grams = [tuple(words[i:i + 2]) for t in texts for words in [WORD.findall(t.lower())]
             for i in range(len(words) - 1)]
    return len(set(grams)) / len(grams) if grams else None


def measure(texts: list[str], cut: list[bool]) -> dict:
    n = len(texts)
    return {"n": n, "length": sum(len(t) for t in texts) / n if n else None,
            "cut": sum(cut) / n if n else None, "distinct2": distinct2(texts),
            "refusals": sum(bool(REFUSAL.search(t)) for t in texts) / n if n else None}


def _flags(base: dict, tuned: dict) -> list[str]:
    flags = []
    if base["length"] and tuned["length"] is not None and \
            abs(tuned["length"] / base["length"] - 1) > THRESHOLDS["length"]:
        flags.append("length")
    for key in ("cut", "refusals"):
        if base[key] is not None and tuned[key] is not None and tuned[key] - base[key] > THRESHOLDS[key]:
            flags.append(key)
    if base["distinct2"] is not None and tuned["distinct2"] is not None and \
            base["distinct2"] - tuned["distinct2"] > THRESHOLDS["distinct2"]:
        flags.append("distinct2")
    return flags


def cache_file(recorded: str, base_dir: Path) -> Path:
    """A completion cache recorded with its absolute path: this workspace's copy (it may have moved)."""
    local = base_dir / "completions" / Path(recorded).name
    return local if local.exists() else Path(recorded)


def answer_changes(eval_dir: Path, scores: dict | None) -> list[dict]:
    """One row per candidate: {name, base_model, base, tuned (measure() of each on the prompts both
    answered), flags}."""
    rows = []
    for name, entry in ((scores or {}).get("models") or {}).items():
        base_dir = eval_dir / str(entry.get("base_model"))
        info = (read_json(base_dir / "scores.json") if (base_dir / "scores.json").exists() else {}).get("models_info")
        if not info or "base" not in info or name not in info:
            continue
        files = {k: cache_file(info[k]["completions"], base_dir) for k in ("base", name)}
        texts = {k: read_cache(p) for k, p in files.items()}
        cut = {k: read_cut(p) for k, p in files.items()}
        keys = [h for h in texts["base"] if h in texts[name]]
        base = measure([texts["base"][h] for h in keys], [h in cut["base"] for h in keys])
        tuned = measure([texts[name][h] for h in keys], [h in cut[name] for h in keys])
        rows.append({"name": name, "base_model": entry.get("base_model"), "base": base, "tuned": tuned,
                     "flags": _flags(base, tuned)})
    return rows
