"""Pairwise LLM judge: every comparison judged in both orders, at temperature 0, through
``preftune.client.ChatClient`` (which owns concurrency, retries, the on-disk cache and usage).

Combining the two orders (candidate in A, then candidate in B), from the candidate's side:
both valid and naming the same winner → win / loss; both tie → tie; orders that disagree → tie;
either order invalid (unparseable reply or failed request) → ``invalid``, counted and reported.

The fence token that delimits the untrusted data in the prompt is a hash of the rubric, the
conversation and both responses: unpredictable to whoever wrote a response (it depends on the
response itself), yet identical on a re-run so the client's cache answers it for free.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from preftune.judges.verdict import Verdict, parse_verdict
from preftune.templating import render

JUDGE_MAX_TOKENS = 512


class ChatLike(Protocol):
    async def chat(self, messages: list[dict], *, max_tokens: int = 256, temperature: float = 0.0,
                   accept: Any = None) -> Any: ...


@dataclass(frozen=True)
class PairItem:
    """One comparison: ``candidate`` against ``baseline`` as answers to ``messages``."""

    key: str
    messages: list[dict]
    candidate: str
    baseline: str
    candidate_cut: bool = False  # the answer stopped at the token limit: the judge is told, outside its fence
    baseline_cut: bool = False


def fence_token(*parts: str) -> str:
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()
    return f"FENCE-{digest[:24]}"


def judge_prompt(rubric: str, messages: list[dict], response_a: str, response_b: str,
                 cut: tuple[bool, bool] = (False, False)) -> tuple[list[dict], str]:
    """The chat messages for one judgment, and the fence token used in them. ``cut``: whether response
    A, B stopped at the token limit — said after its fence, where no response can forge it."""
    token = fence_token(rubric, json.dumps(messages, sort_keys=True), response_a, response_b)
    text = render("judge_pairwise.j2", rubric=rubric, conversation=messages,
                  response_a=response_a, response_b=response_b, boundary=token, cut_a=cut[0], cut_b=cut[1])
    return [{"role": "user", "content": text}], token


async def judge_once(client: ChatLike, rubric: str, messages: list[dict], response_a: str,
                     response_b: str, *, max_tokens: int = JUDGE_MAX_TOKENS,
                     cut: tuple[bool, bool] = (False, False)) -> dict:
    """One judgment: ``{"verdict": Verdict, "reply": str | None, "error": str | None}``."""
    from preftune.client import ChatError

    prompt, token = judge_prompt(rubric, messages, response_a, response_b, cut)
    try:
        # a reply without a valid verdict is not a final answer: the client's cache lets a later
        # run ask again (bounded), so fixing the judge fixes the run
        result = await client.chat(prompt, max_tokens=max_tokens, temperature=0.0,
                                   accept=lambda r: parse_verdict(r.text, boundary=token).is_valid)
    except ChatError as err:
        return {"verdict": Verdict.INVALID, "reply": None, "error": f"judge request failed: {err}"}
    verdict = parse_verdict(result.text, boundary=token)
    error = None
    if not verdict.is_valid:
        error = "no unambiguous [[verdict]] in the judge's reply"
        if result.finish_reason == "length":
            error += f" (cut off at max_tokens={max_tokens})"
    return {"verdict": verdict, "reply": result.text, "error": error}


def _sign(pref: int) -> int:
    return (pref > 0) - (pref < 0)


def combine(candidate_first: Verdict, baseline_first: Verdict) -> str:
    """Candidate-side outcome from the verdicts of both orders (module docstring)."""
    if not (candidate_first.is_valid and baseline_first.is_valid):
        return "invalid"
    first = _sign(candidate_first.preference)  # candidate sat in A
    second = -_sign(baseline_first.preference)  # candidate sat in B
    if first != second:
        return "tie"
    return {1: "win", 0: "tie", -1: "loss"}[first]


async def judge_item(client: ChatLike, rubric: str, item: PairItem, *,
                     max_tokens: int = JUDGE_MAX_TOKENS) -> dict:
    """Judge one comparison in both orders; the per-comparison record written to judgments."""
    ab, ba = await asyncio.gather(
        judge_once(client, rubric, item.messages, item.candidate, item.baseline, max_tokens=max_tokens,
                   cut=(item.candidate_cut, item.baseline_cut)),
        judge_once(client, rubric, item.messages, item.baseline, item.candidate, max_tokens=max_tokens,
                   cut=(item.baseline_cut, item.candidate_cut)))
    errors = [e for e in (ab["error"], ba["error"]) if e]
    return {
        "key": item.key,
        "verdict_candidate_first": ab["verdict"].value,
        "verdict_baseline_first": ba["verdict"].value,
        "outcome": combine(ab["verdict"], ba["verdict"]),
        "candidate_length": len(item.candidate),
        "baseline_length": len(item.baseline),
        "reply_candidate_first": ab["reply"],
        "reply_baseline_first": ba["reply"],
        "error": "; ".join(errors) or None,
    }


async def judge_items(client: ChatLike, rubric: str, items: Sequence[PairItem], *,
                      max_tokens: int = JUDGE_MAX_TOKENS, on_done: Callable[[], None] | None = None) -> list[dict]:
    """Judge all comparisons concurrently (the client caps in-flight requests); input order kept.
    `on_done` is called as each comparison is judged (progress)."""
    async def one(item: PairItem) -> dict:
        record = await judge_item(client, rubric, item, max_tokens=max_tokens)
        if on_done is not None:
            on_done()
        return record

    return list(await asyncio.gather(*(one(it) for it in items)))


def position_summary(records: Sequence[dict]) -> dict:
    """Raw per-position counts over single judgments (shows position bias before combining),
    and the share of comparisons whose two valid orders agree (position consistency)."""
    a_pref = b_pref = ties = consistent = both = 0
    for r in records:
        first, second = Verdict(r["verdict_candidate_first"]), Verdict(r["verdict_baseline_first"])
        for v in (first, second):
            if v.is_valid:
                s = _sign(v.preference)
                a_pref += s > 0
                b_pref += s < 0
                ties += s == 0
        if first.is_valid and second.is_valid:
            both += 1
            consistent += _sign(first.preference) == -_sign(second.preference)
    return {"position_a_preferred": int(a_pref), "position_b_preferred": int(b_pref),
            "position_ties": int(ties),
            "position_consistency": consistent / both if both else float("nan"), "position_pairs": int(both)}


def preferences(records: Sequence[dict]) -> tuple[list[int | None], list[int | None]]:
    """Position-A preferences of each order (None = invalid), for ``stats.judge_validity``."""
    ab = [Verdict(r["verdict_candidate_first"]).preference for r in records]
    ba = [Verdict(r["verdict_baseline_first"]).preference for r in records]
    return ab, ba
