"""Phase 3: delta-learning preference pairs from a prompts-only dataset.

For each prompt the strong model's completion is ``preferred_output`` and the weak model's
``non_preferred_output`` (Delta Learning, Geng et al. 2025: the *difference* in quality carries the
signal even when both are mediocre; greedy decoding by default, as there). A prompt is dropped,
with exactly one reason counted and listed, when:

    failed     a request still failed after its retries (either side)
    empty      a completion is empty or whitespace
    identical  both completions are the same (no preference signal)
    truncated  a completion stopped at max_tokens (finish_reason "length"), unless keep_truncated

Writes a NEW ``pairs-<UTC timestamp>.jsonl`` (canonical pair records, prompt order) and
``provenance.json``; the prompts file is only read. Requests go through ``ChatClient`` with its
on-disk cache, so a re-run (after a crash or a failure) pays only for what did not finish, and
each paid request is appended to a cost ledger when it is paid (``preftune.ledger``; default
``out_dir/ledger.jsonl``, the workspace's ``ledger.jsonl`` in the flow): money spent before a
crash stays on record. An endpoint that refuses the key (HTTP 401/403) stops the phase at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from preftune.client import AuthError, ChatClient, ChatError, ChatResult, Endpoint
from preftune.errors import RunEnded, UserError
from preftune.files import (
    file_sha256,
    read_sealed_json,
    stale,
    write_json_atomic,
    write_jsonl_atomic,
    write_sealed_json,
)
from preftune.ledger import LEDGER_FILE, Ledger
from preftune.records import RecordReader, iter_records, prompt_hash
from preftune.server import resolve_run_endpoints
from preftune.spec import RunSpec
from preftune.tasks.plan import prompt_quota
from preftune.workspace import Workspace

REASONS = ("failed", "empty", "identical", "truncated")
T = TypeVar("T")
Outcome = ChatResult | ChatError


def load_prompt_records(prompts_path: str | Path) -> tuple[list[tuple[int, dict]], str | None]:
    """Validated (line, canonical prompt) records and the file's sha256; UserError names file:line."""
    reader = RecordReader(prompts_path, expect="prompts")
    records = list(reader)  # validate the whole file before spending anything
    return records, reader.sha256


def drop_reason(strong: Outcome, weak: Outcome, keep_truncated: bool) -> tuple[str, str] | None:
    """(reason, detail) when this prompt yields no pair, else None. Checked in REASONS order."""
    sides = (("strong", strong), ("weak", weak))
    failed = [f"{name}: {o.reason} after {o.attempts} attempt(s)" for name, o in sides if isinstance(o, ChatError)]
    if failed:
        return "failed", "; ".join(failed)
    assert isinstance(strong, ChatResult) and isinstance(weak, ChatResult)
    empty = [name for name, o in sides if not o.text.strip()]
    if empty:
        return "empty", " and ".join(empty) + " completion empty"
    if strong.text.strip() == weak.text.strip():
        return "identical", "strong and weak completions are the same"
    cut = [name for name, o in sides if o.finish_reason == "length"]
    if cut and not keep_truncated:
        return "truncated", " and ".join(cut) + " completion hit max_tokens"
    return None


def make_pair(record: dict, strong: str, weak: str) -> dict:
    inp: dict[str, Any] = {"messages": record["messages"]}
    if record.get("tools"):
        inp["tools"] = record["tools"]
    return {"input": inp, "preferred_output": [{"role": "assistant", "content": strong}],
            "non_preferred_output": [{"role": "assistant", "content": weak}]}


async def complete_all(records: list[tuple[int, dict]], strong: ChatClient, weak: ChatClient, *,
                       max_tokens: int, temperature: float,
                       on_done: Callable[[], None] | None = None) -> list[tuple[Outcome, Outcome]]:
    """Both completions for every prompt; failures come back in place (never raised, never lost).

    A pool of workers pulls prompts in order; each asks both endpoints at once. The clients'
    semaphores hold the real concurrency; twice as many workers keep them busy while some back off.
    """
    results: list[tuple[Outcome, Outcome] | None] = [None] * len(records)
    todo = iter(range(len(records)))

    async def one(client: ChatClient, record: dict) -> Outcome:
        extra = {"tools": record["tools"]} if record.get("tools") else {}
        try:
            return await client.chat(record["messages"], max_tokens=max_tokens, temperature=temperature, **extra)
        except ChatError as err:
            return err

    async def worker() -> None:
        for i in todo:
            record = records[i][1]
            results[i] = tuple(await asyncio.gather(one(strong, record), one(weak, record)))  # type: ignore[assignment]
            if on_done is not None:
                on_done()

    n_workers = max(1, min(len(records), 2 * max(strong.concurrency, weak.concurrency)))
    workers = [asyncio.ensure_future(worker()) for _ in range(n_workers)]
    try:
        await asyncio.gather(*workers)
    except BaseException:  # e.g. AuthError: stop every worker before the clients close
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise
    finally:
        await strong.aclose()
        await weak.aclose()
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, also from a thread whose loop is already running (an async flow)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=contextvars.copy_context().run, args=(target,))  # keep the run context
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


