"""Cost model: estimate before anything is spent, compare with what was actually spent.

Every figure is a (low, high) range in USD. Training is priced per 1M trained tokens from the
price table (by model size and method) when jobs run on remote GPUs (a work pool); local jobs
are priced per device-hour (CPU: 0 by default) and the per-token "hosted equivalent" is shown
beside it. Inference is priced per 1M input/output tokens per endpoint (``Endpoint.cost``); local
folders are free and unpriced remote endpoints are reported as unknown.

Trained tokens of one DPO example = prompt+preferred and prompt+non-preferred, each capped at
max_length, times epochs: what the trainer reports as `train_tokens`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from preftune.errors import UserError
from preftune.paths import DATA_DIR

if TYPE_CHECKING:
    from preftune.endpoint import Endpoint


@dataclass(frozen=True)
class Range:
    low: float
    high: float

    def __add__(self, other: Range) -> Range:
        return Range(self.low + other.low, self.high + other.high)

    def scale(self, lo: float, hi: float | None = None) -> Range:
        return Range(self.low * lo, self.high * (lo if hi is None else hi))


ZERO = Range(0.0, 0.0)


def load_prices(path: str | Path | None = None) -> dict:
    return json.loads(Path(path or DATA_DIR / "prices.json").read_text())


@lru_cache(maxsize=64)
def model_params(model: str) -> int:
    """Parameter count from the model's config alone: build it on the meta device, load no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from preftune.hf import check_config_sizes

    check_config_sizes(model)
    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True)
    except OSError as err:
        raise UserError(f"cannot read the model config of {model!r}: not a local folder or cached id") from err
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in net.parameters())


def training_usd_per_1m(params: int, full: bool, prices: dict) -> float:
    tiers = prices["training_usd_per_1m_tokens"]["full" if full else "lora"]
    size_b = params / 1e9
    for tier in tiers:
        if size_b <= tier["max_params_b"]:
            return float(tier["usd"])
    method = "full-parameter" if full else "LoRA"
    raise UserError(f"{method} training of a {size_b:.1f}B-parameter model is not in the price table")


def pair_tokens(prompt: float, chosen: float, rejected: float, max_length: int) -> float:
    """Trained tokens of one example: both sequences, each capped at max_length."""
    return min(prompt + chosen, max_length) + min(prompt + rejected, max_length)


def train_flops(params: int, tokens: float, full: bool) -> float:
    """~6N FLOPs per trained token (forward + backward); LoRA skips weight gradients (~4N);
    the reference forward pass adds 2N, once per token."""
    return (6.0 if full else 4.0) * params * tokens + 2.0 * params * tokens


def usd(tokens_in: Range, tokens_out: Range, endpoint: Endpoint) -> Range | None:
    """USD for these token ranges by ``Endpoint.cost`` (the one per-token price rule); None when
    the endpoint is unpriced."""
    low, high = endpoint.cost(tokens_in.low, tokens_out.low), endpoint.cost(tokens_in.high, tokens_out.high)
    return None if low is None or high is None else Range(low, high)


@dataclass
class PhaseEstimate:
    usd: Range
    detail: dict

    def to_json(self) -> dict:
        return {"low": round(self.usd.low, 6), "high": round(self.usd.high, 6), **self.detail}


TRAIN_SPREAD = (0.8, 2.0)  # a measured per-token time, as a range: load, lengths, optimizer steps
JOB_START_S = (3.0, 12.0)  # a job's process start and imports, beyond loading the model


def measured_job_seconds(tokens: Range, epoch_tokens: Range, m: dict, full: bool) -> Range:
    """Wall seconds of one job from the plan-time calibration ``m`` (``tasks/throughput.py``).

    Full fine-tuning costs the measured forward + backward per trained token; LoRA skips the
    weights' gradients, so its backward costs about one forward instead of two. The reference
    pass is one no-grad forward over an epoch's tokens (a shared-cache hit skips it: the low end)."""
    fwd, full_fb = m["forward_s_per_token"], m["train_full_s_per_token"]
    per_token = full_fb if full else fwd + (full_fb - fwd) / 2
    lo, hi = TRAIN_SPREAD
    return Range(tokens.low * per_token * lo + m["load_s"] + JOB_START_S[0],
                 (tokens.high * per_token + epoch_tokens.high * fwd) * hi + m["load_s"] + JOB_START_S[1])


