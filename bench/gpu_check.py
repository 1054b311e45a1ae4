"""The GPU check: bf16 LoRA DPO, ours against TRL's DPOTrainer, on one CUDA GPU, in one command.

    python bench/gpu_check.py --wheels wheels/            # on the GPU machine (<= 8 minutes on an H200)
    .venv/bin/python bench/gpu_check.py --device cpu --tiny   # the same code at toy size (the test suite)

The GPU machine is expected to have torch, transformers, peft and accelerate, and no network: the
other packages the check needs (pydantic, TRL and TRL's own: datasets, pyarrow, ...) come as wheel
files in ``--wheels DIR`` (``--fetch-wheels DIR`` fills one from the registry, for that machine's
Python), installed with ``pip --no-index --no-deps`` into a temporary folder. preftune itself runs
from this checkout, not installed. No model is downloaded: a randomly initialised model is built from
a real architecture's config — Qwen2-1.5B's shape with its 151,936-token vocabulary (throughput and
memory do not depend on the weights' values) — with a byte-level BPE tokenizer trained on the zoo's
corpus, saved, and loaded back by every contestant through ``from_pretrained``.

It prints one JSON object (the last line) with:
- ours (``run_training``, the whole call timed, cold reference cache) and TRL 1.16 ``DPOTrainer``
  with ``precompute_ref_log_probs`` off and on, each in its own process (bench/bench_train.py's
  workers): samples/s, tokens/s and peak GPU memory (``torch.cuda.max_memory_allocated``) at max
  length 1024, batch 8, LoRA r 16 on every linear layer, bf16 (ours: bf16 base, float32 adapters,
  bf16 autocast; TRL: the model loaded in bf16, ``bf16=True``);
- MFU: model FLOPs (6N per trained token: 2N forward + 2N backward through the frozen base + 2N
  for the reference pass; ``preftune.cost.train_flops``) per second against the bf16 matmul peak
  measured in the same run (8192^3 products);
- the policy's sequence log-probs in bf16 (weights and autocast, as the trainer computes them on a
  GPU) against float32 on the same weights: max and mean absolute difference;
- preftune's continuous-batching engine (preftune/batching.py) on the device: the logits of 8
  prompts decoded together against each prompt alone, compared step by step while the greedy tokens
  agree, against a stated tolerance (``LOGIT_TOLERANCE``).

Targets (issue 24): samples/s >= 1.5x the faster TRL configuration's, at <= 0.5x its peak GPU
memory; MFU >= 40 %; the engine within its tolerance. ``--tiny`` skips the first three (they are
stated at full size) and checks the engine. Exit code 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import bench_train as bt  # noqa: E402  (bench/bench_train.py: the workers and their harness)
from targets import Target, print_targets, verdict  # noqa: E402

# Qwen2-1.5B's config (its published config.json), and a toy of the same architecture for --tiny.
QWEN2_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY_SHAPE = dict(QWEN2_1_5B, vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
FULL_RUN = dict(pairs=256, batch_size=8, max_length=1024, lora_r=16, lora_alpha=32, merge=12)
TINY_RUN = dict(pairs=8, batch_size=2, max_length=64, lora_r=4, lora_alpha=8, merge=1)
# Logits of a row decoded in a batch vs alone: float32 differs only in summation order; bf16 rounds
# every activation to 8 mantissa bits, and a batch's kernels reduce in another order than one row's.
LOGIT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25}

SPEED, MEMORY, MFU, ENGINE = ("speed: ours / faster TRL", "peak GPU memory: ours / that TRL", "MFU (ours)",
                              "engine: batched vs alone, max |logit diff|")


def targets(dtype: str) -> list[Target]:
    return [Target(SPEED, ">=", 1.5, "x", full_size_only=True, note="samples/s, whole run_training call"),
            Target(MEMORY, "<=", 0.5, "x", full_size_only=True, note="torch.cuda.max_memory_allocated"),
            Target(MFU, ">=", 0.40, "", full_size_only=True, note="6N per trained token / busy s / bf16 peak"),
            Target(ENGINE, "<=", LOGIT_TOLERANCE[dtype], "", note=f"{dtype} logits")]


# ---------------------------------------------------------------- set-up (no network)


def install_wheels(folder: Path, target: Path) -> None:
    """Every wheel of ``folder`` into ``target`` (no index, no dependency resolution: the folder holds
    what this machine lacks), put first on this process's and the workers' import path."""
    wheels = sorted(str(p) for p in Path(folder).glob("*.whl"))
    if not wheels:
        raise SystemExit(f"gpu_check: no .whl files in {folder}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                    str(target), *wheels], check=True)
    _prepend_path(target)


# What the GPU machine lacks, by distribution name: pydantic (preftune) and TRL with what TRL and
# datasets need beyond torch/transformers/accelerate/pandas; typing_extensions and fsspec at the
# versions pydantic and datasets ask for (in the target folder they shadow the machine's, harmlessly).
WHEELS = ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions", "trl",
          "datasets", "pyarrow", "dill", "multiprocess", "xxhash", "fsspec")


def fetch_wheels(folder: Path, python: str) -> None:
    """Download (needs the registry) the wheels ``WHEELS`` for the GPU machine's Python; the rest of
    what pip resolves is on that machine already and is removed (the folder travels with the tree:
    64 MiB in all, pyarrow alone is ~53 MiB)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", python,
                    "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64", "-d", str(folder),
                    "pydantic", "trl==1.16.0"], check=True)
    for wheel in Path(folder).glob("*.whl"):
        if wheel.name.split("-")[0].lower() not in WHEELS:
            wheel.unlink()
    size = sum(p.stat().st_size for p in Path(folder).glob("*.whl")) / 2**20
    print(f"gpu_check: {len(list(Path(folder).glob('*.whl')))} wheels, {size:.1f} MiB in {folder}")