DEFAULT_CONCURRENCY = 16  # requests in flight to an endpoint that says nothing of its own


def endpoint_concurrency(ep: Endpoint, given: int | None = None) -> int:
    """Requests in flight to ``ep``: the caller's figure, else what its server batches.

    A local server's figure (``Endpoint.concurrency``) also caps the caller's: more requests than it
    batches only queue in it. Worse, ``transformers serve`` without continuous batching (a
    deployment, or a model preftune's server cannot batch) starts a generation thread per request,
    so 32 requests to a one-at-a-time server oversubscribe the cores and starve a batching server
    beside it (pair generation at concurrency 32 ran at 52 tokens/s instead of 170 on 2 cores)."""
    if given is None:
        return ep.concurrency or DEFAULT_CONCURRENCY
    return min(given, ep.concurrency) if ep.concurrency else given


def new_pairs_path(out_dir: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path, n = out_dir / f"pairs-{stamp}.jsonl", 1
    while path.exists():
        path, n = out_dir / f"pairs-{stamp}-{n}.jsonl", n + 1
    return path


def _progress(total: int, show: bool | None) -> Any:
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if show is None else show
    return tqdm(total=total, desc="pairs", unit="prompt", disable=not show, file=sys.stderr)


def _ticker(bar: Any, total: int, on_progress: Callable[[int, int], None] | None) -> Callable[[], None]:
    """Called once per finished prompt: advance the terminal bar and tell the caller (done, total).
    Counted here, not read from the bar: a disabled tqdm bar does not count."""
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        bar.update(1)
        if on_progress is not None:
            on_progress(done, total)

    return tick


def generate_pairs(prompts_path: str | Path, strong: Endpoint, weak: Endpoint, out_dir: str | Path, *,
                   max_tokens: int = 256, temperature: float = 0.0, concurrency: int | None = None,
                   keep_truncated: bool = False, max_retries: int = 6, timeout: float = 60.0,
                   cache_dir: str | Path | None = None, progress: bool | None = None,
                   on_progress: Callable[[int, int], None] | None = None,
                   ledger: str | Path | None = None) -> dict:
    """Generate, filter and write the pairs; return the provenance (also in ``out_dir/provenance.json``).

    ``cache_dir`` defaults to ``out_dir/.cache/responses``: keep it and a re-run sends only what
    did not finish before. ``ledger`` (default ``out_dir/ledger.jsonl``) gets one line per paid request.
    ``concurrency`` is the requests in flight per endpoint; None: what a served local endpoint
    batches (``Endpoint.concurrency``), else ``DEFAULT_CONCURRENCY``.
    """
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
    prompts_path, out_dir = Path(prompts_path), Path(out_dir)
    records, sha = load_prompt_records(prompts_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else out_dir / ".cache" / "responses"
    book = Ledger(Path(ledger) if ledger is not None else out_dir / LEDGER_FILE, "pairs")
    clients = {side: ChatClient(ep, concurrency=endpoint_concurrency(ep, concurrency), max_retries=max_retries,
                                timeout=timeout, cache_dir=cache, ledger=book)
               for side, ep in (("strong", strong), ("weak", weak))}
    t0 = time.perf_counter()
    with contextlib.closing(_progress(len(records), progress)) as bar:
        outcomes = _run(complete_all(records, clients["strong"], clients["weak"], max_tokens=max_tokens,
                                     temperature=temperature, on_done=_ticker(bar, len(records), on_progress)))
    wall = time.perf_counter() - t0

    pairs, dropped = [], []
    counts = dict.fromkeys(REASONS, 0)
    for (line, record), (s, w) in zip(records, outcomes, strict=True):
        why = drop_reason(s, w, keep_truncated)
        if why is None:
            pairs.append(make_pair(record, s.text, w.text))  # type: ignore[union-attr]
            continue
        counts[why[0]] += 1
        dropped.append({"line": line, "prompt_hash": prompt_hash(record["messages"], record.get("tools")),
                        "reason": why[0], "detail": why[1]})
    pairs_path = new_pairs_path(out_dir)
    write_jsonl_atomic(pairs_path, pairs)
    provenance = _provenance(prompts_path, sha, pairs_path, clients, records, pairs, counts, dropped, wall,
                             {"max_tokens": max_tokens, "temperature": temperature,
                              "concurrency": {side: c.concurrency for side, c in clients.items()},
                              "keep_truncated": keep_truncated, "max_retries": max_retries,
                              "timeout_s": timeout})
    write_json_atomic(out_dir / "provenance.json", provenance)
    return provenance


def _provenance(prompts_path: Path, sha: str | None, pairs_path: Path, clients: dict[str, ChatClient],
                records: list, pairs: list, counts: dict[str, int], dropped: list[dict], wall: float,
                sampling: dict[str, Any]) -> dict:
    usage = {side: c.usage_report() for side, c in clients.items()}
    costs = [u.get("cost_usd") for u in usage.values()]  # an unpriced side makes the total unknown
    return {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "method": "delta learning: strong = preferred, weak = non-preferred",
        "prompts_file": str(prompts_path.resolve()), "prompts_sha256": sha,
        "pairs_file": str(pairs_path.resolve()),
        "models": {side: c.endpoint.model for side, c in clients.items()},
        "endpoints": {side: c.endpoint.public() for side, c in clients.items()},
        "sampling": sampling,
        "counts": {"prompts": len(records), "pairs": len(pairs), "dropped": len(dropped), "by_reason": counts},
        "usage": usage,
        "cost_usd": None if None in costs else round(sum(costs), 6),  # this call's; all calls': the ledger
        "wall_time_s": round(wall, 3),
        "dropped": dropped,
    }


# ---- the flow's phase 3 -------------------------------------------------------------------
def check_generators(spec: RunSpec, inspection: dict) -> None:
    """Prompts-only data needs both generators; checked before the plan is shown."""
    if inspection["format"] == "prompts" and (spec.strong is None or spec.weak is None):
        raise RunEnded("failed", "the dataset holds prompts only: pair generation needs a strong and a weak "
                       "model (RunSpec strong/weak; `--strong`, `--weak`)")


def _split_by_test_prompts(pairs_file: Path, ws: Workspace) -> dict:
    """Generated pairs follow phase 1's split: a pair is test iff its prompt was a test prompt."""
    test_hashes = {prompt_hash(r["messages"], r.get("tools")) for _, r in iter_records(ws.test_data)}
    counts = {"train_pairs": 0, "test_pairs": 0}
    with open(ws.train_pairs, "w", encoding="utf-8") as tr, open(ws.test_pairs, "w", encoding="utf-8") as te:
        for _, rec in iter_records(pairs_file, expect="pairs"):
            test = prompt_hash(rec["input"]["messages"], rec["input"].get("tools")) in test_hashes
            (te if test else tr).write(json.dumps(rec, ensure_ascii=False) + "\n")
            counts["test_pairs" if test else "train_pairs"] += 1
    return {"train": str(ws.train_pairs), "test": str(ws.test_pairs), "counts": counts}


def run_data(ws: Workspace) -> dict:
    """The run's {"train", "test"} pair files: generated ones once phase 3 finished, else phase 1's split."""
    return finished_pairs(ws) or {"train": str(ws.train_data), "test": str(ws.test_data)}


def finished_pairs(ws: Workspace) -> dict | None:
    """Phase 3's record (pairs/done.json) when it and the pair files it names are as it wrote them;
    else None (one log line): the phase runs again, its paid replies read back from its cache."""
    again = "pair generation runs again (paid replies come from its cache)"
    done = read_sealed_json(ws.pairs_done, again)
    if done is None:
        return None
    for path, digest in done.get("files_sha256", {}).items():
        if not Path(path).is_file() or file_sha256(path) != digest:
            return stale(path, "is missing or changed since pair generation wrote it", again)
    return done


def pairs_phase(spec: RunSpec, ws: Workspace, inspection: dict,
                on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Training and held-out pair files: phase 1's split for pairs; delta-learning pairs for prompts."""
    done = None if inspection["format"] == "pairs" else finished_pairs(ws)
    if inspection["format"] == "pairs" or done is not None:  # done before: a re-run does not regenerate
        return done or run_data(ws)
    prompts = ws.data_dir / "prompts_all.jsonl"
    with open(prompts, "w", encoding="utf-8") as out:
        for path, limit in zip((ws.train_data, ws.test_data), prompt_quota(spec, inspection), strict=True):
            with open(path, encoding="utf-8") as src:
                for _, line in zip(range(limit), src, strict=False):
                    out.write(line)
    with contextlib.ExitStack() as stack:
        strong, weak = resolve_run_endpoints([spec.strong, spec.weak], log_dir=ws.logs_dir, stack=stack)
        try:
            provenance = generate_pairs(prompts, strong, weak, ws.pairs_dir, max_tokens=spec.pair_max_tokens,
                                        temperature=0.0, keep_truncated=spec.keep_truncated,
                                        cache_dir=ws.pairs_dir / "cache", progress=False, on_progress=on_progress,
                                        ledger=ws.ledger)
        except AuthError as err:  # a refused key: the run ends with that one line
            raise RunEnded("failed", str(err)) from None
    if provenance["counts"]["pairs"] < 3:
        raise RunEnded("failed", f"only {provenance['counts']['pairs']} usable pairs were generated "
                       f"(dropped: {provenance['counts']['by_reason']}); see pairs/provenance.json")
    split = _split_by_test_prompts(Path(provenance["pairs_file"]), ws)
    c = provenance["counts"]
    # What the yield guard (flows/questions.check_pair_yield) and the report's Yields section read.
    pair_yield = {"prompts": c["prompts"], "pairs": c["pairs"], "share": c["pairs"] / max(c["prompts"], 1),
                  "by_reason": c["by_reason"], **split.pop("counts")}
    result = split | {"pairs_file": provenance["pairs_file"], "yield": pair_yield}
    files = (ws.train_pairs, ws.test_pairs, Path(provenance["pairs_file"]))
    return write_sealed_json(ws.pairs_done, result | {"files_sha256": {str(p): file_sha256(p) for p in files}})
