"""Benchmark phase 1: validation speed and peak memory of `inspect` on a large Format A file.

    .venv/bin/python bench/bench_inspect.py            # 1,000,000 examples
    .venv/bin/python bench/bench_inspect.py --quick    # 50,000 examples (smoke run)

Generates an OpenAI/Fireworks pairs file of typical small records in a temporary folder, then runs
each mode in a fresh child process so peak RSS (the child's own ``VmHWM``, see ``peak_rss_kib``)
belongs to that mode alone:

* ``validate`` — stream + validate + convert every line (``preftune.records.RecordReader``);
* ``inspect``  — the whole phase without a tokenizer (dedupe, split, write, character stats);
* ``tokens``   — the whole phase with token statistics on the zoo tokenizer.

Targets: ``TARGETS`` below (issue 2, 2 cores), checked against the figures; the exit code is 1
when one is missed. Validation speed is a rate, so ``--quick`` checks it too. Prints a table, the
targets' verdicts and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from targets import Target, print_targets, verdict  # noqa: E402  (bench/targets.py)

SPEED, RSS = "validation speed", "peak RSS with token statistics"
TARGETS = [  # issue 2, 2 cores
    Target(SPEED, ">=", 50_000, "examples/s", note="validate mode, wall clock"),
    Target(RSS, "<=", 1024, "MiB", note="tokens mode, the child's VmHWM"),
]
MODE_OF = {SPEED: "validate", RSS: "tokens"}
WORDS = ("the a of to and in is it you that was for on are with as they be at one have this from by hot "
         "word but what some we can out other were all there when up use your how said an each she which "
         "do their time if will way about many then them write would like so these her long make thing see "
         "him two has look more day could go come did number sound no most people my over know water than "
         "call first who may down side been now find river garden music planet recipe bread").split()


def generate(path: Path, n: int, seed: int = 0) -> None:
    """n typical small pairs: a one-turn prompt (~12 words), answers of ~30 and ~20 words; 1% repeats."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choices(WORDS, k=k))

    with open(path, "w", encoding="utf-8") as fh:
        last = ""
        for i in range(n):
            if i and rng.random() < 0.01:
                fh.write(last)  # exact duplicates exist in real data; dedupe must find them
                continue
            rec = {"input": {"messages": [{"role": "user", "content": f"{text(rng.randint(6, 18))} ({i})?"}]},
                   "preferred_output": [{"role": "assistant", "content": text(rng.randint(15, 45))}],
                   "non_preferred_output": [{"role": "assistant", "content": text(rng.randint(10, 30))}]}
            last = json.dumps(rec) + "\n"
            fh.write(last)


def child(mode: str, data: Path, tokenizer: str | None, workdir: Path) -> dict:
    """Run one mode in this (fresh) process; report examples/s and this process's peak RSS."""
    from preftune.records import RecordReader

    start, cpu_start = time.perf_counter(), time.process_time()
    if mode == "validate":
        reader = RecordReader(data)
        examples = sum(1 for _ in reader)
    else:
        from preftune.tasks.inspect import inspect_dataset

        models = [tokenizer] if mode == "tokens" else []
        report = inspect_dataset(data, models=models, max_length=64, workspace=workdir / f"ws-{mode}")
        examples = report["examples"]
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu_start  # all threads; on a shared machine this is the fairer figure
    peak_kb = peak_rss_kib()
    return {"mode": mode, "examples": examples, "seconds": round(seconds, 2),
            "examples_per_s": round(examples / seconds),
            "cpu_seconds": round(cpu, 2), "examples_per_cpu_s": round(examples / cpu), "peak_rss_mb": round(peak_kb / 1024, 1)}


def peak_rss_kib() -> int:
    """This process's peak RSS. ``VmHWM`` belongs to the process's own address space, which starts
    fresh at exec; ``ru_maxrss`` can carry the parent's high-water mark over a vfork+exec, so it is
    only the fallback where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def run_child(mode: str, data: Path, tokenizer: str | None, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--data", str(data), "--workdir", str(workdir)]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def zoo_tokenizer() -> str | None:
    """The zoo tokenizer's folder, found in a child process so this one stays small (torch-free)."""
    code = "from preftune.zoo import build_zoo; print(build_zoo()['tokenizer'])"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    return res.stdout.strip().splitlines()[-1] if res.returncode == 0 and res.stdout.strip() else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="examples to generate")
    ap.add_argument("--quick", action="store_true", help="50,000 examples")
    ap.add_argument("--modes", default="validate,inspect,tokens")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help="tokenizer folder for the tokens mode (default: the zoo's)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.data), args.tokenizer, Path(args.workdir))))
        return 0

    n = 50_000 if args.quick else args.n
    modes = args.modes.split(",")
    tokenizer = args.tokenizer or (zoo_tokenizer() if "tokens" in modes else None)
    print_targets(TARGETS)
    with tempfile.TemporaryDirectory(prefix="bench_inspect_") as tmp:
        data = Path(tmp) / "pairs.jsonl"
        t0 = time.perf_counter()
        generate(data, n)
        gen_s = time.perf_counter() - t0
        size_mb = data.stat().st_size / 2**20
        results = []
        for mode in modes:
            if mode == "tokens" and not tokenizer:
                print("tokens: skipped (the zoo tokenizer is not available: `preftune zoo`)")
                continue
            results.append(run_child(mode, data, tokenizer, Path(tmp)))

    load = os.getloadavg()[0]
    print(f"\nbench_inspect: {n:,} Format A examples, {size_mb:,.1f} MiB (generated in {gen_s:.1f} s); "
          f"{os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"{'mode':<10} {'examples':>10} {'seconds':>9} {'examples/s':>11} {'ex/CPU-s':>9} {'peak RSS MiB':>13}")
    for r in results:
        print(f"{r['mode']:<10} {r['examples']:>10,} {r['seconds']:>9.2f} {r['examples_per_s']:>11,} "
              f"{r['examples_per_cpu_s']:>9,} {r['peak_rss_mb']:>13,.1f}")
    if load > 1.5:
        print("note: the machine is busy; validation is single-threaded, so ex/CPU-s is what one idle core does")
    by_mode = {r["mode"]: r for r in results}
    measured = {SPEED: by_mode.get("validate", {}).get("examples_per_s"),
                RSS: by_mode.get("tokens", {}).get("peak_rss_mb")}
    # A mode left out by --modes is skipped; one that should have run but did not (no tokenizer) fails.
    skip = {name: f"mode {mode} not in --modes" for name, mode in MODE_OF.items() if mode not in modes}
    code, rows = verdict(TARGETS, measured, args.quick, skip)
    summary = {"bench": "inspect", "n": n, "quick": args.quick, "file_mib": round(size_mb, 1),
               "cpu_count": os.cpu_count(), "load_average": round(load, 2), "results": by_mode,
               "targets": rows, "passed": code == 0}
    print(json.dumps(summary))
    return code


if __name__ == "__main__":
    sys.exit(main())