def package_shim(root: Path) -> None:
    """Make ``preftune`` importable from this checkout without installing it: the installed package
    maps tasks/, flows/, ... into ``preftune`` (pyproject's package-dir), so do the same with links."""
    pkg = root / "preftune"
    pkg.mkdir(parents=True)
    for entry in (REPO / "preftune").iterdir():
        (pkg / entry.name).symlink_to(entry)
    for sub in ("tasks", "flows", "judges", "reports", "templates", "examples"):
        (pkg / sub).symlink_to(REPO / sub)
    _prepend_path(root)


def _prepend_path(folder: Path) -> None:
    sys.path.insert(0, str(folder))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))


def build_model(folder: Path, shape: dict, device: str) -> int:
    """A randomly initialised Qwen2 of ``shape`` with a zoo-corpus tokenizer, saved to ``folder``;
    returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from preftune.zoo import build_tokenizer, load_corpus

    tok = build_tokenizer(load_corpus(), folder)
    tok.model_max_length = 32768
    tok.save_pretrained(folder)
    cfg = Qwen2Config(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return params


def long_pairs(n: int, merge: int) -> list[dict]:
    """n pairs, each ``merge`` of bench_train's pairs joined (prompt to prompt, answer to answer), so a
    row fills max_length as a long-context DPO row does."""
    base, _ = bt.build_pairs(n * merge)
    out = []
    for i in range(n):
        group = base[i * merge:(i + 1) * merge]
        text = lambda rows: "\n\n".join(rows)  # noqa: E731
        prompt = text([m["content"] for p in group for m in p["input"]["messages"] if m["role"] == "user"])
        out.append({"input": {"messages": [{"role": "user", "content": prompt}]},
                    "preferred_output": [{"role": "assistant", "content": text(
                        [p["preferred_output"][0]["content"] for p in group])}],
                    "non_preferred_output": [{"role": "assistant", "content": text(
                        [p["non_preferred_output"][0]["content"] for p in group])}]})
    return out


# ---------------------------------------------------------------- measurements


def logprob_precision(folder: Path, data: Path, device: str, max_length: int, rows: int) -> dict:
    """Sequence log-probs of ``rows`` pairs: float32 weights vs the same weights in bf16 under bf16
    autocast (what the trainer computes on a GPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    from preftune.hf import load_tokenizer
    from preftune.tasks.training.data import load_pair_records, tokenize_pairs
    from preftune.tasks.training.logps import SequenceLogps
    from preftune.tasks.training.loop import dataset_logps
    from preftune.tasks.training.modeling import pad_id

    tok = load_tokenizer(folder)
    pairs = tokenize_pairs(load_pair_records(data)[:rows], tok, max_length)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        fp32 = torch.cat(dataset_logps(SequenceLogps(model), pairs, 4, pad_id(tok), device))
        model.to(torch.bfloat16)
        with torch.autocast(device, dtype=torch.bfloat16):
            bf16 = torch.cat(dataset_logps(SequenceLogps(model), pairs, 4, pad_id(tok), device))
    diff = (bf16.float() - fp32).abs()
    del model
    return {"sequences": int(fp32.numel()), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "mean_abs_logp": float(fp32.abs().mean()), "tokens_per_sequence": max_length}


def engine_check(folder: Path, device: str, n_prompts: int = 8, max_tokens: int = 16) -> dict:
    """The batching engine's logits for ``n_prompts`` decoded together vs each alone (greedy), step
    by step while both chose the same tokens."""
    import torch

    from preftune.batching import Engine, Request
    from preftune.hf import load_causal_lm, prompt_ids
    from preftune.zoo import load_corpus

    model, tok = load_causal_lm(folder, device=device)  # as a run's local server loads it (bf16 on CUDA)
    chats = [r["messages"] for r in load_corpus() if "messages" in r][:n_prompts]
    prompts = [prompt_ids(tok, c[:-1]) for c in chats]  # each chat without its answer: prompts of mixed lengths

    def decode(batch: list[list[int]], rows: int) -> list[tuple[list[int], list[torch.Tensor]]]:
        engine = Engine(model, set(), max_rows=rows)  # no end token: every row runs max_tokens steps
        seen: dict[int, list[torch.Tensor]] = {}
        advance = engine._advance

        def record(logits, first_new):
            for i, row in enumerate(logits):
                seen.setdefault(id(engine.rows[first_new + i]), []).append(row.float().cpu())
            advance(logits, first_new)

        engine._advance = record
        reqs = [engine.submit(Request(p, max_tokens)) for p in batch]
        while engine.rows or engine._queue:
            engine.step()
        return [(r.tokens, seen[id(r)]) for r in reqs]

    together = decode(prompts, rows=len(prompts))
    alone = [decode([p], rows=1)[0] for p in prompts]
    worst, steps, agree = 0.0, 0, 0
    for (tok_b, log_b), (tok_a, log_a) in zip(together, alone, strict=True):
        for i, (lb, la) in enumerate(zip(log_b, log_a, strict=True)):
            worst, steps = max(worst, float((lb - la).abs().max())), steps + 1
            if i >= len(tok_b) or tok_b[i] != tok_a[i]:
                break  # from here the rows continue different texts
            agree += 1
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {"prompts": len(prompts), "max_tokens": max_tokens, "dtype": dtype, "steps_compared": steps,
            "tokens_agreeing": agree, "max_abs_logit_diff": worst, "tolerance": LOGIT_TOLERANCE[dtype]}


def contestants(model: Path, data: Path, run: dict, device: str, workdir: Path) -> dict[str, dict]:
    """Ours and TRL (precompute off, on), each in a fresh process (bench_train's workers)."""
    base = {"model": str(model), "data": str(data), "n": run["pairs"], "batch_size": run["batch_size"],
            "max_length": run["max_length"], "threads": min(8, os.cpu_count() or 1), "device": device,
            "lora_r": run["lora_r"], "lora_alpha": run["lora_alpha"], "beta": 0.1,
            "load_dtype": "bfloat16" if device == "cuda" else "float32"}
    out = {"ours": bt.run_worker("ours", dict(base, tag="ours", out=str(workdir / "ours"),
                                              ref_cache=str(workdir / "refcache")), workdir)}
    for key, pre in (("trl", False), ("trl_precompute", True)):
        out[key] = bt.run_worker("trl", dict(base, tag=key, precompute=pre, out=str(workdir / key)), workdir)
    return out


def figures(runs: dict[str, dict], params: int, peak: float) -> dict:
    """tokens/s (every contestant trains the same tokens: ours counts them), MFU, and the ratios."""
    from preftune.cost import train_flops

    tokens = runs["ours"]["train_tokens"]
    work = train_flops(params, tokens, full=False)
    for key, r in runs.items():
        busy = (r["reference_s"] or 0.0) + r["train_s"] if key == "ours" else r["wall_s"]
        r.update(tokens_per_s=tokens / r["wall_s"], mfu=work / busy / peak, mfu_seconds=busy)
    faster = max(("trl", "trl_precompute"), key=lambda k: runs[k]["samples_per_s"])
    ours, other = runs["ours"], runs[faster]
    memory = (ours["peak_gpu_mb"] / other["peak_gpu_mb"]) if ours["peak_gpu_mb"] and other["peak_gpu_mb"] else None
    return {"trained_tokens": tokens, "model_flops": work, "trl_faster": faster,
            "speedup": ours["samples_per_s"] / other["samples_per_s"], "memory_ratio": memory}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="Toy model and sizes (the test suite's run); "
                    "the full-size targets are skipped.")
    ap.add_argument("--wheels", type=Path, help="Folder of wheels this machine lacks (pydantic, TRL, ...).")
    ap.add_argument("--fetch-wheels", type=Path, metavar="DIR", help="Download those wheels (registry needed) "
                    "for --python and exit.")
    ap.add_argument("--python", default="3.12", help="The GPU machine's Python version, for --fetch-wheels.")
    ap.add_argument("--pairs", type=int, help="Pairs trained (default 256; --tiny 8).")
    ap.add_argument("--workdir", type=Path, help="Keep files here (default: a temporary folder).")
    args = ap.parse_args(argv)
    if args.fetch_wheels:
        fetch_wheels(args.fetch_wheels, args.python)
        return 0
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch loads, here and in every worker
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        return check(args, workdir)


