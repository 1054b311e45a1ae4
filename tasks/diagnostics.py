"""Pair diagnostics before anything is spent: can the pairs be told apart without reading them, do
the held-out prompts repeat training prompts, and what does truncation cut.

Three checks over the split files phase 1 writes (or phase 3's generated pairs), plain functions:

- *shortcut*: the share of pairs whose preferred answer is longer, and the held-out (k-fold)
  accuracy of a logistic regression on surface features only — lengths, list/markdown formatting,
  refusal phrases, script, punctuation. Each pair is shown to it with its sides in a random order and
  as the difference of the two sides' features, so it predicts *which side* is preferred (chance is
  50%, whatever the share of long answers). When either figure reaches ``SHORTCUT_AT``, DPO can
  separate the pairs on that surface cue: reward accuracy saturates near 1.0 while the policy learns
  the cue (e.g. longer answers) rather than quality.
- *near-duplicate prompts across the split*: character 5-shingles of the normalised prompt, MinHash
  (``NUM_HASHES`` = 32 hashes, banded LSH: 8 bands of 4) finds candidates, the exact Jaccard of the
  shingle sets decides; one pass over each file, memory: the held-out prompts' text and 128 bytes each.
- *hygiene*: answers equal up to case and whitespace (exact equals and empty answers are refused by
  validation, ``preftune.records``).

The preferred answers cut by ``max_length`` come from phase 1's token counts
(``tasks/inspect_stats.cut_counts``).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from preftune.files import write_json_atomic

SHORTCUT_AT = 0.75  # either figure at or above this: the pairs can be told apart without reading them
NEAR_DUP_JACCARD = 0.8
VERIFY_MARGIN = 0.25  # candidates whose estimate is within this of the threshold get the exact Jaccard
NUM_HASHES, BANDS = 32, 8  # 8 bands of 4: a pair at Jaccard 0.8 shares a band with p = 0.985
SHINGLE = 5
CLASSIFIER_PAIRS = 20_000  # a seeded reservoir sample of the training pairs feeds the classifier
FOLDS = 5

_LIST = re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+", re.M)
_HEADER = re.compile(r"^\s*#{1,6}\s", re.M)
_REFUSAL = re.compile(r"\b(?:i'?m sorry|i am sorry|i apologi[sz]e|i (?:cannot|can ?not|can't|won't|am unable|"
                      r"'m unable)|as an ai|i'?m not able|not able to (?:help|assist|provide))\b", re.I)
_URL = re.compile(r"https?://")
FEATURES = ("log chars", "log words", "log lines", "list items", "headers", "bold", "code blocks", "refusal",
            "non-ASCII share", "exclamations", "questions", "links")


def surface_features(text: str) -> list[float]:
    """One answer's surface features, in FEATURES order (counts log-scaled: a difference of logs is a ratio)."""
    n = len(text)
    non_ascii = sum(1 for ch in text if ord(ch) > 127) / n if n else 0.0
    return [math.log1p(n), math.log1p(len(text.split())), math.log1p(text.count("\n") + 1),
            math.log1p(len(_LIST.findall(text))), math.log1p(len(_HEADER.findall(text))),
            math.log1p(text.count("**") // 2), math.log1p(text.count("```") // 2),
            float(bool(_REFUSAL.search(text))), non_ascii, math.log1p(text.count("!")),
            math.log1p(text.count("?")), math.log1p(len(_URL.findall(text)))]


def _fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 25) -> np.ndarray:
    """Logistic regression without intercept (the task is antisymmetric: swapping the sides negates
    both the features and the label), L2-regularised, by Newton's method. Returns the weights."""
    w = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - y) + l2 * len(y) * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * len(y) * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def shortcut_accuracy(preferred: np.ndarray, other: np.ndarray, *, folds: int = FOLDS, seed: int = 0) -> float | None:
    """Held-out accuracy of telling the preferred side from surface features alone.

    ``preferred``/``other``: (n, F) features of each pair's two answers. Each pair's sides are
    swapped at random (seeded); the classifier sees x = f(first) − f(second) and predicts whether the
    first is the preferred one; accuracy is over ``folds`` held-out folds. None under 2·folds pairs."""
    n = len(preferred)
    if n < 2 * folds:
        return None
    rng = np.random.default_rng(seed)
    first_is_preferred = rng.random(n) < 0.5
    diff = preferred - other
    x = np.where(first_is_preferred[:, None], diff, -diff)
    scale = x.std(axis=0)
    x = x / np.where(scale > 0, scale, 1.0)
    y = first_is_preferred.astype(float)
    order = rng.permutation(n)
    correct = 0
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        w = _fit(x[train], y[train])
        correct += int(((x[test] @ w > 0) == first_is_preferred[test]).sum())
    return round(correct / n, 4)


