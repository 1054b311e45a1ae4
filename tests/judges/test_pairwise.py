"""Both-order judging through the real client against a real local HTTP judge (StubServer)."""

from __future__ import annotations

import asyncio
import re

from preftune.client import ChatClient
from preftune.endpoint import Endpoint
from preftune.judges import stats
from preftune.judges.pairwise import PairItem, combine, judge_items, position_summary
from preftune.judges.verdict import Verdict
from tests.stub_server import Reply, StubRequest, StubServer

BLOCK = re.compile(r"=====BEGIN RESPONSE ([AB]) (FENCE-\w+)=====\n(.*?)\n=====END RESPONSE \1 \2=====", re.S)


def responses(req: StubRequest) -> dict[str, str]:
    return {m.group(1): m.group(3) for m in BLOCK.finditer(req.last_user)}


def position_a_judge(req: StubRequest) -> Reply:
    """Prefers whatever sits in position A — unless B is EXCELLENT; answers garbage for 'GARBLE'
    in A, and a non-retryable HTTP 400 when B says 'REFUSE'."""
    r = responses(req)
    if "REFUSE" in r["B"]:
        return Reply(status=400, text="bad request")
    if "GARBLE" in r["A"]:
        return Reply(text="I cannot decide. [[A?B]]")
    if "EXCELLENT" in r["B"]:
        return Reply(text="B is excellent.\nFinal verdict: [[B>A]]")
    return Reply(text="A came first, so I like it.\nFinal verdict: [[A>B]]")


def items() -> list[PairItem]:
    conv = [{"role": "user", "content": "Say something."}]
    out = [PairItem(f"k{i}", conv, f"candidate {i}" + (" EXCELLENT" if i < 3 else ""), f"base {i}")
           for i in range(10)]
    out.append(PairItem("garbled", conv, "candidate GARBLE", "base x"))
    out.append(PairItem("refused", conv, "candidate y", "base REFUSE"))
    return out


def run_judge(url: str, cache_dir=None) -> tuple[list[dict], dict]:
    client = ChatClient(Endpoint(base_url=url, model="judge"), concurrency=8, max_retries=1,
                        cache_dir=cache_dir)

    async def go() -> list[dict]:
        async with client:
            return await judge_items(client, "- be helpful", items())
    return asyncio.run(go()), client.usage.as_dict()


def test_position_bias_shows_per_order_and_cancels_when_combined(tmp_path) -> None:
    with StubServer(position_a_judge) as srv:
        records, usage = run_judge(srv.base_url, tmp_path / "cache")
        assert len(srv.requests) == 24  # 12 comparisons × 2 orders, no retries on 400
        assert all(r["temperature"] == 0.0 for r in srv.requests)
    by_key = {r["key"]: r for r in records}
    # raw verdicts: position A wins almost everywhere, in both orders
    assert by_key["k5"]["verdict_candidate_first"] == "A>B"
    assert by_key["k5"]["verdict_baseline_first"] == "A>B"
    assert by_key["k5"]["outcome"] == "tie"  # the two orders disagree → tie
    assert by_key["k0"]["verdict_candidate_first"] == "A>B"  # EXCELLENT candidate in A
    assert by_key["k0"]["verdict_baseline_first"] == "B>A"  # EXCELLENT candidate in B
    assert by_key["k0"]["outcome"] == "win"
    assert by_key["garbled"]["outcome"] == "invalid" and by_key["garbled"]["verdict_candidate_first"] == "invalid"
    assert "no unambiguous" in by_key["garbled"]["error"]
    assert by_key["refused"]["outcome"] == "invalid" and "judge request failed" in by_key["refused"]["error"]
    assert by_key["k1"]["candidate_length"] == len("candidate 1 EXCELLENT")
    assert by_key["k1"]["baseline_length"] == len("base 1")

    pos = position_summary(records)
    # valid single judgments: 10 items × 2 + 1 valid order of 'garbled' ('refused': the
    # candidate-first order sends B = base REFUSE → 400; the other order is valid)
    assert pos["position_a_preferred"] == 19 and pos["position_b_preferred"] == 3
    assert pos["position_consistency"] == 0.3  # only the 3 EXCELLENT items agree across orders

    r = stats.win_rate([x["outcome"] for x in records])
    assert (r["wins"], r["ties"], r["losses"], r["invalid"]) == (3, 7, 0, 2)
    assert r["win_rate"] == (3 + 3.5) / 10  # the A-bias became ties, not wins
    assert usage["failed"] == 1 and usage["succeeded"] == 23


def test_rerun_is_served_from_the_cache(tmp_path) -> None:
    with StubServer(position_a_judge) as srv:
        first, _ = run_judge(srv.base_url, tmp_path / "cache")
        n = len(srv.requests)
        second, usage = run_judge(srv.base_url, tmp_path / "cache")
        # only the refused request (errors are not cached) and the garbled reply (a reply without a
        # verdict is not a final answer: asked again, a bounded number of times) go out again
        assert len(srv.requests) - n == 2
    assert usage["cache_hits"] == 22
    assert [r["outcome"] for r in first] == [r["outcome"] for r in second]


def test_combine_rules() -> None:
    V = Verdict
    assert combine(V.A_MUCH_BETTER, V.B_BETTER) == "win"
    assert combine(V.B_BETTER, V.A_MUCH_BETTER) == "loss"
    assert combine(V.A_BETTER, V.A_BETTER) == "tie"  # disagree
    assert combine(V.TIE, V.TIE) == "tie"
    assert combine(V.A_BETTER, V.TIE) == "tie"
    assert combine(V.INVALID, V.B_BETTER) == "invalid"
    assert combine(V.A_BETTER, V.INVALID) == "invalid"