def check(args: argparse.Namespace, workdir: Path) -> int:
    start = time.perf_counter()
    if args.wheels:
        install_wheels(args.wheels, workdir / "site")
    package_shim(workdir / "pkg")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch sees no GPU (use --device cpu --tiny for the toy run)")
    run = dict(TINY_RUN if args.tiny else FULL_RUN)
    run["pairs"] = args.pairs or run["pairs"]
    shape = TINY_SHAPE if args.tiny else QWEN2_1_5B
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    tgts = targets(dtype)
    print_targets(tgts, quick=args.tiny)
    model = workdir / "model"
    params = build_model(model, shape, args.device)
    data = workdir / "pairs.jsonl"
    bt.write_jsonl(data, long_pairs(run["pairs"], run["merge"]))
    peak = bt.matmul_peak(min(8, os.cpu_count() or 1), args.device, 256 if args.tiny else 8192, "bfloat16")
    runs = contestants(model, data, run, args.device, workdir)
    result = {"check": "gpu", "device": args.device, "tiny": args.tiny,
              "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
              "versions": {"torch": torch.__version__, **_versions()},
              "model": {"shape": shape, "params": params}, "settings": run,
              "bf16_matmul_peak_flops_per_s": peak, **runs, **figures(runs, params, peak),
              "logprobs_bf16_vs_fp32": logprob_precision(model, data, args.device, run["max_length"], 16),
              "engine": engine_check(model, args.device)}
    measured = {SPEED: result["speedup"], MEMORY: result["memory_ratio"], MFU: runs["ours"]["mfu"],
                ENGINE: result["engine"]["max_abs_logit_diff"]}
    code, rows = verdict(tgts, measured, quick=args.tiny)
    result.update(targets=rows, passed=code == 0, seconds=round(time.perf_counter() - start, 1))
    print(json.dumps(result), flush=True)
    return code


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("transformers", "peft", "accelerate", "trl", "pydantic"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    raise SystemExit(main())
