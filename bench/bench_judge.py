"""Benchmark: pairwise judging throughput through the real client against a local judge server.

N prompts × M candidate models × 2 orders, every request answered by a StubServer after a fixed
latency (100 ms by default, like a fast hosted judge). Target: ``TARGETS`` below, stated for the
default configuration (200 × 3 × 2 = 1,200 judgments at 100 ms, concurrency 16); the exit code is 1
when it is missed. Also times the statistics (bootstrap CI, LC win rate) and a second, fully cached
pass.

    .venv/bin/python bench/bench_judge.py            # the target configuration
    .venv/bin/python bench/bench_judge.py --quick    # a small smoke run (the target is skipped)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402,F401 - imported up front: a one-off import cost, not judging time
import openai  # noqa: E402,F401
from targets import Target, print_targets, verdict  # noqa: E402  (bench/targets.py)

from preftune.client import ChatClient  # noqa: E402
from preftune.endpoint import Endpoint  # noqa: E402
from preftune.judges import stats  # noqa: E402
from preftune.judges.pairwise import PairItem, judge_items  # noqa: E402
from tests.stub_server import Reply, StubRequest, StubServer  # noqa: E402  (the repository root is on sys.path)

VERDICTS = ["A>>B", "A>B", "A=B", "B>A", "B>>A"]
WALL = "judge wall time, 200 × 3 × 2 at 100 ms"
TARGETS = [Target(WALL, "<=", 15, "s", full_size_only=True, note="1,200 judgments, concurrency 16")]
DEFAULTS = {"prompts": 200, "models": 3, "latency": 0.1, "concurrency": 16}  # the target's configuration


def judge(req: StubRequest) -> Reply:
    """A deterministic judge: the verdict is a hash of the prompt, with a little explanation."""
    h = int(hashlib.sha256(req.last_user.encode()).hexdigest()[:8], 16)
    return Reply(text=f"Both answers address the question; weighing clarity.\nFinal verdict: [[{VERDICTS[h % 5]}]]")


def serve(conn, latency: float) -> None:
    """The judge server in its own process, as a real judge would be (no GIL shared with the client)."""
    with StubServer(judge, latency=latency) as srv:
        conn.send(srv.base_url)
        while conn.recv() == "count":
            conn.send(len(srv.requests))


class JudgeProcess:
    def __init__(self, latency: float):
        self.conn, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(target=serve, args=(child, latency), daemon=True)
        self.proc.start()
        self.base_url = self.conn.recv()

    def requests(self) -> int:
        self.conn.send("count")
        return self.conn.recv()

    def stop(self) -> None:
        self.conn.send("stop")
        self.proc.join(10)


def make_items(n_prompts: int, model: int) -> list[PairItem]:
    return [PairItem(f"p{i}", [{"role": "user", "content": f"Question {i}: explain topic {i}."}],
                     f"Model {model} answer to {i}. " + "detail " * (i % 17), f"Base answer to {i}.")
            for i in range(n_prompts)]


async def judge_everything(client: ChatClient, n_prompts: int, n_models: int) -> list[list[dict]]:
    async with client:
        return list(await asyncio.gather(*(judge_items(client, "- be helpful", make_items(n_prompts, m))
                                           for m in range(n_models))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40 prompts × 3 models")
    ap.add_argument("--prompts", type=int, default=DEFAULTS["prompts"])
    ap.add_argument("--models", type=int, default=DEFAULTS["models"])
    ap.add_argument("--latency", type=float, default=DEFAULTS["latency"],
                    help="seconds the judge server takes per reply")
    ap.add_argument("--concurrency", type=int, default=DEFAULTS["concurrency"],
                    help="judge requests in flight (EvalConfig default)")
    args = ap.parse_args()
    n_prompts = 40 if args.quick else args.prompts
    # The target is stated for one configuration: any other run (--quick included) is a smoke run.
    smoke = args.quick or any(getattr(args, k) != v for k, v in DEFAULTS.items())
    print_targets(TARGETS, smoke)
    srv = JudgeProcess(args.latency)
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = Endpoint(base_url=srv.base_url, model="judge")
        client = ChatClient(endpoint, concurrency=args.concurrency, cache_dir=Path(tmp) / "cache")
        t0, c0 = time.perf_counter(), time.process_time()
        judged = asyncio.run(judge_everything(client, n_prompts, args.models))
        judge_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        requests = srv.requests()

        t0 = time.perf_counter()
        for records in judged:
            outcomes = [r["outcome"] for r in records]
            stats.win_rate(outcomes, seed=0, resamples=2000)
            stats.lc_win_rate(outcomes, [r["candidate_length"] for r in records],
                              [r["baseline_length"] for r in records])
        stats_s = time.perf_counter() - t0

        cached_client = ChatClient(endpoint, concurrency=args.concurrency, cache_dir=Path(tmp) / "cache")
        t0 = time.perf_counter()
        asyncio.run(judge_everything(cached_client, n_prompts, args.models))
        cached_s = time.perf_counter() - t0
        new_requests = srv.requests() - requests
    srv.stop()

    judgments = n_prompts * args.models * 2
    invalid = sum(r["outcome"] == "invalid" for records in judged for r in records)
    floor = judgments * args.latency / args.concurrency
    rows = [("judgments (prompts × models × 2 orders)", f"{n_prompts} × {args.models} × 2 = {judgments}"),
            ("server latency per request", f"{args.latency * 1000:.0f} ms"),
            ("client concurrency", str(args.concurrency)),
            ("judge wall time", f"{judge_s:.2f} s (latency floor {floor:.2f} s)"),
            ("throughput", f"{judgments / judge_s:.1f} judgments/s"),
            ("client-side CPU per judgment", f"{cpu_s / judgments * 1000:.2f} ms"),
            ("statistics (bootstrap 2000 + LC) for all models", f"{stats_s * 1000:.0f} ms"),
            ("re-run from cache", f"{cached_s:.2f} s, {new_requests} new requests"),
            ("invalid comparisons", str(invalid))]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    code, targets = verdict(TARGETS, {WALL: judge_s}, smoke)
    print(json.dumps({"bench": "judge", "prompts": n_prompts, "models": args.models, "judgments": judgments,
                      "latency_s": args.latency, "concurrency": args.concurrency,
                      "judge_wall_s": round(judge_s, 3), "judgments_per_s": round(judgments / judge_s, 1),
                      "client_cpu_ms_per_judgment": round(cpu_s / judgments * 1000, 2),
                      "stats_ms": round(stats_s * 1000, 1), "cached_rerun_s": round(cached_s, 3),
                      "cached_rerun_new_requests": new_requests, "requests": requests,
                      "quick": smoke, "targets": targets, "passed": code == 0}))
    return code


if __name__ == "__main__":
    sys.exit(main())
