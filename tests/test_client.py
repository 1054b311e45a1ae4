"""ChatClient against real HTTP servers on 127.0.0.1 with scripted faults (StubServer)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import time
from pathlib import Path

import pytest

from preftune.client import AuthError, ChatClient, ChatError, parse_retry_after, request_key
from preftune.endpoint import Endpoint
from preftune.errors import UserError
from preftune.ledger import Ledger, read_ledger
from tests.stub_server import Reply, StubRequest, StubServer, recording_server

USER = [{"role": "user", "content": "hello"}]


def msgs(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def run(coro):
    return asyncio.run(coro)


async def _chat(client: ChatClient, text: str, **kw):
    try:
        return await client.chat(msgs(text), **kw)
    finally:
        await client.aclose()


def fast_client(srv: StubServer, **kw) -> ChatClient:
    kw.setdefault("backoff_base", 0.001)
    kw.setdefault("backoff_max", 0.01)
    return ChatClient(Endpoint(base_url=srv.base_url, model="stub-model"), **kw)


# -- retries ---------------------------------------------------------------------------------------
def test_5xx_retried_until_success_and_counted():
    def handler(req: StubRequest) -> Reply:
        return Reply(status=500 if req.attempt < 3 else 200, text="ok after two 500s")

    with StubServer(handler) as srv:
        client = fast_client(srv)
        result = run(_chat(client, "x"))
        assert (result.text, result.attempts, result.cached) == ("ok after two 500s", 3, False)
        assert len(srv.requests) == 3
        assert client.usage.requests == 3 and client.usage.retries == 2 and client.usage.succeeded == 1


def test_429_retry_after_seconds_is_honoured():
    def handler(req: StubRequest) -> Reply:
        if req.attempt == 1:
            return Reply(status=429, headers={"Retry-After": "0.4"})
        return Reply(text="now")

    with StubServer(handler) as srv:
        # Backoff alone would wait <= 1 ms: the elapsed time shows the header was obeyed.
        client = fast_client(srv)
        t0 = time.perf_counter()
        result = run(_chat(client, "x"))
        elapsed = time.perf_counter() - t0
        assert result.text == "now" and result.attempts == 2
        assert elapsed >= 0.4


def test_retry_after_parsing_seconds_date_and_cap():
    assert parse_retry_after({"retry-after": "3"}, cap=60) == 3.0
    assert parse_retry_after({"retry-after": "1000"}, cap=20) == 20.0
    assert parse_retry_after({"retry-after-ms": "250"}, cap=60) == 0.25
    assert parse_retry_after({"retry-after": "soon"}, cap=60) is None
    assert parse_retry_after({}, cap=60) is None
    future = email.utils.formatdate(time.time() + 10, usegmt=True)
    waited = parse_retry_after({"retry-after": future}, cap=60)
    assert 8.0 <= waited <= 10.0
    past = email.utils.formatdate(time.time() - 100, usegmt=True)
    assert parse_retry_after({"retry-after": past}, cap=60) == 0.0


def test_timeout_malformed_and_dropped_connection_are_retried():
    def handler(req: StubRequest) -> Reply:
        fault = req.last_user
        if req.attempt == 1 and fault == "stall":
            return Reply(delay=3.0, text="too late")
        if req.attempt == 1 and fault == "malformed":
            return Reply(raw_body='{"choices": [')
        if req.attempt == 1 and fault == "nochoices":
            return Reply(raw_body='{"object": "chat.completion"}')
        if req.attempt == 1 and fault == "drop":
            return Reply(drop=True)
        return Reply(text=f"fine {fault}")

    with StubServer(handler) as srv:
        for fault in ("stall", "malformed", "nochoices", "drop"):
            client = fast_client(srv, timeout=0.5)
            t0 = time.perf_counter()
            result = run(_chat(client, fault))
            assert (result.text, result.attempts) == (f"fine {fault}", 2), fault
            assert client.usage.retries == 1
            if fault == "stall":  # the first attempt waited for its 0.5 s deadline, not for the 3 s reply:
                # "fine stall" on attempt 2 above, never the stalled "too late"
                assert time.perf_counter() - t0 >= 0.5


def test_gives_up_after_max_retries_with_reason():
    with StubServer(lambda req: Reply(raw_body="<html>oops</html>")) as srv:
        client = fast_client(srv, max_retries=3)
        with pytest.raises(ChatError) as info:
            run(_chat(client, "x"))
        assert info.value.reason == "malformed" and info.value.attempts == 4
        assert len(srv.requests) == 4
        assert client.usage.failed == 1 and client.usage.requests == 4 and client.usage.retries == 3


def test_a_request_that_keeps_failing_names_the_failure():
    def handler(req: StubRequest) -> Reply:
        return Reply(drop=True) if req.last_user == "drop" else Reply(delay=3.0, text="too late")

    with StubServer(handler) as srv:
        for fault, reason in (("drop", "connection"), ("stall", "timeout")):
            with pytest.raises(ChatError) as info:
                run(_chat(fast_client(srv, max_retries=1, timeout=1.0), fault))
            assert (info.value.reason, info.value.attempts) == (reason, 2), fault


def test_client_error_is_not_retried():
    with StubServer(lambda req: Reply(status=400, text="unknown parameter foo")) as srv:
        client = fast_client(srv)
        with pytest.raises(ChatError) as info:
            run(_chat(client, "x"))
        assert info.value.reason == "http 400" and info.value.status == 400 and info.value.attempts == 1
        assert "unknown parameter foo" in str(info.value)
        assert len(srv.requests) == 1


# -- concurrency, usage, cache -----------------------------------------------------------------
def test_concurrency_limit_is_exact():
    state = {"now": 0, "peak": 0}

    async def handler(req: StubRequest) -> Reply:
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.03)
        state["now"] -= 1
        return Reply(text="ok")

    async def go(client: ChatClient):
        out = await client.chat_many([msgs(f"p{i}") for i in range(24)])
        await client.aclose()
        return out

    with StubServer(handler) as srv:
        results = run(go(fast_client(srv, concurrency=4)))
        assert [r.text for r in results] == ["ok"] * 24
        assert state["peak"] == 4


def test_usage_sums_tokens_from_responses():
    def handler(req: StubRequest) -> Reply:
        n = int(req.last_user)
        return Reply(text="a b", prompt_tokens=10 + n, completion_tokens=n)

    async def go(client):
        out = await client.chat_many([msgs(str(i)) for i in range(5)], max_tokens=8)
        await client.aclose()
        return out

    with StubServer(handler) as srv:
        client = fast_client(srv)
        results = run(go(client))
        assert [r.completion_tokens for r in results] == [0, 1, 2, 3, 4]
        assert client.usage.as_dict() == {"requests": 5, "succeeded": 5, "failed": 0, "bad_replies": 0, "retries": 0,
                                          "cache_hits": 0, "prompt_tokens": 60, "completion_tokens": 10}
        assert "cost_usd" not in client.usage_report()  # unpriced remote: unknown, never $0
        priced = ChatClient(Endpoint(base_url=srv.base_url, model="m", price_input_per_m=2.0,
                                     price_output_per_m=10.0))
        priced.usage = client.usage
        assert priced.usage_report()["cost_usd"] == pytest.approx((60 * 2.0 + 10 * 10.0) / 1e6, rel=1e-12)


def test_rerun_is_served_from_cache_with_zero_requests(tmp_path: Path):
    def handler(req: StubRequest) -> Reply:
        return Reply(text=f"answer to {req.last_user}", finish_reason="length" if req.last_user == "p2" else "stop")

    async def go(client):
        out = await client.chat_many([msgs(f"p{i}") for i in range(6)], max_tokens=16)
        await client.aclose()
        return out

    with StubServer(handler) as srv:
        first = run(go(fast_client(srv, cache_dir=tmp_path)))
        assert len(srv.requests) == 6
        again = fast_client(srv, cache_dir=tmp_path)
        second = run(go(again))
        assert len(srv.requests) == 6  # nothing new was sent
        assert [r.text for r in second] == [r.text for r in first]
        assert [r.finish_reason for r in second] == ["stop", "stop", "length", "stop", "stop", "stop"]
        assert all(r.cached and r.attempts == 0 for r in second)
        assert again.usage.cache_hits == 6 and again.usage.requests == 0 and again.usage.prompt_tokens == 0
        # A different sampling parameter is a different request: it is sent.
        third = run(_chat(fast_client(srv, cache_dir=tmp_path), "p0", max_tokens=17))
        assert not third.cached and len(srv.requests) == 7


def test_failed_requests_are_not_cached(tmp_path: Path):
    calls = {"n": 0}

    def handler(req: StubRequest) -> Reply:
        calls["n"] += 1
        return Reply(status=503) if calls["n"] == 1 else Reply(text="second time lucky")

    with StubServer(handler) as srv:
        with pytest.raises(ChatError):
            run(_chat(fast_client(srv, cache_dir=tmp_path, max_retries=0), "x"))
        result = run(_chat(fast_client(srv, cache_dir=tmp_path, max_retries=0), "x"))
        assert result.text == "second time lucky" and not result.cached


def test_request_key_depends_on_what_determines_the_reply():
    ep = Endpoint(base_url="http://h/v1", model="m")
    base = request_key(ep, USER, {"max_tokens": 5, "temperature": 0.0})
    assert base == request_key(Endpoint(base_url="http://h/v1/", model="m", api_key_env="K"), USER,
                               {"temperature": 0.0, "max_tokens": 5})
    assert base != request_key(ep, USER, {"max_tokens": 6, "temperature": 0.0})
    assert base != request_key(Endpoint(base_url="http://h/v1", model="m2"), USER, {"max_tokens": 5,
                                                                                   "temperature": 0.0})
    assert base != request_key(ep, msgs("hello!"), {"max_tokens": 5, "temperature": 0.0})


def test_chat_sync_works_across_event_loops():
    with StubServer(lambda req: Reply(text=req.last_user.upper())) as srv:
        client = fast_client(srv)
        assert client.chat_sync(msgs("one")).text == "ONE"
        assert client.chat_sync(msgs("two")).text == "TWO"


# -- endpoints and keys ------------------------------------------------------------------------
def test_endpoint_parse():
    ep = Endpoint.parse("gpt-4o-mini@https://api.openai.com/v1/", api_key_env="OPENAI_API_KEY")
    assert (ep.model, ep.base_url, ep.api_key_env) == ("gpt-4o-mini", "https://api.openai.com/v1", "OPENAI_API_KEY")
    ep = Endpoint.parse("org/model@v2@http://127.0.0.1:8000/v1")  # the last @ before http(s):// splits
    assert (ep.model, ep.base_url) == ("org/model@v2", "http://127.0.0.1:8000/v1")
    assert Endpoint.parse("user@example.org/model").is_local  # no URL after the @: a folder or bare name
    local = Endpoint.parse("/models/tiny")
    assert (local.model, local.base_url, local.cost(10**6, 10**6)) == ("/models/tiny", None, 0.0)
    with pytest.raises(UserError, match="MODEL@BASE_URL"):
        Endpoint.parse("@https://api.openai.com/v1")
    with pytest.raises(UserError, match="must be served first"):
        ChatClient(local)


def test_one_price_rule():
    remote = Endpoint.parse("m@http://h/v1")
    assert remote.cost(1000, 1000) is None  # unpriced: unknown, not free
    assert remote.model_copy(update={"price_input_per_m": 2.0}).cost(10**6, 10**6) == 2.0
    both = remote.model_copy(update={"price_input_per_m": 2.0, "price_output_per_m": 8.0})
    assert both.cost(500_000, 250_000) == pytest.approx(3.0)


def test_key_is_sent_but_never_logged_written_or_raised(tmp_path, monkeypatch, caplog, capsys):
    secret = "sk-test-SECRET-9f8e7d6c5b4a"
    monkeypatch.setenv("PREFTUNE_TEST_KEY", secret)
    monkeypatch.setenv("OPENAI_LOG", "debug")
    caplog.set_level(logging.DEBUG)

    with recording_server() as (url, seen):
        ep = Endpoint(base_url=url, model="m", api_key_env="PREFTUNE_TEST_KEY")
        client = ChatClient(ep, cache_dir=tmp_path / "cache", ledger=Ledger(tmp_path / "ledger.jsonl", "t"))
        assert client.chat_sync(msgs("hi")).text == "m says hi"
    assert seen == [f"Bearer {secret}"]  # the key does reach the server

    # A server echoing the key in an error must not put it in our exception.
    with StubServer(lambda req: Reply(status=400, text=f"invalid key {secret}")) as srv:
        bad = ChatClient(Endpoint(base_url=srv.base_url, model="m", api_key_env="PREFTUNE_TEST_KEY"),
                         cache_dir=tmp_path / "cache")
        with pytest.raises(ChatError) as info:
            bad.chat_sync(msgs("x"))
        logging.getLogger("preftune.test").error("failed: %s", info.value)
    # A refused key (401): one line naming where the key lives, never the key.
    with StubServer(lambda req: Reply(status=401, text=f"invalid key {secret}")) as srv:
        refused = ChatClient(Endpoint(base_url=srv.base_url, model="m", api_key_env="PREFTUNE_TEST_KEY"),
                             cache_dir=tmp_path / "cache")
        with pytest.raises(AuthError) as auth:
            refused.chat_sync(msgs("x"))
        assert str(auth.value) == f"authentication failed for m at {srv.base_url}: check $PREFTUNE_TEST_KEY"
        logging.getLogger("preftune.test").error("failed: %s", auth.value)
    written = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    assert [e["endpoint"] for e in read_ledger(tmp_path / "ledger.jsonl")] == [f"m@{url}"]  # the paid "hi" only
    captured = capsys.readouterr()
    everything = "\n".join([caplog.text, captured.out, captured.err, written, str(info.value), str(auth.value),
                            repr(ep), str(ep), json.dumps(ep.public()), repr(client)])
    assert "invalid key <redacted>" in str(info.value)
    assert caplog.text  # debug logging really was on
    assert secret not in everything


def test_missing_key_env_is_a_user_error_naming_the_variable(monkeypatch):
    monkeypatch.delenv("PREFTUNE_NOT_SET", raising=False)
    client = ChatClient(Endpoint(base_url="http://127.0.0.1:9/v1", model="m", api_key_env="PREFTUNE_NOT_SET"))
    with pytest.raises(UserError, match="PREFTUNE_NOT_SET is not set"):
        client.chat_sync(USER)


def test_key_from_a_prefect_secret_block(prefect_api, tmp_path, caplog):
    from prefect.blocks.system import Secret

    secret = "sk-block-SECRET-0a1b2c3d4e"
    Secret(value=secret).save("preftune-test-key", overwrite=True)
    caplog.set_level(logging.DEBUG)
    with recording_server() as (url, seen):
        ep = Endpoint(base_url=url, model="m", api_key_block="preftune-test-key")
        assert ChatClient(ep, cache_dir=tmp_path).chat_sync(msgs("hi")).text == "m says hi"
    assert seen == [f"Bearer {secret}"]
    written = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    assert secret not in caplog.text + written + repr(ep)
    missing = ChatClient(Endpoint(base_url="http://127.0.0.1:9/v1", model="m", api_key_block="no-such-block"))
    with pytest.raises(UserError, match="no-such-block"):
        missing.chat_sync(msgs("x"))


# -- a local server preftune started: waited on, not timed out --------------------------------------
def test_local_server_request_waits_past_the_timeout_while_the_server_lives():
    """``server_pid`` set (a server preftune started): a reply slower than ``timeout`` is waited for,
    sent once; a remote endpoint with the same timeout gives up and sends again."""
    import os

    with StubServer(lambda req: Reply(text="slow but sure", delay=1.5)) as srv:
        local = ChatClient(Endpoint(base_url=srv.base_url, model="m", server_pid=os.getpid()), timeout=0.3,
                           max_retries=1, backoff_base=0.001)
        result = run(_chat(local, "x"))
        assert (result.text, result.attempts) == ("slow but sure", 1) and len(srv.requests) == 1
        remote = fast_client(srv, timeout=0.3, max_retries=1)
        with pytest.raises(ChatError) as info:
            run(_chat(remote, "y"))
        assert info.value.reason == "timeout" and len(srv.requests) == 3


def test_local_server_that_exits_fails_the_waiting_request_at_once():
    import subprocess
    import sys

    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # stands for its process
    try:
        with StubServer(lambda req: Reply(text="never", delay=600)) as srv:
            client = ChatClient(Endpoint(base_url=srv.base_url, model="m", server_pid=server.pid), timeout=0.2,
                                max_retries=6, backoff_base=0.001)

            async def go():
                asyncio.get_running_loop().call_later(0.5, server.kill)
                return await _chat(client, "x")

            with pytest.raises(ChatError) as info:
                run(go())
            assert info.value.reason == "server exited" and "has exited" not in str(info.value)
            assert len(srv.requests) == 1 and client.usage.failed == 1
            with pytest.raises(ChatError, match="has exited"):  # nothing more is sent to it
                run(_chat(client, "y"))
            assert len(srv.requests) == 1
    finally:
        server.kill()
        server.wait()


# -- replies within bounds (issue 21: Infinity -> OverflowError, negative -> "usd": -40.0, 10 MB accepted) ------
PRICED = {"price_input_per_m": 10.0, "price_output_per_m": 30.0}


def _priced_client(srv: StubServer, tmp_path: Path, **kw) -> ChatClient:
    return ChatClient(Endpoint(base_url=srv.base_url, model="m", **PRICED), backoff_base=0.001,
                      cache_dir=tmp_path / "cache", ledger=Ledger(tmp_path / "ledger.jsonl", "t"), **kw)


def _worst_usd(srv: StubServer, text: str, max_tokens: int) -> float:
    """The reservation of one request: prompt bound (its body's bytes + the template allowance) and max_tokens."""
    from preftune.client import PROMPT_ALLOWANCE

    body = json.dumps({"model": "m", "messages": msgs(text), "max_tokens": max_tokens, "temperature": 0.0},
                      ensure_ascii=False).encode()
    return ((len(body) + PROMPT_ALLOWANCE) * 10.0 + max_tokens * 30.0) / 1e6


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 5, "completion_tokens": float("inf")},  # sent as the JSON token Infinity
    {"prompt_tokens": 5, "completion_tokens": -40},
    {"prompt_tokens": -1_000_000, "completion_tokens": 3},
    {"prompt_tokens": 5, "completion_tokens": 200_000},  # above the request's max_tokens (16)
    {"prompt_tokens": 10**12, "completion_tokens": 3},  # above anything its prompt could be
    {"prompt_tokens": 5, "completion_tokens": "lots"},
    {"prompt_tokens": 5, "completion_tokens": 2.5},
    {"prompt_tokens": True, "completion_tokens": 3},
    [5, 3],
], ids=["infinity", "negative", "negative-prompt", "over-max-tokens", "over-prompt", "junk", "fraction", "bool",
        "list"])
