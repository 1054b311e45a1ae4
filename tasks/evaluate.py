"""Phase 5 — evaluate: completions on the held-out prompts for the base model and every candidate,
scored by a Python evaluator or a pairwise LLM judge, with win rates, CIs and judge validity.

Evaluator choice, in priority order: an evaluator id (``package.module:function``) → the user's
rubric text → an auto rubric the judge writes from a sample of training pairs (``eval/rubric.md``).
Without an evaluator id a judge endpoint is required.

Writes under ``out_dir`` (the workspace's ``eval/``):
    completions/<model-key>.jsonl   cached completions (judges/completions.py)
    judgments/<candidate>.jsonl     per comparison: both raw verdicts, outcome, lengths, replies
    validity.jsonl                  the judge on the labelled test pairs
    evaluator_scores.jsonl          per item score / reason / error (evaluator mode)
    rubric.md                       the rubric the judge used
    ledger.jsonl                    every paid request (unless ``ledger`` points elsewhere, e.g. the workspace's)
    scores.json                     what ``run_evaluation`` returns

``scores.json``: ``mode`` ("evaluator" | "rubric" | "auto"), ``models`` (judge mode: each
candidate vs base with n, wins, ties, losses, invalid, win_rate, ci_low, ci_high, lc_win_rate,
mean_length, baseline_mean_length, position counts; evaluator mode: every model including
``base`` with n, mean_score, ci_low, ci_high, errors, mean_length and, for candidates, win rate vs
base per prompt), ``clear_winner``, ``judge_agreement``, ``position_consistency``,
``judge_validity``, ``warnings``, ``judge_usage``, ``rubric``, and ``models_info`` (per model: model,
adapter, completions file, how many completions this run generated). Non-finite numbers are null.

Completions use ``preftune.hf.load_causal_lm`` + ``generate_with`` (loaded once per model, fed
in cached chunks) rather than ``generate_completions``, which would reload the model per chunk.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from preftune.client import ChatClient
from preftune.endpoint import Endpoint
from preftune.errors import UserError
from preftune.files import tree_fingerprint, write_json_atomic, write_jsonl_atomic
from preftune.hf import model_fingerprint
from preftune.judges import selection, stats
from preftune.judges.completions import CHUNK, Conversation, cached_completions, model_key, read_cut
from preftune.judges.evaluators import EvalItem, run_evaluator
from preftune.judges.pairwise import PairItem, judge_items, position_summary
from preftune.judges.rubric import auto_rubric
from preftune.ledger import LEDGER_FILE, Ledger
from preftune.records import iter_records, load_pairs, prompt_hash, prompt_of
from preftune.spec import evaluator_kind
from preftune.tasks.evaluate_checks import (
    calibration_items,
    calibration_sample,
    evaluator_calibration,
    judge_calibration,
    mark_cut,
)

BASE = "base"
class EvalConfig(BaseModel):
    """Everything phase 5 needs; validated once, when built."""

    model_config = ConfigDict(extra="forbid")

    test_data: Path = Field(description="Held-out JSONL: pairs (labels enable judge validity) or prompts only.")
    base_model: str = Field(description="Local model folder, or MODEL@BASE_URL for an endpoint.")
    candidates: dict[str, str] = Field(default_factory=dict, description="Name → LoRA adapter folder "
                                       "(on the base model), full model folder, or MODEL@BASE_URL.")
    out_dir: Path = Field(description="Where eval files go (the workspace's eval/).")
    evaluator: str | None = Field(None, description="Python evaluator id; wins over any rubric.")
    rubric: str | None = Field(None, description="Rubric text for the pairwise judge.")
    auto_rubric: bool = Field(False, description="Have the judge write the rubric from training pairs.")
    train_data: Path | None = Field(None, description="Training pairs to ground the auto rubric in.")
    judge: Endpoint | None = Field(None, description="The pairwise judge endpoint.")
    served: dict[str, Endpoint] = Field(default_factory=dict, description="Model name → a server that answers "
                                        "for it (phase 5 on vLLM: one server, each candidate a LoRA module); "
                                        "the others generate in process.")
    max_prompts: int = Field(200, ge=1, le=100_000, description="Held-out prompts used (first N).")
    max_new_tokens: int = Field(64, ge=1, le=32_768, description="Max new tokens per completion.")
    batch_size: int = Field(16, ge=1, le=1024, description="Generation batch size for local models.")
    judge_concurrency: int = Field(16, ge=1, le=512, description="Judge requests in flight.")
    judge_max_tokens: int = Field(512, ge=16, le=8192, description="Max tokens of one judge reply.")
    judge_timeout_s: float = Field(120.0, gt=0, le=3600, description="Deadline of one judge request.")
    judge_cache_dir: Path | None = Field(None, description="Judge reply cache (default out_dir/judge_cache).")
    ledger: Path | None = Field(None, description="Cost ledger every paid request is appended to "
                                "(default out_dir/ledger.jsonl).")
    validity_pairs: int = Field(64, ge=0, le=100_000, description="Labelled test pairs the judge (both orders) or "
                                "the evaluator (both answers) is checked on first (a seeded sample).")
    labels: Literal["human", "strong-vs-weak"] = Field(
        "human", description="What the test pairs' labels are: a dataset's (human) or generated by a strong "
        "and a weak model (strong-vs-weak).")
    rubric_sample: int = Field(8, ge=1, le=64, description="Training pairs shown to the rubric writer.")
    evaluator_timeout_s: float = Field(30.0, gt=0, le=3600, description="Per-item evaluator time limit.")
    evaluator_workers: int = Field(2, ge=1, le=64, description="Evaluator worker processes.")
    bootstrap_resamples: int = Field(2000, ge=1000, le=100_000, description="Bootstrap resamples per CI.")
    seed: int = Field(0, description="Seed of the bootstrap and of the rubric sample.")


def evaluation_mode(cfg: EvalConfig) -> str:
    """'evaluator' | 'rubric' | 'auto'; a UserError when nothing can score the completions."""
    kind = evaluator_kind(cfg.evaluator, cfg.judge, cfg.rubric)
    if kind is None:
        raise UserError("nothing to score the completions with: give an evaluator id "
                        "(--evaluator package.module:function, e.g. judges.builtin:answer_quality), "
                        "or a judge endpoint (--judge MODEL@BASE_URL) with --rubric TEXT or --auto-rubric")
    return kind


def load_test(path: Path, limit: int) -> tuple[list[tuple[str, list[dict]]], list[dict]]:
    """(unique prompts as (hash, messages), first N of them; labelled pairs among them)."""
    prompts: dict[str, list[dict]] = {}
    labelled: list[dict] = []
    for _, rec in iter_records(path):
        messages, tools = prompt_of(rec)
        h = prompt_hash(messages, tools)
        if h in prompts or len(prompts) >= limit:
            continue
        prompts[h] = Conversation(messages, tools)  # the dataset's tools, as training renders them
        if "preferred_output" in rec:
            labelled.append({"key": h, "messages": messages,
                             "preferred": rec["preferred_output"][-1]["content"],
                             "non_preferred": rec["non_preferred_output"][-1]["content"]})
    return list(prompts.items()), labelled


def _is_endpoint(spec: str) -> bool:
    return not Endpoint.parse(spec).is_local  # the one endpoint parser: MODEL@BASE_URL, else a folder


def _generator(cfg: EvalConfig, model: str, adapter: str | None, warnings: list[str], name: str):
    """A callable prompts → completions for one model (local in-process, or an endpoint)."""
    if _is_endpoint(model):
        client = ChatClient(Endpoint.parse(model), concurrency=cfg.judge_concurrency,
                            cache_dir=_cache_dir(cfg), ledger=_ledger(cfg, "completions"))

        def via_endpoint(batch: list[list[dict]]) -> list[str | None]:
            async def go() -> list:
                try:
                    return await client.chat_many(batch, max_tokens=cfg.max_new_tokens, temperature=0.0)
                finally:
                    await client.aclose()
            outs = asyncio.run(go())
            failed = sum(1 for o in outs if not hasattr(o, "text"))
            if failed:
                warnings.append(f"{name}: {failed} completions failed at the endpoint (empty this run)")
            return [(o.text, o.finish_reason == "length") if hasattr(o, "text") else None for o in outs]
        return via_endpoint

    if name in cfg.served:  # a server preftune started answers for this model (tasks/generate.py)
        from preftune.tasks.generate import answer_with_backend

        return lambda batch: answer_with_backend(cfg.served[name], batch, max_new_tokens=cfg.max_new_tokens)
    loaded: list = []  # (model, tokenizer), loaded on the first chunk and kept for the rest

    def local(batch: list[list[dict]]) -> list[tuple[str, bool]]:
        from preftune.tasks.generate import generate_with, load_causal_lm, small_model_threads

        if not loaded:
            loaded.extend(load_causal_lm(model, adapter))
        cut: list[bool] = []
        with small_model_threads(loaded[0]):
            texts = generate_with(*loaded, batch, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                  cut=cut)
        return list(zip(texts, cut, strict=True))
    return local


def _models(cfg: EvalConfig) -> list[tuple[str, str, str | None]]:
    """(name, model, adapter) for the base and each candidate."""
    if not _is_endpoint(cfg.base_model) and not (Path(cfg.base_model) / "config.json").is_file():
        raise UserError("base model: not a model folder (no config.json) and not MODEL@BASE_URL",
                        path=cfg.base_model)
    out: list[tuple[str, str, str | None]] = [(BASE, cfg.base_model, None)]
    for name, target in cfg.candidates.items():
        if name == BASE:
            raise UserError(f"candidate name '{BASE}' is reserved for the base model")
        if _is_endpoint(target):
            out.append((name, target, None))
            continue
        if not (Path(target) / "adapter_config.json").is_file():
            if (Path(target) / "config.json").is_file():  # a full fine-tune (`preftune train --full`)
                out.append((name, target, None))
                continue
            raise UserError(f"candidate '{name}': not a LoRA adapter folder (no adapter_config.json) "
                            "nor a model folder (no config.json)", path=target)
        if _is_endpoint(cfg.base_model):
            raise UserError(f"candidate '{name}': an adapter needs a local base model, not an endpoint")
        out.append((name, cfg.base_model, target))
    return out


class Ticks:
    """Evaluation progress in items (each completion generated or found cached, each one scored),
    reported to a plain `report(done, total)` callback."""

    def __init__(self, report: Callable[[int, int], None] | None = None, total: int = 0):
        self.report, self.done, self.total = report, 0, total

    def add(self, n: int = 1) -> None:
        if n <= 0:
            return
        self.done += n
        if self.report is not None:
            self.report(self.done, max(self.total, self.done))


def _counted(generate: Callable[[list[list[dict]]], list[str | None]], ticks: Ticks):
    def run(batch: list[list[dict]]) -> list[str | None]:
        outs = generate(batch)
        ticks.add(len(batch))
        return outs
    return run


def generate_all(cfg: EvalConfig, prompts: list[tuple[str, list[dict]]], warnings: list[str],
                 ticks: Ticks | None = None) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Completions per model (cached), and where each model's cache file is."""
    ticks = ticks or Ticks()
    completions: dict[str, list[str]] = {}
    info: dict[str, Any] = {}
    for name, model, adapter in _models(cfg):
        identity = {"model": model if _is_endpoint(model) else model_fingerprint(model),
                    "adapter": tree_fingerprint(adapter) if adapter else None,
                    "max_new_tokens": cfg.max_new_tokens, "temperature": 0.0}
        path = cfg.out_dir / "completions" / f"{model_key(name, identity)}.jsonl"
        # A local model reports progress per generation batch; an endpoint per chunk of requests.
        chunk = CHUNK if _is_endpoint(model) or name in cfg.served else cfg.batch_size
        texts, generated = cached_completions(path, prompts, _counted(_generator(cfg, model, adapter, warnings, name),
                                                                      ticks), chunk=chunk)
        ticks.add(len(prompts) - generated)  # found in the cache
        completions[name] = texts
        cut = read_cut(path)
        info[name] = {"model": model, "adapter": adapter, "completions": str(path), "generated": generated,
                      "cut": sorted(h for h, _ in prompts if h in cut)}
        empty = sum(1 for t in texts if not t.strip())
        if empty:
            warnings.append(f"{name}: {empty} of {len(texts)} completions are empty")
    return completions, info