# ---------------------------------------------------------------- near-duplicate prompts

_NON_WORD = re.compile(r"[\W_]+")
_RNG = np.random.default_rng(20261202)
_A = (_RNG.integers(1, 1 << 32, NUM_HASHES, dtype=np.uint32) | np.uint32(1))[:, None]  # odd multipliers
_B = _RNG.integers(0, 1 << 32, NUM_HASHES, dtype=np.uint32)[:, None]
_POW = np.array([257 ** (SHINGLE - 1 - j) % (1 << 32) for j in range(SHINGLE)], dtype=np.uint32)


def normalise(text: str) -> str:
    """Lower case, punctuation and runs of spaces as one space: what 'the same prompt' ignores."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def minhash(texts: list[str]) -> np.ndarray:
    """(len(texts), NUM_HASHES) uint32 MinHash signatures of the normalised texts' 5-byte shingles,
    all texts of a chunk in one vectorised pass (no per-text numpy calls)."""
    raws = [normalise(t).encode("utf-8").ljust(SHINGLE) for t in texts]  # short texts: one padded shingle
    counts = np.array([len(r) - SHINGLE + 1 for r in raws])
    raw = np.frombuffer(b"".join(raws), dtype=np.uint8).astype(np.uint32)
    windows = np.lib.stride_tricks.sliding_window_view(raw, SHINGLE)  # (sum of lengths - 4, 5)
    starts = np.concatenate([[0], np.cumsum([len(r) for r in raws])[:-1]])
    # a window starting in one text's last 4 bytes straddles two texts: keep each text's own only
    keep = np.concatenate([np.arange(s, s + c) for s, c in zip(starts, counts, strict=True)])
    with np.errstate(over="ignore"):
        shingles = (windows[keep] * _POW).sum(axis=1, dtype=np.uint32)  # wraps mod 2^32: a polynomial hash
        mixed = shingles[None, :] * _A + _B  # (H, total shingles): H universal hashes
    mixed ^= mixed >> np.uint32(15)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.minimum.reduceat(mixed, offsets, axis=1).T


def _chunks(items: Iterable[str], size: int = 1024) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def jaccard(a: str, b: str) -> float:
    """Exact Jaccard similarity of two texts' normalised 5-character shingle sets."""
    sa, sb = (_shingles(normalise(t)) for t in (a, b))
    return len(sa & sb) / len(sa | sb)


def _shingles(text: str) -> set[str]:
    return {text[i:i + SHINGLE] for i in range(max(1, len(text) - SHINGLE + 1))}


def _bands(sig: np.ndarray) -> Iterator[bytes]:
    rows = NUM_HASHES // BANDS
    for b in range(BANDS):
        yield bytes([b]) + sig[b * rows:(b + 1) * rows].tobytes()


