"""The base model's own view of the training pairs, at plan time: reference log-prob margins.

The margin of a pair is the base model's summed log-prob of the preferred answer minus that of the
non-preferred one — exactly the reference log-probs a sweep job computes first (same tokenization,
truncation, model loading and precision as ``job.run_training``). A seeded sample of at most
``sample`` training pairs is scored, batch by batch, until ``budget_s`` seconds have passed (on a
CPU a big model scores few pairs in that time: the sample shrinks and says so). When every training
pair was scored, the result is stored as the sweep's reference cache under the job's own key, so
the sweep reuses it instead of computing it again.
"""

from __future__ import annotations

import time

import torch

from preftune.hf import load_tokenizer
from preftune.job import TrainConfig
from preftune.tasks.training.data import load_pair_records, tokenize_pairs
from preftune.tasks.training.logps import SequenceLogps
from preftune.tasks.training.loop import dataset_logps
from preftune.tasks.training.modeling import load_policy, pad_id, reference_mode
from preftune.tasks.training.refcache import load_or_compute, lookup, reference_key

CHUNK = 2  # pairs scored between two looks at the clock (a CPU job also runs a pair at a time)


def margin_summary(margins: torch.Tensor, bins: int = 8, bar: int = 20) -> dict:
    """Share already preferred (margin > 0), quantiles (linear interpolation) and a small histogram."""
    margins = margins.double()
    q = torch.quantile(margins, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64))
    lo, hi = float(margins.min()), float(margins.max())
    if lo == hi:  # one value: a unit-wide range around it, as numpy.histogram does
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.histc(margins, bins=bins, min=lo, max=hi).long().tolist()
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64).tolist()
    top = max(max(counts), 1)
    return {"pairs": len(margins), "preferred_share": round(float((margins > 0).double().mean()), 4),
            "quantiles": {k: round(float(v), 3) for k, v in zip(("p10", "p25", "p50", "p75", "p90"), q, strict=True)},
            "histogram": [{"low": round(a, 2), "high": round(b, 2), "count": c, "bar": round(bar * c / top)}
                          for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True)]}


def base_view(cfg: TrainConfig, *, sample: int = 256, budget_s: float = 60.0, seed: int = 0) -> dict:
    """The base model's margins on a sample of ``cfg.data`` (see the module docstring); on a CPU only,
    in float32, as a CPU job computes them. Returns margin_summary plus what was scored and how long."""
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    pairs = tokenize_pairs(load_pair_records(cfg.data), tokenizer, cfg.max_length, cfg.max_prompt_length)
    module = SequenceLogps(load_policy(cfg)).eval()

    def score(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return dataset_logps(module, [pairs[i] for i in idx], CHUNK, pad_id(tokenizer), "cpu")

    # Every pair on a CPU: the job's own reference cache, maybe filled before (a re-run), or filled now.
    whole = _key(cfg, tokenizer) if len(pairs) <= sample and not torch.cuda.is_available() else None
    if whole is not None:
        with reference_mode(module.lm):
            stored = lookup(whole[0], whole[1], len(pairs), score)
        if stored is not None:
            out = margin_summary(stored["chosen"] - stored["rejected"])
            return out | {"seconds": round(time.perf_counter() - t0, 1), "scoring_seconds": 0.0,
                          "note": f"all {len(pairs)} training pairs, read from the reference cache", "cached": "hit"}
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:sample].tolist()
    chosen, rejected, done = [], [], []
    t_score = time.perf_counter()  # the budget is for scoring: loading is paid once whatever the sample
    with reference_mode(module.lm):
        for k in range(0, len(order), CHUNK):
            idx = order[k:k + CHUNK]
            c, r = score(idx)
            chosen.append(c)
            rejected.append(r)
            done += idx
            if time.perf_counter() - t_score > budget_s:
                break
    c, r = torch.cat(chosen), torch.cat(rejected)
    out = margin_summary(c - r)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["scoring_seconds"] = round(time.perf_counter() - t_score, 1)
    out["note"] = (f"all {len(pairs)} training pairs" if len(done) == len(pairs)
                   else f"a sample of {len(done)} of {len(pairs)} training pairs"
                        + (f", cut to fit {budget_s:g} s" if len(done) < min(sample, len(pairs)) else ""))
    if whole is not None and len(done) == len(pairs):
        out["cached"] = _store(whole, done, c, r)
    return out


def _key(cfg: TrainConfig, tokenizer) -> tuple:
    """(cache folder, key, fields) of a CPU job's reference cache (fp32), as the job computes it."""
    cache = cfg.resolved_ref_cache()
    return (cache, *reference_key(cache, cfg.model, tokenizer.chat_template, cfg.data, cfg.max_length,
                                  cfg.max_prompt_length, "fp32"))


def _store(whole: tuple, done: list[int], chosen: torch.Tensor, rejected: torch.Tensor) -> str:
    """Store every pair's log-probs (in data order) as the job's reference cache (`whole`: _key's
    cache folder, key and fields); "miss" when written."""
    full_c, full_r = torch.empty(len(done)), torch.empty(len(done))
    full_c[done], full_r[done] = chosen, rejected
    cache, key, fields = whole

    def compute(idx: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        return (full_c, full_r) if idx is None else (full_c[idx], full_r[idx])

    return load_or_compute(cache, key, fields, len(done), compute, "fp32")[1]
