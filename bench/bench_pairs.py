"""Pair generation speed against a local server with a fixed 100 ms latency per request.

Targets: ``TARGETS`` below (issue 4: 512 prompts at concurrency 32 against concurrency 1, and what
the client adds per request), printed with the figures; the exit code is 1 when one is missed. The
server (StubServer, a real HTTP server) runs in its own process
so that its CPU does not share the client's GIL, as a real endpoint would not.

Client overhead is measured two ways:
* zero-latency server, sequential requests: ChatClient (cache on, as in production) minus bare
  POSTs on the same HTTP client and transport to the same server — what the client adds on top of
  HTTP itself;
* 100 ms server, concurrency 1: wall time per request minus the 100 ms (an upper bound: it also
  holds the server's own per-request work).

    .venv/bin/python bench/bench_pairs.py            # 512 prompts (about a minute)
    .venv/bin/python bench/bench_pairs.py --quick    # 128 prompts (the speed-up target is skipped)

``--local``: local generation on the real model instead, side by side on two servers. The strong
side is SmolLM2-135M-Instruct (the zoo's real model, ``preftune zoo``), the weak side the tiny zoo
model ``tiny-weak``, both served as a run serves them: by preftune's continuous batching server
(``preftune/batchserve.py``; the target is its), then by ``transformers serve`` (the reference:
``--continuous-batching`` for the real model, one request at a time for the tiny one, as preftune
served them before). Pair generation at concurrency 32 against concurrency 1, in completion tokens/s
of both sides together (target: LOCAL_TARGETS); the strong side's own tokens/s over the same wall
time is printed beside it. Concurrency C is what the run asks for; each client sends at most what
its server batches, as a pair run does. Each measurement starts from a fresh response cache.
Concurrency 1 is a steady rate whatever the number of prompts, so it is timed on the first
C1_PROMPTS only.

    .venv/bin/python bench/bench_pairs.py --local            # 64 prompts, 48 tokens
    .venv/bin/python bench/bench_pairs.py --local --quick    # 32 prompts, 24 tokens
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from targets import Target, print_targets, verdict  # noqa: E402  (bench/targets.py)

from preftune.client import ChatClient, _Conn  # noqa: E402
from preftune.endpoint import Endpoint  # noqa: E402
from preftune.tasks.pairs import generate_pairs  # noqa: E402
from tests.stub_server import Reply, StubRequest, StubServer  # noqa: E402  (the repository root is on sys.path)

LATENCY = 0.1
SPEEDUP, OVERHEAD = "speed-up, concurrency 32 vs 1", "client overhead per request"
TARGETS = [  # issue 4
    Target(SPEEDUP, ">=", 25, "x", full_size_only=True, note="512 prompts, 100 ms server"),
    Target(OVERHEAD, "<=", 5, "ms", note="wall per request at c=1 minus the 100 ms: an upper bound"),
]


LOCAL_SPEEDUP = "local speed-up, concurrency 32 vs 1"
C1_PROMPTS = 8
LOCAL_TARGETS = [  # issue 12
    Target(LOCAL_SPEEDUP, ">=", 8, "x", note="tokens/s of pair generation, SmolLM2-135M served by preftune on CPU"),
]
LOCAL_SERVERS = ("preftune", "transformers")  # the target is preftune's; transformers serve is the reference


def local_main(args: argparse.Namespace) -> int:
    """Pair generation on the real model: preftune's server, then transformers serve (module
    docstring)."""
    import os

    from preftune.realmodel import build_real_model
    from preftune.zoo import build_zoo

    n = args.prompts or (32 if args.quick else 64)
    max_tokens = 24 if args.quick else 48
    print_targets(LOCAL_TARGETS)
    strong_dir, weak_dir = build_real_model()["path"], build_zoo()["models"]["tiny-weak"]
    results = {}
    for server in LOCAL_SERVERS:
        os.environ["PREFTUNE_LOCAL_SERVER"] = server  # which server the run's folders get (server.py)
        results[server] = local_run(strong_dir, weak_dir, n, max_tokens)
    del os.environ["PREFTUNE_LOCAL_SERVER"]
    # tokens/s: both sides' completion tokens; strong tok/s: the real model's alone over the same wall
    print(f"{'server':>12}  {'concurrency':>11}  {'strong/weak':>11}  {'prompts':>7}  {'wall s':>8}  {'tokens':>7}  "
          f"{'tokens/s':>9}  {'strong tok/s':>12}  failed")
    for server, res in results.items():
        for conc, sent, wall, tokens, rate, strong_only, failed in res["rows"]:
            print(f"{server:>12}  {conc:>11}  {sent:>11}  {min(n, C1_PROMPTS) if conc == 1 else n:>7}  "
                  f"{wall:>8.1f}  {tokens:>7}  {rate:>9.1f}  {strong_only:>12.1f}  {failed}")
        print(f"{server:>12}  speed-up, concurrency 32 vs 1: {res['speedup']:.2f}x")
    ours, ref = results["preftune"], results["transformers"]
    print(f"preftune / transformers serve, tokens/s at concurrency 32: "
          f"{ours['tokens_per_s'][32] / ref['tokens_per_s'][32]:.2f}x "
          f"(at 1: {ours['tokens_per_s'][1] / ref['tokens_per_s'][1]:.2f}x)")
    code, targets = verdict(LOCAL_TARGETS, {LOCAL_SPEEDUP: ours["speedup"]})
    print(json.dumps({"bench": "pairs-local", "prompts": n, "max_tokens": max_tokens, "quick": args.quick,
                      **{server: {"tokens_per_s": {str(k): round(v, 1) for k, v in res["tokens_per_s"].items()},
                                  "strong_tokens_per_s": {str(k): round(v, 1) for k, v in res["strong"].items()},
                                  "speedup": round(res["speedup"], 2)} for server, res in results.items()},
                      "targets": targets, "passed": code == 0}))
    return code


def local_run(strong_dir: str, weak_dir: str, n: int, max_tokens: int) -> dict:
    """Concurrency 1 then 32 on freshly started servers, each from a fresh response cache."""
    import contextlib

    from preftune.server import resolve_endpoints

    rows, measured, strong_rate = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        prompts = work / "prompts.jsonl"
        with open(prompts, "w") as fh:
            for i in range(n):
                fh.write(json.dumps({"messages": [{"role": "user", "content":
                                                   f"Write two sentences about the number {i}."}]}) + "\n")
        t0 = time.perf_counter()
        strong, weak = resolve_endpoints([strong_dir, weak_dir], log_dir=work / "logs", stack=stack)
        print(f"servers up in {time.perf_counter() - t0:.1f} s; strong concurrency {strong.concurrency}, "
              f"weak {weak.concurrency}", flush=True)
        write_prompts(work / "warm.jsonl", 3)  # (a prompts file holds 3 at the least)
        generate_pairs(work / "warm.jsonl", strong, weak, work / "warm", max_tokens=8, progress=False)
        with open(prompts) as src, open(work / "c1.jsonl", "w") as dst:
            dst.writelines(line for _, line in zip(range(C1_PROMPTS), src, strict=False))
        for conc in (1, 32):
            prov = generate_pairs(work / "c1.jsonl" if conc == 1 else prompts, strong, weak, work / f"c{conc}",
                                  max_tokens=max_tokens, concurrency=conc, keep_truncated=True, progress=False)
            tokens = sum(prov["usage"][side]["completion_tokens"] for side in ("strong", "weak"))
            measured[conc] = tokens / prov["wall_time_s"]
            strong_rate[conc] = prov["usage"]["strong"]["completion_tokens"] / prov["wall_time_s"]
            sent = prov["sampling"]["concurrency"]  # what each client really kept in flight
            rows.append((conc, f"{sent['strong']}/{sent['weak']}", prov["wall_time_s"], tokens, measured[conc],
                         strong_rate[conc], prov["counts"]["by_reason"]["failed"]))
    return {"rows": rows, "tokens_per_s": measured, "strong": strong_rate, "speedup": measured[32] / measured[1]}


def answer(req: StubRequest) -> Reply:
    return Reply(text=f"{req.body.get('model')} answers {req.last_user}: " + "word " * 20)


def _serve(latency: float, queue: mp.Queue) -> None:
    srv = StubServer(answer, latency=latency).start()
    queue.put(srv.base_url)
    time.sleep(3600)


def start_server(latency: float) -> tuple[mp.Process, str]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(latency, queue), daemon=True)
    proc.start()
    return proc, queue.get(timeout=60)


def write_prompts(path: Path, n: int) -> None:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"Question number {i}: why?"}]}) + "\n")


def pairs_wall(base_url: str, prompts: Path, work: Path, concurrency: int) -> dict:
    out = work / f"c{concurrency}" if work.name != "warm" else work  # a fresh cache: every request is really sent
    prov = generate_pairs(prompts, Endpoint(base_url=base_url, model="strong"), Endpoint(base_url=base_url, model="weak"),
                          out, max_tokens=64, concurrency=concurrency, progress=False)
    assert prov["counts"]["pairs"] == prov["counts"]["prompts"], prov["counts"]
    return prov


async def _sequential(base_url: str, n: int, cache: Path) -> tuple[float, float]:
    """Seconds per request, sequential: through ChatClient, and as bare POSTs on the same HTTP client
    (the SDK's, on the same transport) with a ready-made body — HTTP itself, nothing of ours."""
    client = ChatClient(Endpoint(base_url=base_url, model="m"), concurrency=1, cache_dir=cache)
    await client.chat([{"role": "user", "content": "warm up"}], max_tokens=8)
    t0 = time.perf_counter()
    for i in range(n):
        await client.chat([{"role": "user", "content": f"q{i}"}], max_tokens=8)
    ours = (time.perf_counter() - t0) / n
    await client.aclose()
    conn = _Conn.open(base_url, "unused", 1, 60.0)
    try:
        def body(text: str) -> bytes:
            return json.dumps({"model": "m", "messages": [{"role": "user", "content": text}],
                               "max_tokens": 8}).encode()

        await conn.http.post(conn.url, content=body("warm"), headers=conn.headers)
        t0 = time.perf_counter()
        for i in range(n):
            r = await conn.http.post(conn.url, content=body(f"r{i}"), headers=conn.headers)
            json.loads(r.content)
        plain = (time.perf_counter() - t0) / n
    finally:
        await conn.http.aclose()
    return ours, plain


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128 prompts instead of 512")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--local", action="store_true",
                    help="local generation on the real model, two servers side by side, concurrency 32 vs 1")
    args = ap.parse_args()
    if args.local:
        return local_main(args)
    n = args.prompts or (128 if args.quick else 512)
    quick = n < 512  # the speed-up target is stated at 512 prompts
    print_targets(TARGETS, quick)
    slow, slow_url = start_server(LATENCY)
    fast, fast_url = start_server(0.0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            prompts = work / "prompts.jsonl"
            write_prompts(prompts, n)
            write_prompts(work / "warm.jsonl", 4)  # imports and first connections, outside the timings
            pairs_wall(slow_url, work / "warm.jsonl", work / "warm", 32)
            c1 = pairs_wall(slow_url, prompts, work, 1)
            c32 = pairs_wall(slow_url, prompts, work, 32)
            ours, plain = asyncio.run(_sequential(fast_url, 200 if args.quick else 1000, work / "seq-cache"))
    finally:
        slow.terminate()
        fast.terminate()
    t1, t32 = c1["wall_time_s"], c32["wall_time_s"]
    # At concurrency 1 each endpoint has one request in flight; strong and weak run side by side.
    per_request_c1 = t1 / n
    rows = [
        ("prompts", f"{n}", ""),
        ("requests per run", f"{2 * n}", "strong + weak"),
        ("wall, concurrency 1", f"{t1:.2f} s", f"ideal {n * LATENCY:.1f} s"),
        ("wall, concurrency 32", f"{t32:.2f} s", f"ideal {n * LATENCY / 32:.2f} s"),
        ("speed-up 32 vs 1", f"{t1 / t32:.1f}x", ""),
        ("client overhead (0 ms server)", f"{(ours - plain) * 1e3:.2f} ms", "ChatClient - bare POSTs, per request"),
        ("  ChatClient / raw per request", f"{ours * 1e3:.2f} / {plain * 1e3:.2f} ms", "sequential"),
        ("overhead at c=1 (100 ms server)", f"{(per_request_c1 - LATENCY) * 1e3:.2f} ms",
         "upper bound"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>18}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>18}  {note}")
    code, targets = verdict(TARGETS, {SPEEDUP: t1 / t32, OVERHEAD: (per_request_c1 - LATENCY) * 1e3}, quick)
    print(json.dumps({"bench": "pairs", "prompts": n, "quick": quick, "latency_s": LATENCY, "wall_c1_s": t1, "wall_c32_s": t32,
                      "speedup": round(t1 / t32, 2), "overhead_ms": round((ours - plain) * 1e3, 3),
                      "overhead_c1_upper_ms": round((per_request_c1 - LATENCY) * 1e3, 3),
                      "client_ms": round(ours * 1e3, 3), "raw_ms": round(plain * 1e3, 3),
                      "targets": targets, "passed": code == 0}))
    return code


if __name__ == "__main__":
    sys.exit(main())