def near_duplicates(train_prompts: Iterable[str], test_prompts: Iterable[str],
                    threshold: float = NEAR_DUP_JACCARD, examples: int = 3) -> dict:
    """Training prompts whose normalised text is within Jaccard ``threshold`` of a held-out prompt: the
    held-out prompts that share a band with it and whose MinHash estimate is near the threshold are
    compared exactly (the estimate alone errs by ~0.07; the held-out prompts' text is kept for this)."""
    index: dict[bytes, list[int]] = {}
    parts: list[np.ndarray] = []
    shown: list[str] = []
    for chunk in _chunks(test_prompts):
        sigs = minhash(chunk)
        for i, sig in enumerate(sigs, start=len(shown)):
            for band in _bands(sig):
                index.setdefault(band, []).append(i)
        parts.append(sigs)
        shown.extend(chunk)
    test_sigs = np.concatenate(parts) if parts else np.zeros((0, NUM_HASHES), dtype=np.uint32)
    found, sample, n_train = 0, [], 0
    for chunk in _chunks(train_prompts):
        n_train += len(chunk)
        for text, sig in zip(chunk, minhash(chunk), strict=True):
            candidates = list({i for band in _bands(sig) for i in index.get(band, ())})
            if not candidates:
                continue
            agree = (test_sigs[candidates] == sig).mean(axis=1)
            close = [candidates[i] for i in np.flatnonzero(agree >= threshold - VERIFY_MARGIN)]
            best = max(((jaccard(text, shown[i]), i) for i in close), default=(0.0, -1))
            if best[0] >= threshold:
                found += 1
                if len(sample) < examples:
                    sample.append({"train": text[:120], "test": shown[best[1]][:120], "jaccard": round(best[0], 2)})
    return {"train_prompts": n_train, "test_prompts": len(shown), "near_duplicates": found,
            "threshold": threshold, "examples": sample}


# ---------------------------------------------------------------- one pass over the pair files


def prompt_text(record: dict) -> str:
    """The prompt's user and assistant turns: a system prompt shared by every example would make
    all prompts look alike."""
    return "\n".join(m["content"] for m in record.get("input", record)["messages"] if m["role"] != "system")


