"""Run every benchmark in turn (`make bench`); exit 1 when any of them failed.

Each benchmark prints its figures, its targets' verdicts (PASS / FAIL / SKIP, and a
``TARGET MISSED:`` line per miss) and ends with one JSON line; a benchmark that misses a target
exits non-zero. This prints every benchmark's output as it comes, then a summary: each script's
exit code and target results, and the list of those that failed. `--quick` passes --quick to each
(a smoke run, not the figures to report: it skips the targets that only hold at full size).
Run it on an otherwise quiet machine: the figures are wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ORDER = ["bench_zoo.py", "bench_inspect.py", "bench_train.py", "bench_pairs.py", "bench_judge.py",
         "bench_real_hh.py", "bench_real_learns.py"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", help="benchmark file names to run (default: all)")
    args = ap.parse_args()
    results, failed = {}, []
    for name in args.only or ORDER:
        cmd = [sys.executable, str(BENCH / name)] + (["--quick"] if args.quick else [])
        print(f"\n=== {name} ===", flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        sys.stdout.write(proc.stdout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        result = None
        if lines:
            try:
                result = json.loads(lines[-1])
            except json.JSONDecodeError:
                result = None
        missed = [ln for ln in proc.stdout.splitlines() if ln.startswith("TARGET MISSED:")]
        results[name] = {"returncode": proc.returncode, "result": result, "missed": missed}
        if proc.returncode != 0 or result is None:
            failed.append(name)

    print("\n=== summary ===")
    for name, r in results.items():
        status = "ok" if name not in failed else (
            f"FAILED (exit code {r['returncode']})" if r["returncode"] else "FAILED (no result line)")
        print(f"{name}: {status}")
        for row in (r["result"] or {}).get("targets", []):
            v = row["value"]
            value = "-" if v is None else (f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}")
            why = f" ({row['why']})" if row.get("why") else ""
            print(f"  {row['result']:<4}  {row['target']}: {value} {row['unit']}, needs {row['op']} "
                  f"{row['limit']:g} {row['unit']}{why}")
        for line in r["missed"]:
            print(f"  {line}")
    print("\nfigures (each benchmark's final JSON line):")
    for name, r in results.items():
        print(f"{name}: {json.dumps(r['result'])}")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
    else:
        skipped = sum(row["result"] == "SKIP" for r in results.values() for row in (r["result"] or {}).get("targets", []))
        print("\nno benchmark failed" + (f" ({skipped} target(s) skipped, listed above)" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
