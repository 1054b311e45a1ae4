"""What phase 5 checks around its verdicts (tasks/evaluate.py): the token limit fitted to the held-out
answers, the judge (or the Python evaluator) measured against the labels before it scores candidates,
and the answers cut at the token limit, counted per model with the verdicts they took part in."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.files import write_jsonl_atomic
from preftune.judges import stats
from preftune.judges.pairwise import preferences

if TYPE_CHECKING:
    from preftune.tasks.evaluate import EvalConfig

# Evaluation answers end where a typical preferred answer ends: the p90 of the held-out preferred
# answers' token lengths, within these bounds; without labelled answers to measure, the fallback.
EVAL_TOKENS_BOUNDS = (16, 512)
EVAL_TOKENS_FALLBACK = 64


def p90(lengths: list[int]) -> int:
    """The nearest-rank 90th percentile of a non-empty list."""
    return sorted(lengths)[math.ceil(0.9 * len(lengths)) - 1]


def fitted_token_limit(lengths: list[int]) -> int:
    """The p90 of `lengths` (tokens), within EVAL_TOKENS_BOUNDS; the fallback for no lengths."""
    if not lengths:
        return EVAL_TOKENS_FALLBACK
    return max(EVAL_TOKENS_BOUNDS[0], min(EVAL_TOKENS_BOUNDS[1], p90(lengths)))


def token_limit_for(tokenizer_dir: str, labelled: list[dict]) -> dict:
    """{"value", "why"}: the evaluation's max new tokens for one base model, fitted to the preferred
    answers of the held-out pairs (tasks/evaluate.load_test) in its own tokenizer."""
    from preftune.hf import load_tokenizer

    if not labelled or not (Path(tokenizer_dir) / "config.json").is_file():
        return {"value": EVAL_TOKENS_FALLBACK, "why": "the fallback (no labelled held-out answers to measure)"}
    tok = load_tokenizer(tokenizer_dir)
    lengths = [len(tok(p["preferred"], add_special_tokens=False)["input_ids"]) + 1 for p in labelled]  # + EOS
    value = fitted_token_limit(lengths)
    return {"value": value, "why": f"fitted: the p90 of {len(lengths)} held-out preferred answers' token lengths "
                                   f"is {p90(lengths)}, bounded to {EVAL_TOKENS_BOUNDS[0]}–{EVAL_TOKENS_BOUNDS[1]}"}


def calibration(cfg: EvalConfig, labelled: list[dict], preference_ab: list[int | None],
                preference_ba: list[int | None], warnings: list[str], scorer: str = "judge") -> dict:
    """The judge (or evaluator) against the labels (stats.judge_validity), beside the longer-answer
    baseline on the same pairs. `preference_*`: its preference for position A, the labelled-preferred
    answer first (AB) and second (BA); an evaluator scores each answer alone, so it has no BA."""
    longer = [1.0 if len(p["preferred"]) > len(p["non_preferred"]) else 0.5
              if len(p["preferred"]) == len(p["non_preferred"]) else 0.0 for p in labelled]
    validity = stats.judge_validity(preference_ab, preference_ba, longer, seed=cfg.seed,
                                    resamples=cfg.bootstrap_resamples)
    validity["labels"], validity["scorer"] = cfg.labels, scorer
    if validity["low_agreement"]:
        warnings.append(f"{scorer} agrees with the held-out {cfg.labels} labels on only "
                        f"{validity['agreement']:.0%} of judgments (< 60%): treat its verdicts with care")
    if validity["judgments_valid"] and not validity["above_length_baseline"]:
        warnings.append(f"{scorer} not above the length baseline: its agreement with the {cfg.labels} labels "
                        f"({validity['agreement']:.0%}, 95% CI from {validity['agreement_ci_low']:.0%}) is not above "
                        f"\"the longer answer wins\" ({validity['length_baseline']:.0%}) on the same pairs")
    return validity


def judge_calibration(cfg: EvalConfig, labelled: list[dict], records: list[dict], warnings: list[str]) -> dict:
    """The judge's verdicts on the labelled pairs, each judged in both orders."""
    write_jsonl_atomic(cfg.out_dir / "validity.jsonl", records)
    return calibration(cfg, labelled, *preferences(records), warnings)


def calibration_items(labelled: list[dict]) -> list[tuple[str, list[dict], str]]:
    """(key, messages, answer) for an evaluator to score: both answers of each labelled pair."""
    return [(f"label-{side}:{p['key']}", p["messages"], p[side])
            for p in labelled for side in ("preferred", "non_preferred")]


def evaluator_calibration(cfg: EvalConfig, labelled: list[dict], results: list[dict], warnings: list[str]) -> dict:
    """A Python evaluator against the same labels a judge is held to: it scores both answers of each
    labelled pair (`results`, in calibration_items' order), and agrees when the preferred one scores
    higher (a tie does not agree; an error is invalid). Order plays no part: no position consistency."""
    rows, prefs = [], []
    for p, pref, non in zip(labelled, results[0::2], results[1::2], strict=True):
        s, t = pref["score"], non["score"]
        prefs.append(None if s is None or t is None else (s > t) - (s < t))
        rows.append({"key": p["key"], "preferred_score": s, "non_preferred_score": t,
                     "error": pref["error"] or non["error"]})
    write_jsonl_atomic(cfg.out_dir / "validity.jsonl", rows)
    return calibration(cfg, labelled, prefs, [None] * len(prefs), warnings, scorer="evaluator")


def calibration_sample(labelled: list[dict], n: int, seed: int) -> list[dict]:
    """A seeded sample of `n` labelled pairs, in held-out order (all of them when there are fewer)."""
    if len(labelled) <= n:
        return labelled
    keep = set(random.Random(seed).sample(range(len(labelled)), n))
    return [p for i, p in enumerate(labelled) if i in keep]


def mark_cut(cfg: EvalConfig, models: dict[str, dict], info: dict[str, Any], warnings: list[str],
             base: str = "base") -> None:
    """Count the answers cut at the token limit, per model, and the verdicts they took part in: a cut
    answer never decides a verdict silently (the report counts and marks them)."""
    base_cut = set(info[base]["cut"])
    if base in models:  # a Python evaluator scores the base too
        models[base]["cut_answers"] = len(base_cut)
    for name, entry in models.items():
        if name == base:
            continue
        cut = set(info[name]["cut"])
        entry["cut_answers"], entry["baseline_cut_answers"] = len(cut), len(base_cut)
        entry["cut_verdicts"] = sum(1 for key in entry.get("per_prompt", {}) if key in cut | base_cut)
        if entry["cut_verdicts"]:
            warnings.append(f"{name}: {entry['cut_verdicts']} of {len(entry.get('per_prompt', {}))} verdicts compare an "
                            f"answer cut at the token limit ({cfg.max_new_tokens} new tokens; {len(cut)} of its "
                            f"answers cut, {len(base_cut)} of the base's)")
