"""Continuous batching (preftune/batching.py) against the model computing each prompt alone, and
its server (preftune/batchserve.py) through the real ``openai`` client.

The reference is the plainest greedy decoder there is: the whole sequence through the model at
every step, no cache, no padding. The engine must give the same tokens while rows of different
lengths share a padded cache, join mid-flight, retire out of order and start from a shared prefix.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from preftune.backends import BATCHED_CONCURRENCY
from preftune.batching import MIN_PREFIX, Cancelled, Engine, EngineDead, Request, _Slab
from preftune.keys import read_key_file
from preftune.server import serve_local


@pytest.fixture(scope="module")
def tiny(zoo):
    from transformers import AutoModelForCausalLM

    from preftune.hf import load_tokenizer

    path = zoo["models"]["tiny-llama"]
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), load_tokenizer(path)


def alone(model, prompt: list[int], max_tokens: int, eos: set[int]) -> tuple[list[int], str]:
    """Greedy decoding of one prompt, recomputing the whole sequence every step."""
    ids, out = list(prompt), []
    with torch.inference_mode():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token in eos:
                return out, "stop"
            out.append(token)
            ids.append(token)
    return out, "length"


def run(engine: Engine, reqs: list[Request], *, later: list[Request] = (), after: int = 3) -> None:
    """Drive the engine in this thread: ``reqs`` now, ``later`` after ``after`` steps."""
    for r in reqs:
        engine.submit(r)
    steps = 0
    while engine.rows or engine._queue or later:
        if steps == after:
            for r in later:
                engine.submit(r)
            later = []
        engine.step()
        steps += 1


@pytest.mark.parametrize("rows", [4, 8])  # admission at each free row / once 2 rows are free
def test_batched_rows_equal_each_prompt_alone(tiny, rows):
    model, tok = tiny
    eos = {tok.eos_token_id}
    shared = tok("You are a careful assistant. Answer briefly, plainly and in full sentences.")["input_ids"]
    assert len(shared) >= MIN_PREFIX + 4
    first = [shared + tok(f" Question {i}: what is {'a long ' * (i % 4)}thing {i}?")["input_ids"]
             for i in range(7)]
    # The second wave shares only part of the kept prefix (it is shortened), or none of it.
    second = [shared[:MIN_PREFIX + 2] + tok(f" Different {i}")["input_ids"] for i in range(3)] + \
        [tok("Hi")["input_ids"]]  # under MIN_PREFIX tokens: no prefix of its own
    budgets = [5, 30, 12, 70, 1, 22, 9, 17, 40, 26, 11]  # 70 outgrows a cache buffer's first room
    reqs = [Request(p, n) for p, n in zip(first + second, budgets, strict=True)]
    engine = Engine(model, eos, max_rows=rows)
    assert engine.admit_min == rows // 4
    run(engine, reqs[:7], later=reqs[7:], after=5)
    for r in reqs:
        assert r.done.is_set() and r.error is None
        assert (r.tokens, r.finish_reason) == alone(model, r.prompt, r.max_tokens, eos)
        assert r.generated == len(r.tokens) + (r.finish_reason == "stop")
    assert engine.rows == [] and engine._cache is None
    assert MIN_PREFIX <= len(engine._prefix) <= MIN_PREFIX + 2  # kept, then shortened to what was shared
    assert engine._prefix == shared[:len(engine._prefix)]


def test_a_long_answer_grows_the_cache_in_place(tiny):
    model, tok = tiny
    prompt = tok("Tell me a long story.")["input_ids"]
    req = Request(prompt, _Slab.ROOM * 2 + 5)
    engine = Engine(model, eos_ids=set())  # no end token: it runs to max_tokens
    run(engine, [req])
    assert (req.tokens, req.finish_reason) == alone(model, prompt, req.max_tokens, set())
    assert req.finish_reason == "length" and len(req.tokens) == _Slab.ROOM * 2 + 5


def test_sampling_follows_temperature_top_p_and_seed(tiny):
    model, tok = tiny
    prompt = tok("Say something.")["input_ids"]
    greedy = Request(prompt, 20)
    narrow = Request(prompt, 20, temperature=1.0, top_p=1e-6)  # only the top token survives top_p
    seeded = [Request(prompt, 20, temperature=1.5, seed=s) for s in (7, 7, 8)]
    run(Engine(model, set()), [greedy, narrow, *seeded])
    assert narrow.tokens == greedy.tokens
    assert seeded[0].tokens == seeded[1].tokens  # the same seed, the same draw
    assert seeded[0].tokens != greedy.tokens and seeded[2].tokens != seeded[0].tokens


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(tiny):
    model, tok = tiny
    bad = Request([model.config.vocab_size + 5], 4)  # no such token: the embedding lookup fails
    engine = Engine(model, {tok.eos_token_id})
    run(engine, [bad])
    assert bad.done.is_set() and isinstance(bad.error, IndexError)
    good = Request(tok("Hello")["input_ids"], 6)
    run(engine, [good])
    assert good.error is None and (good.tokens, good.finish_reason) == alone(model, good.prompt, 6,
                                                                               {tok.eos_token_id})
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit(Request([1, 2], 0))


# -- the server ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(zoo, tmp_path_factory):
    handle = serve_local(zoo["models"]["tiny-llama"], tmp_path_factory.mktemp("logs"))
    with handle:
        yield handle


def test_a_runs_local_server_is_preftunes_batching_server(served):
    argv = served.log_path.read_text().splitlines()[0]
    assert f"{sys.executable} -m preftune.batchserve " in argv and "--rows 32" in argv
    assert "--threads 1" in argv  # a tiny model: one thread, the cores left to the real model beside it
    assert served.endpoint().concurrency == BATCHED_CONCURRENCY


def test_openai_client_answers_concurrently_as_one_at_a_time(served, tiny):
    client = openai.OpenAI(base_url=served.base_url, api_key=read_key_file(served.key_file))
    questions = [f"Question {i}: what is thing {i}?" for i in range(8)]

    def ask(q: str):
        return client.chat.completions.create(model=served.model, max_tokens=24,
                                              messages=[{"role": "user", "content": q}])

    one_by_one = [ask(q) for q in questions]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, questions))
    assert [r.choices[0].message.content for r in together] == [r.choices[0].message.content for r in one_by_one]
    _, tok = tiny
    for q, r in zip(questions, one_by_one, strict=True):
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
        assert r.usage.prompt_tokens == len(prompt)
        assert r.choices[0].finish_reason in ("stop", "length") and 0 < r.usage.completion_tokens <= 24
        assert r.usage.completion_tokens == 24 or r.choices[0].finish_reason == "stop"
    assert client.models.list().data[0].id == served.model


@pytest.mark.parametrize("change, message", [
    ({"model": "another"}, "this server serves"),
    ({"stream": True}, "streaming is not supported"),
    ({"n": 2}, "n > 1"),
    ({"max_tokens": 0}, "at least 1"),
    ({"max_tokens": 10**6}, "exceeds the model's context"),
    ({"messages": []}, "non-empty list"),
    ({"temperature": -1}, "temperature must be"),
    ({"top_p": 0}, "top_p must be"),
    ({"seed": "abc"}, "seed must be an integer"),
    # Fields it used to ignore silently: an answer that did not do what was asked.
    ({"stop": ["\n"]}, "not supported by this server (a run's generation server): stop"),
    ({"logprobs": True, "top_logprobs": 2}, "not supported by this server (a run's generation server): logprobs, "
                                            "top_logprobs"),
    ({"response_format": {"type": "json_object"}}, "not supported by this server (a run's generation server): "
                                                    "response_format"),
    ({"frequency_penalty": 0.5, "presence_penalty": 1}, "not supported by this server (a run's generation server): "
                                                         "frequency_penalty, presence_penalty"),
    ({"temperature": float("inf")}, "temperature must be a number from 0 to 2"),
    ({"temperature": 3}, "temperature must be a number from 0 to 2"),
])
def test_bad_requests_get_a_400_that_says_why(served, change, message):
    body = {"model": served.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **change}
    r = httpx.post(f"{served.base_url}/chat/completions", content=json.dumps(body), timeout=30,  # json: Infinity
                   headers={**auth(served), "Content-Type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"]["message"]
    assert httpx.get(f"http://127.0.0.1:{served.port}/health").json()["status"] == "ok"


def auth(handle) -> dict[str, str]:
    return {"Authorization": f"Bearer {read_key_file(handle.key_file)}"}


def test_no_key_or_a_wrong_key_is_401_and_the_no_op_values_pass(served):
    body = {"model": served.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    url = f"{served.base_url}/chat/completions"
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    assert httpx.post(url, json=body, timeout=30, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(f"{served.base_url}/models", timeout=30).status_code == 401
    assert oct(served.key_file.stat().st_mode & 0o777) == "0o600"
    assert read_key_file(served.key_file) not in served.log_path.read_text()  # not in its logged argv
    # Sent at their no-op values, the fields it does not support change nothing: accepted.
    quiet = {**body, "stop": None, "logprobs": False, "frequency_penalty": 0, "user": "me"}
    assert httpx.post(url, json=quiet, timeout=30, headers=auth(served)).status_code == 200


def test_a_json_list_body_is_a_400_not_a_dropped_connection(served):
    # Before: AttributeError ('list' object has no attribute 'get') and the connection dropped.
    r = httpx.post(f"{served.base_url}/chat/completions", content=b"[]", timeout=30,
                   headers={**auth(served), "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "the body must be a JSON object, not list"


def test_a_denormal_temperature_fails_no_other_request(served):
    """Before: 1e-320 divided the logits to inf, the softmax was NaN, multinomial raised, and every
    row of that step failed with it (2 of 4 other requests in the hostile pass)."""
    url = f"{served.base_url}/chat/completions"

    def ask(i: int) -> httpx.Response:
        temperature = 1e-320 if i == 0 else 0.8
        return httpx.post(url, timeout=120, headers=auth(served), json={
            "model": served.model, "messages": [{"role": "user", "content": f"question {i}"}],
            "max_tokens": 12, "temperature": temperature, "seed": i})

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(ask, range(5)))
    assert [r.status_code for r in replies] == [200] * 5
    assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in replies)
    # Below MIN_TEMPERATURE it decodes greedily: the answer equals temperature 0's.
    greedy = httpx.post(url, timeout=60, headers=auth(served), json={
        "model": served.model, "messages": [{"role": "user", "content": "question 0"}], "max_tokens": 12})
    assert replies[0].json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]


def serve_engine(engine: Engine, tok, key: str = "k"):
    """preftune.batchserve's handler in this process over ``engine`` (a test drives its faults)."""
    from http.server import ThreadingHTTPServer

    from preftune.batchserve import Model, handler

    model = Model.__new__(Model)  # the folder's load is what __init__ adds; the engine is given
    model.name, model.tok, model.context, model.engine = "m", tok, 512, engine
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(model, key))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def test_a_client_that_disconnects_is_dropped_from_the_batch(tiny):
    """Before: the server computed an abandoned request to its max_tokens. Here the engine has no
    end token, so a request runs to max_tokens unless it is dropped."""
    model, tok = tiny
    engine = Engine(model, set(), max_rows=4)
    engine.start()
    url, server = serve_engine(engine, tok)
    try:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "a long story"}],
                           "max_tokens": 480}).encode()
        with socket.create_connection(("127.0.0.1", server.server_address[1])) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer k\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.monotonic() + 60
            while httpx.get(f"{url}/health").json()["rows"] == 0:
                assert time.monotonic() < deadline, "the request never started"
                time.sleep(0.02)
        deadline = time.monotonic() + 60
        while (health := httpx.get(f"{url}/health").json())["dropped"] == 0:
            assert time.monotonic() < deadline, "the abandoned request was not dropped"
            time.sleep(0.05)
        assert health == {"status": "ok", "rows": 0, "queued": 0, "dropped": 1}
        # The server goes on answering others.
        r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer k"}, timeout=60,
                       json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        server.shutdown()