def _records(path: str | Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _answers(record: dict) -> tuple[str, str]:
    return record["preferred_output"][-1]["content"], record["non_preferred_output"][-1]["content"]


class _PairPass:
    """Length share, answer hygiene and a reservoir sample of features over every pair seen."""

    def __init__(self, seed: int, sample: int):
        self.rng, self.cap = random.Random(seed), sample
        self.n = self.longer = self.same_normalised = 0
        self.rows: list[tuple[list[float], list[float]]] = []

    def add(self, record: dict) -> None:
        good, bad = _answers(record)
        self.n += 1
        self.longer += len(good) > len(bad)
        self.same_normalised += " ".join(good.lower().split()) == " ".join(bad.lower().split())
        if len(self.rows) < self.cap:
            self.rows.append((surface_features(good), surface_features(bad)))
        elif (slot := self.rng.randrange(self.n)) < self.cap:  # reservoir sampling: every pair equally likely
            self.rows[slot] = (surface_features(good), surface_features(bad))


def _feed(path: str | Path, pairs: _PairPass | None) -> Iterator[str]:
    for record in _records(path):
        if pairs is not None and "preferred_output" in record:
            pairs.add(record)
        yield prompt_text(record)


def diagnose(train: str | Path, test: str | Path, *, pairs: bool = True, token_shares: dict | None = None,
             cut: dict | None = None, source: str = "dataset", seed: int = 0) -> dict[str, Any]:
    """The diagnostics of a split (train and held-out files of canonical records).

    ``pairs``: False for prompts-only files (only the near-duplicate check runs). ``token_shares``:
    {model: share of pairs whose preferred answer has more tokens} (phase 1); ``cut``: {model:
    {"preferred", "non_preferred", "max_length"}} (phase 1's token counts)."""
    acc = _PairPass(seed, CLASSIFIER_PAIRS) if pairs else None
    dups = near_duplicates(_feed(train, acc), _feed(test, acc))
    out: dict[str, Any] = {"source": source, "near_duplicates": dups, "warnings": []}
    if dups["near_duplicates"]:
        out["warnings"].append(
            f"{dups['near_duplicates']} training prompt(s) are near-duplicates (Jaccard ≥ {dups['threshold']}) of "
            "held-out prompts: the held-out scores overstate what the model learned")
    if acc is None:
        return out
    good = np.array([r[0] for r in acc.rows], dtype=float).reshape(-1, len(FEATURES))
    bad = np.array([r[1] for r in acc.rows], dtype=float).reshape(-1, len(FEATURES))
    out.update(pairs=acc.n, preferred_longer={"characters": round(acc.longer / acc.n, 4) if acc.n else None,
                                              "tokens": dict(token_shares or {})},
               classifier={"accuracy": shortcut_accuracy(good, bad, seed=seed), "pairs": len(acc.rows),
                           "folds": FOLDS, "features": list(FEATURES)},
               answers={"identical_normalised": acc.same_normalised}, cut=dict(cut or {}))
    out["warnings"] = shortcut_warnings(out) + out["warnings"]
    if acc.same_normalised:
        out["warnings"].append(f"{acc.same_normalised} pair(s) have answers equal up to case and spacing")
    for model, c in out["cut"].items():
        if c.get("preferred"):
            out["warnings"].append(f"{c['preferred']} preferred answer(s) are cut by max_length {c['max_length']} "
                                   f"with {model.rstrip('/').split('/')[-1]}'s tokenizer "
                                   f"({c['non_preferred']} non-preferred)")
    return out


SHORTCUT_EFFECT = ("the pairs can be told apart without reading them: DPO's reward accuracy will saturate near "
                   "1.0 while the model learns that cue instead of quality — rebalance the pairs, use a "
                   "length-normalized loss, and judge by the length-controlled win rate")


def shortcut_warnings(diag: dict) -> list[str]:
    """One warning per figure at or above SHORTCUT_AT (a longer share at or below 1 − SHORTCUT_AT is the
    same shortcut the other way round)."""
    figures = [("characters", diag["preferred_longer"]["characters"])]
    figures += [(f"tokens of {m.rstrip('/').split('/')[-1]}", s) for m, s in diag["preferred_longer"]["tokens"].items()]
    out = []
    for unit, share in figures:
        if share is not None and max(share, 1 - share) >= SHORTCUT_AT:
            side = "longer" if share >= 0.5 else "shorter"
            out.append(f"length shortcut: the preferred answer is {side} in {max(share, 1 - share):.0%} of pairs "
                       f"({unit}); {SHORTCUT_EFFECT}")
    acc = diag["classifier"]["accuracy"]
    if acc is not None and acc >= SHORTCUT_AT:
        out.append(f"surface shortcut: a classifier on surface features alone (length, formatting, refusals, "
                   f"script) picks the preferred answer in {acc:.0%} of held-out pairs; {SHORTCUT_EFFECT}")
    return out


def diagnostics_path(root: str | Path) -> Path:
    """Where a run keeps the diagnostics of generated pairs (prompts-only data: after phase 3)."""
    return Path(root) / "diagnostics.json"


def run_diagnostics(root: str | Path, inspection: dict, data: dict, reference: dict | None = None) -> dict:
    """Write the run's ``diagnostics.json`` (what the report shows): phase 1's diagnostics of a pairs
    dataset, or for prompts-only data those of the generated pairs (phase 3's split files ``data``);
    ``reference``: the base models' own view measured at plan time, when there was one."""
    if inspection["format"] == "prompts":
        diag = diagnose(data["train"], data["test"], source="generated pairs (phase 3)")
    else:
        diag = dict(inspection.get("diagnostics") or {})
    if reference:
        diag["reference"] = reference
    write_json_atomic(diagnostics_path(root), diag)
    return diag


REFERENCE_SAMPLE, REFERENCE_BUDGET_S = 256, 60.0  # per base model, at plan time (free local CPU work)


def reference_views(spec: Any, ws: Any, jobs: list[dict]) -> dict:
    """Each base model's own view of its jobs' training pairs (tasks/training/prepare.py), for the bases
    with a job that needs reference log-probs — whose cache this pass fills when it scores them all."""
    from preftune.tasks.sweep import job_config
    from preftune.tasks.training.prepare import base_view

    views = {}
    for job in jobs:
        cfg = job_config(spec, ws, job, None)
        if cfg.needs_reference and job["base_model"] not in views:
            views[job["base_model"]] = base_view(cfg, sample=REFERENCE_SAMPLE, budget_s=REFERENCE_BUDGET_S)
    return views


def with_reference_view(plan: dict, spec: Any, ws: Any, inspection: dict, jobs: list[dict]) -> dict:
    """The plan with each base model's own view of the training pairs in its diagnostics: pairs datasets
    only (prompts-only data has no pairs before phase 3: the flow measures them then, reference_views)."""
    if inspection["format"] != "pairs" or not plan.get("diagnostics"):
        return plan
    views = reference_views(spec, ws, [{**job, "train_data": str(ws.train_data), "eval_data": str(ws.test_data)}
                                       for job in jobs])
    return {**plan, "diagnostics": {**plan["diagnostics"], "reference": views}} if views else plan
