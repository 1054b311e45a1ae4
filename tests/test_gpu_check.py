"""bench/gpu_check.py end to end at toy size on the CPU, so the GPU check cannot rot between the rare
runs on a GPU: every contestant trains, every figure is computed, the engine check holds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_end_to_end_on_the_cpu_at_toy_size(zoo, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["device"], result["tiny"], result["passed"]) == ("cpu", True, True)
    assert result["model"]["shape"]["num_hidden_layers"] == 2 and result["model"]["params"] > 100_000
    settings = result["settings"]
    for key in ("ours", "trl", "trl_precompute"):
        run = result[key]
        assert run["device"] == "cpu" and run["peak_gpu_mb"] is None
        assert run["samples_per_s"] == settings["pairs"] / run["wall_s"] > 0
        assert run["tokens_per_s"] == result["trained_tokens"] / run["wall_s"]
        assert 0 < run["mfu"] < 1 and 0.5 < run["train_loss"] < 0.9  # ln 2 = 0.693 at the start of DPO
    assert result["trl_precompute"]["reference_s"] > 0 and result["trl"]["reference_s"] is None
    # the trained tokens: 8 pairs, both rows capped at max_length 64
    assert 8 * 2 * 16 < result["trained_tokens"] <= 8 * 2 * 64
    faster = result[result["trl_faster"]]
    assert result["speedup"] == result["ours"]["samples_per_s"] / faster["samples_per_s"]
    assert result["memory_ratio"] is None  # no GPU memory on the CPU
    assert result["bf16_matmul_peak_flops_per_s"] > 1e6
    lp = result["logprobs_bf16_vs_fp32"]
    assert lp["sequences"] == 16 and 0 < lp["max_abs_diff"] < 0.01 * lp["mean_abs_logp"]
    engine = result["engine"]
    assert engine["dtype"] == "float32" and engine["steps_compared"] == engine["prompts"] * engine["max_tokens"]
    assert engine["max_abs_logit_diff"] <= engine["tolerance"] == 1e-3
    rows = {t["target"]: t["result"] for t in result["targets"]}
    assert list(rows.values()) == ["SKIP", "SKIP", "SKIP", "PASS"]  # the full-size targets need the GPU run
