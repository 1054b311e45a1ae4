"""Time a fresh build of the tiny-model zoo and a cache hit.

    python bench/bench_zoo.py            # the real zoo, built into a temporary folder
    python bench/bench_zoo.py --quick    # a one-layer smoke build, seconds (the build target is skipped)

Prints a table (per-model params, steps, held-out perplexity, seconds), the targets' verdicts
(``TARGETS`` below; exit code 1 when one is missed) and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from targets import Target, print_targets, verdict  # noqa: E402  (bench/targets.py)

from preftune import zoo  # noqa: E402

BUILD = "fresh zoo build"
TARGETS = [Target(BUILD, "<=", 180, "s", full_size_only=True, note="the real zoo on 2 CPU cores")]

QUICK = {"tiny-test": zoo.ModelSpec("llama", 32, 1, 2, 2, 64, steps=4, lr=1e-3, seed=5, batch_size=4, seq_len=32)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny smoke build instead of the real zoo")
    args = parser.parse_args()
    print_targets(TARGETS, args.quick)
    specs = QUICK if args.quick else zoo.SPECS
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = zoo.build_zoo(Path(tmp) / "zoo", specs=specs)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = zoo.build_zoo(Path(tmp) / "zoo", specs=specs)
        cached_s = time.perf_counter() - t0
        assert again == result
        manifest = json.loads((Path(result["dir"]) / "zoo.json").read_text())
    print(f"\n{'model':<12} {'params':>8} {'steps':>6} {'held-out ppl':>13} {'seconds':>8}")
    for name, m in manifest["models"].items():
        print(f"{name:<12} {m['params'] / 1e6:7.2f}M {m['steps']:6d} {m['heldout_perplexity']:13.2f} "
              f"{m['build_seconds']:8.1f}")
    print(f"fresh build: {build_s:.1f}s   cache hit: {cached_s * 1000:.0f} ms")
    code, rows = verdict(TARGETS, {BUILD: build_s}, args.quick)
    print(json.dumps({"bench": "zoo", "quick": args.quick, "build_seconds": round(build_s, 2),
                      "cache_hit_seconds": round(cached_s, 4),
                      "models": {k: {"params": v["params"], "heldout_perplexity": v["heldout_perplexity"],
                                     "build_seconds": v["build_seconds"]} for k, v in manifest["models"].items()},
                      "targets": rows, "passed": code == 0}))
    return code


if __name__ == "__main__":
    sys.exit(main())