def _cache_dir(cfg: EvalConfig) -> Path:
    return cfg.judge_cache_dir or cfg.out_dir / "judge_cache"


def _ledger(cfg: EvalConfig, phase: str) -> Ledger:
    return Ledger(cfg.ledger or cfg.out_dir / LEDGER_FILE, phase)


def _mean_length(texts: list[str]) -> float:
    return sum(len(t) for t in texts) / len(texts) if texts else float("nan")


def score_with_evaluator(cfg: EvalConfig, prompts: list[tuple[str, list[dict]]], labelled: list[dict],
                         completions: dict[str, list[str]], warnings: list[str], ticks: Ticks | None = None) -> dict:
    """Every model's answers scored by the Python evaluator, and the evaluator itself measured on the
    labelled held-out pairs (both answers of each), as a judge is."""
    assert cfg.evaluator is not None
    items = [EvalItem(f"{name}:{h}", m, texts[i])
             for name, texts in completions.items() for i, (h, m) in enumerate(prompts)]
    labelled = calibration_sample(labelled, cfg.validity_pairs, cfg.seed)
    cal_items = [EvalItem(*item) for item in calibration_items(labelled)]
    results = run_evaluator(cfg.evaluator, cal_items + items, timeout=cfg.evaluator_timeout_s,
                            workers=cfg.evaluator_workers)
    cal_results, results = results[:len(cal_items)], results[len(cal_items):]
    write_jsonl_atomic(cfg.out_dir / "evaluator_scores.jsonl", results)
    (ticks or Ticks()).add(len(cal_items) + len(items))
    validity = evaluator_calibration(cfg, labelled, cal_results, warnings) if labelled else None
    n = len(prompts)
    per_model = {name: [r["score"] for r in results[k * n:(k + 1) * n]] for k, name in enumerate(completions)}
    models: dict[str, dict] = {}
    for name, scores in per_model.items():
        entry = stats.mean_score(scores, seed=cfg.seed, resamples=cfg.bootstrap_resamples)
        entry["mean_length"] = _mean_length(completions[name])
        if name != BASE:
            entry["vs_base"] = stats.win_rate(_paired_outcomes(scores, per_model[BASE]), seed=cfg.seed,
                                              resamples=cfg.bootstrap_resamples)
            entry["per_prompt"] = {h: [s, b] for (h, _), s, b in zip(prompts, scores, per_model[BASE], strict=True)
                                   if s is not None and b is not None}
        models[name] = entry
        if entry["errors"]:
            first = next(r["error"] for r in results[list(per_model).index(name) * n:] if r["error"])
            warnings.append(f"{name}: evaluator failed on {entry['errors']} of {n} items (e.g. {first})")
    return {"models": models, **_selected(cfg, {k: v for k, v in models.items() if k != BASE}),
            "judge_validity": validity, "judge_agreement": validity["agreement"] if validity else None}


