"""Continuous batching (preftune/batching.py) against the model computing each prompt alone, and
its server (preftune/batchserve.py) through the real ``openai`` client.

The reference is the plainest greedy decoder there is: the whole sequence through the model at
every step, no cache, no padding. The engine must give the same tokens while rows of different
lengths share a padded cache, join mid-flight, retire out of order and start from a shared prefix.
"""

from __future__ import annotations

import concurrent.futures
import sys

import httpx
import openai
import pytest
import torch

from preftune.batching import MIN_PREFIX, Engine, Request, _Slab
from preftune.server import BATCHED_CONCURRENCY, serve_local


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
    client = openai.OpenAI(base_url=served.base_url, api_key="unused")
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
])
def test_bad_requests_get_a_400_that_says_why(served, change, message):
    body = {"model": served.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **change}
    r = httpx.post(f"{served.base_url}/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and message in r.json()["error"]["message"]
    assert httpx.get(f"http://127.0.0.1:{served.port}/health").json() == {"status": "ok"}