def estimate_training(jobs: list[dict], example_tokens: dict[str, Range], n_examples: int, *, epochs: int,
                      full: bool, remote: bool, device: str, min_jobs: int, prices: dict,
                      measured: dict[str, dict] | None = None) -> PhaseEstimate:
    """jobs: [{"base_model"}, ...]; example_tokens: per base model, trained tokens of one example;
    measured: per base model, the plan-time training calibration (else seconds come from FLOPs).

    The low end assumes early stop after `min_jobs` jobs; the high end runs the whole grid."""
    per_job = []
    measured = measured or {}
    for job in jobs:
        epoch_tok = example_tokens[job["base_model"]].scale(n_examples)
        tok = epoch_tok.scale(epochs)
        params = model_params(job["base_model"])
        token_usd = tok.scale(training_usd_per_1m(params, full, prices) / 1e6)
        if not remote and job["base_model"] in measured:
            secs = measured_job_seconds(tok, epoch_tok, measured[job["base_model"]], full)
        else:
            flops = Range(train_flops(params, tok.low, full), train_flops(params, tok.high, full))
            rate = prices["effective_train_flops_per_s"][device]
            over = prices["job_overhead_s"]
            secs = Range(flops.low / rate[1] + over[0], flops.high / rate[0] + over[1])
        hourly = prices["local_usd_per_hour"][device]
        local_usd = Range(secs.low * hourly / 3600, secs.high * hourly / 3600)
        per_job.append({"tokens": tok, "seconds": secs, "usd": token_usd if remote else local_usd,
                        "hosted_usd": token_usd})
    cheapest = sorted(per_job, key=lambda j: j["usd"].low)[:min_jobs]

    def total(key: str) -> Range:
        return Range(sum(j[key].low for j in cheapest), sum(j[key].high for j in per_job))

    timed = all(j["base_model"] in measured for j in jobs) and not remote
    return PhaseEstimate(total("usd"), {
        "tokens_low": round(total("tokens").low), "tokens_high": round(total("tokens").high),
        "hosted_equivalent_low": round(total("hosted_usd").low, 6),
        "hosted_equivalent_high": round(total("hosted_usd").high, 6),
        "job_seconds_low": round(min(j["seconds"].low for j in per_job), 1),
        "job_seconds_high": round(max(j["seconds"].high for j in per_job), 1),
        "job_seconds_from": "measured" if timed else "flops",
        "priced": "per 1M trained tokens" if remote else f"per {device}-hour",
    })


def estimate_inference(calls: int, in_tokens_per_call: Range, out_tokens_per_call: Range,
                       endpoint: Endpoint | None) -> PhaseEstimate:
    """An unpriced endpoint adds nothing to the range and is listed under ``unpriced``: its cost is
    unknown, and the plan says so instead of showing it as $0. None: no endpoint named, nothing to price."""
    tin, tout = in_tokens_per_call.scale(calls), out_tokens_per_call.scale(calls)
    priced = usd(tin, tout, endpoint) if endpoint is not None else ZERO
    detail: dict = {"calls": calls, "input_tokens_low": round(tin.low), "input_tokens_high": round(tin.high),
                    "output_tokens_low": round(tout.low), "output_tokens_high": round(tout.high)}
    if priced is None:
        detail["unpriced"] = [str(endpoint)]
    return PhaseEstimate(ZERO if priced is None else priced, detail)


def total(phases: dict[str, PhaseEstimate]) -> Range:
    out = ZERO
    for phase in phases.values():
        out = out + phase.usd
    return out


def range_json(r: Range) -> dict:
    return {k: round(v, 6) for k, v in asdict(r).items()}