def test_impossible_usage_is_a_bad_reply_never_billed_as_received(tmp_path, usage):
    with StubServer(lambda req: Reply(text="an answer", usage=usage)) as srv:
        client = _priced_client(srv, tmp_path)
        with pytest.raises(ChatError) as info:
            run(_chat(client, "q", max_tokens=16))
        assert len(srv.requests) == 1  # a bad reply is not asked again (each ask may be billed)
    assert info.value.reason == "bad reply" and ("is not a token count in 0.." in str(info.value)
                                               or "usage is a list, not an object" in str(info.value))
    assert client.usage.bad_replies == 1 and client.usage.failed == 1 and client.usage.completion_tokens == 0
    (entry,) = read_ledger(tmp_path / "ledger.jsonl")  # the reservation stands at its worst case: money may be gone
    assert entry["settled"] is False and entry["usd"] == pytest.approx(_worst_usd(srv, "q", 16))
    assert entry["completion_tokens"] == 16 and entry["usd"] > 0
    assert '"usd": -' not in (tmp_path / "ledger.jsonl").read_text()
    assert not list((tmp_path / "cache").rglob("*.json*"))  # nothing of it is kept


def test_usage_within_bounds_is_settled_at_its_price(tmp_path):
    with StubServer(lambda req: Reply(text="fine", prompt_tokens=7, completion_tokens=16)) as srv:
        client = _priced_client(srv, tmp_path)
        assert run(_chat(client, "q", max_tokens=16)).completion_tokens == 16  # exactly max_tokens is possible
    (entry,) = read_ledger(tmp_path / "ledger.jsonl")
    assert entry["settled"] is True and (entry["prompt_tokens"], entry["completion_tokens"]) == (7, 16)
    assert entry["usd"] == pytest.approx((7 * 10.0 + 16 * 30.0) / 1e6)
    kinds = [json.loads(x)["kind"] for x in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert kinds == ["reserved", "settled"]  # on record before it left, then settled


@pytest.mark.parametrize("no_length", [False, True], ids=["content-length", "until-close"])
def test_a_reply_over_the_size_limit_is_bad_and_nothing_of_it_is_stored(tmp_path, no_length):
    huge = "x" * 2_000_000  # 2 MB: over the default limit of 1 MB
    with StubServer(lambda req: Reply(text=huge, prompt_tokens=3, completion_tokens=3, no_length=no_length)) as srv:
        client = _priced_client(srv, tmp_path)
        with pytest.raises(ChatError) as info:
            run(_chat(client, "q", max_tokens=16))
        assert len(srv.requests) == 1
    assert info.value.reason == "bad reply" and "over the limit of 1,000,000" in str(info.value)
    assert client.usage.bad_replies == 1
    (entry,) = read_ledger(tmp_path / "ledger.jsonl")
    assert entry["settled"] is False  # it may have been billed: counted at its worst case
    stored = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert stored < 2_000  # the ledger's two lines; no cache entry, no trace of the body
    assert not list((tmp_path / "cache").rglob("*.json*"))


def test_an_http_error_releases_its_reservation(tmp_path):
    with StubServer(lambda req: Reply(status=400, text="bad request")) as srv:
        client = _priced_client(srv, tmp_path)
        with pytest.raises(ChatError):
            run(_chat(client, "q", max_tokens=16))
    assert read_ledger(tmp_path / "ledger.jsonl") == []  # refused by the server: nothing billed
    kinds = [json.loads(x)["kind"] for x in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert kinds == ["reserved", "released"]


def test_an_oversized_reply_cached_before_replies_were_bounded_is_asked_again(tmp_path):
    """A cache written by an earlier version holds a 3 MB reply for this request: it is not read back."""
    from preftune.response_cache import ResponseCache

    with StubServer(lambda req: Reply(text="a short answer")) as srv:
        client = _priced_client(srv, tmp_path)
        key = request_key(client.endpoint, msgs("q"), {"max_tokens": 16, "temperature": 0.0})
        old = ResponseCache(tmp_path / "cache")
        old.put(key, {"text": "x" * 3_000_000, "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1})
        old.close()
        client = _priced_client(srv, tmp_path)
        result = run(_chat(client, "q", max_tokens=16))
        assert (result.text, result.cached, len(srv.requests)) == ("a short answer", False, 1)