def _selected(cfg: EvalConfig, candidates: dict[str, dict]) -> dict:
    """The one selection rule (judges/selection.py) on these candidates: {"selection", "clear_winner"}."""
    chosen = selection.select(candidates, seed=cfg.seed, resamples=cfg.bootstrap_resamples)
    return {"selection": chosen, "clear_winner": chosen["winner"]}


def _paired_outcomes(scores: list[float | None], base: list[float | None]) -> list[str]:
    """Per-prompt comparison of evaluator scores: higher wins, equal ties, an error is invalid."""
    out = []
    for s, b in zip(scores, base, strict=True):
        out.append("invalid" if s is None or b is None else "win" if s > b else "loss" if s < b else "tie")
    return out


async def _rubric(cfg: EvalConfig, client: ChatClient, mode: str, warnings: list[str]) -> tuple[str, str]:
    """(rubric text, source) and eval/rubric.md written."""
    if mode == "rubric":
        text, source = (cfg.rubric or "").strip(), "user"
    else:
        pairs = load_pairs(cfg.train_data) if cfg.train_data else []
        ledger = client.ledger
        client.ledger = ledger.with_phase("rubric") if ledger is not None else None
        try:  # the rubric is one request, finished before any verdict is asked for
            text, why = await auto_rubric(client, pairs, sample=cfg.rubric_sample, seed=cfg.seed)
        finally:
            client.ledger = ledger
        source = "auto" if why is None else "default"
        if why:
            warnings.append(why)
    (cfg.out_dir / "rubric.md").write_text(f"# Judge rubric ({source})\n\n{text}\n", encoding="utf-8")
    return text, source