def test_a_row_whose_sampling_fails_fails_alone(tiny):
    """A NaN temperature (the door refuses it; here it reaches the engine) makes that row's
    sampling raise: before, every row of the step failed with it."""
    model, _ = tiny
    engine = Engine(model, set(), max_rows=8)
    good = [Request([1, 5, 6, 7 + i], 6, temperature=0.7, seed=i) for i in range(4)]
    bad = Request([1, 9, 9], 6, temperature=float("nan"))
    run(engine, [*good, bad])
    assert bad.error is not None and "probability tensor" in str(bad.error)
    assert [(r.error, len(r.tokens)) for r in good] == [(None, 6)] * 4


def test_cancelled_requests_stop_early_and_the_others_finish(tiny):
    model, _ = tiny
    engine = Engine(model, set(), max_rows=4)  # no end token: every row runs to max_tokens
    keep, drop, queued = Request([1, 5, 6], 40), Request([1, 7, 8], 40), Request([1, 2, 3], 40)
    for r in (keep, drop):
        engine.submit(r)
    for _ in range(3):
        engine.step()
    drop.cancelled = queued.cancelled = True
    engine.submit(queued)
    run(engine, [])
    # 3 steps: the first prefills (one token) and decodes (another), then one token a step.
    assert isinstance(drop.error, Cancelled) and len(drop.tokens) == 4
    assert isinstance(queued.error, Cancelled) and queued.tokens == []
    assert keep.error is None and len(keep.tokens) == 40 and engine.dropped == 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected fault
def test_health_is_503_once_the_model_thread_is_gone(tiny):
    """The engine's thread ends on an error its step does not contain (injected here as the step
    raising SystemExit): /health must say so, and a waiting request must not wait for ever."""
    model, tok = tiny
    engine = Engine(model, set(), max_rows=4)

    def fatal() -> None:
        raise SystemExit("injected")

    engine.step = fatal
    url, server = serve_engine(engine, tok)
    try:
        assert httpx.get(f"{url}/health").status_code == 200
        waiting = engine.submit(Request([1, 2, 3], 4))
        engine.start().join(timeout=30)
        assert isinstance(waiting.error, EngineDead) and "SystemExit: injected" in str(waiting.error)
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "model thread gone"
        r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer k"}, timeout=30,
                       json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 503 and "model thread is gone" in r.json()["error"]["message"]
    finally:
        server.shutdown()