def _candidate_stats(cfg: EvalConfig, records: list[dict], texts: list[str], base: list[str]) -> dict:
    outcomes = [r["outcome"] for r in records]
    entry = stats.win_rate(outcomes, seed=cfg.seed, resamples=cfg.bootstrap_resamples)
    entry["lc_win_rate"] = stats.lc_win_rate(outcomes, [r["candidate_length"] for r in records],
                                             [r["baseline_length"] for r in records])
    entry["mean_length"] = _mean_length(texts)
    entry["baseline_mean_length"] = _mean_length(base)
    entry.update(position_summary(records))
    entry["per_prompt"] = {r["key"]: [stats.OUTCOME_SCORE[r["outcome"]], 0.5] for r in records
                           if r["outcome"] in stats.OUTCOME_SCORE}  # the base against itself: ½
    return entry


async def judge_all(cfg: EvalConfig, client: ChatClient, mode: str, prompts: list[tuple[str, list[dict]]],
                    labelled: list[dict], completions: dict[str, list[str]], warnings: list[str],
                    ticks: Ticks | None = None, cut: dict[str, set[str]] | None = None) -> dict:
    """Rubric, then every candidate-vs-base comparison and the validity pairs, concurrently. `cut`: per
    model, the prompts whose answer stopped at the token limit — the judge is told so."""
    cut = cut or {}
    try:
        rubric, source = await _rubric(cfg, client, mode, warnings)
        names = [n for n in completions if n != BASE]
        jobs = [[PairItem(h, m, completions[n][i], completions[BASE][i], h in cut.get(n, ()), h in cut.get(BASE, ()))
                 for i, (h, m) in enumerate(prompts)] for n in names]
        tick = (ticks or Ticks()).add
        # The judge is measured against the labels first, before it judges any candidate.
        labelled_judged = await judge_items(client, rubric, [PairItem(p["key"], p["messages"], p["preferred"],
                                                                  p["non_preferred"]) for p in labelled],
                                        max_tokens=cfg.judge_max_tokens, on_done=tick)
        judged = await asyncio.gather(*(judge_items(client, rubric, items, max_tokens=cfg.judge_max_tokens,
                                                    on_done=tick) for items in jobs))
        judged.append(labelled_judged)
    finally:
        await client.aclose()
    models: dict[str, dict] = {}
    for name, records in zip(names, judged, strict=False):
        write_jsonl_atomic(cfg.out_dir / "judgments" / f"{name}.jsonl", records)
        models[name] = _candidate_stats(cfg, records, completions[name], completions[BASE])
        if models[name]["invalid"]:
            warnings.append(f"{name}: {models[name]['invalid']} of {len(records)} comparisons invalid "
                            "(unparseable judge reply or failed request)")
    validity = judge_calibration(cfg, labelled, judged[-1], warnings) if labelled else None
    if not labelled:
        warnings.append("judge validity not measured: the test data has no preference labels")
    pooled = position_summary([r for records in judged for r in records])  # every judgment of this base
    return {"models": models, **_selected(cfg, models),
            "judge_agreement": validity["agreement"] if validity else None,
            "position_consistency": pooled["position_consistency"], "position_pairs": pooled["position_pairs"],
            "judge_validity": validity, "rubric": {"source": source, "text": rubric,
                                                   "path": str(cfg.out_dir / "rubric.md")}}


def score_with_judge(cfg: EvalConfig, mode: str, prompts: list[tuple[str, list[dict]]],
                     labelled: list[dict], completions: dict[str, list[str]], warnings: list[str],
                     ticks: Ticks | None = None, cut: dict[str, set[str]] | None = None) -> dict:
    assert cfg.judge is not None
    # A judge preftune serves itself gets what its server batches (Endpoint.concurrency).
    client = ChatClient(cfg.judge, concurrency=cfg.judge.concurrency or cfg.judge_concurrency,
                        timeout=cfg.judge_timeout_s,
                        cache_dir=_cache_dir(cfg), ledger=_ledger(cfg, "evaluation"))
    result = asyncio.run(judge_all(cfg, client, mode, prompts, calibration_sample(labelled, cfg.validity_pairs, cfg.seed),
                                   completions, warnings, ticks, cut))
    result["judge"] = str(cfg.judge)
    result["judge_usage"] = client.usage_report()
    return result


def run_evaluation(cfg: EvalConfig, on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Phase 5 end to end (module docstring); returns the contents of ``scores.json``.
    `on_progress(done, total)`: items done so far (completions, then scores), as they happen."""
    mode = evaluation_mode(cfg)
    if mode == "evaluator":
        run_evaluator(cfg.evaluator or "", [])  # a bad id fails now, before any generation
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []
    prompts, labelled = load_test(cfg.test_data, cfg.max_prompts)
    n_models = 1 + len(cfg.candidates)
    scored_items = (n_models * len(prompts) + 2 * min(len(labelled), cfg.validity_pairs) if mode == "evaluator"
                    else (n_models - 1) * len(prompts) + min(len(labelled), cfg.validity_pairs))
    ticks = Ticks(on_progress, n_models * len(prompts) + scored_items)
    completions, info = generate_all(cfg, prompts, warnings, ticks)
    if mode == "evaluator":
        scored = score_with_evaluator(cfg, prompts, labelled, completions, warnings, ticks)
        scored.update(judge=None, judge_usage=None, position_consistency=None, rubric=None)
    else:
        scored = score_with_judge(cfg, mode, prompts, labelled, completions, warnings, ticks,
                                  {name: set(i["cut"]) for name, i in info.items()})
    mark_cut(cfg, scored["models"], info, warnings, BASE)
    scores = {"mode": mode, "evaluator": cfg.evaluator, "n_prompts": len(prompts), "max_new_tokens": cfg.max_new_tokens,
              "test_data": str(cfg.test_data), "models_info": info, "seed": cfg.seed,
              "bootstrap_resamples": cfg.bootstrap_resamples, **scored, "warnings": warnings}
    scores = finite(scores)
    write_json_atomic(cfg.out_dir / "scores.json", scores)
    return scores


def finite(obj: Any) -> Any:
    """NaN/inf → None, so scores.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj
