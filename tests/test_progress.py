"""Progress a person watches: the flow's publisher sends what a phase reports, while it changes and
at least every refresh period, from its own thread; the last value always goes out on close."""

from __future__ import annotations

import threading
import time

from preftune.flows.pipeline import _Live


def test_live_publishes_changes_periodically_and_the_last_value_on_close():
    value = [0]
    published: list[int] = []
    arrived = threading.Event()

    def publish(v: int) -> None:
        published.append(v)
        arrived.set()

    live = _Live(lambda: value[0], publish, every=0.05)
    assert arrived.wait(30) and published == [0]  # the first refresh shows the start
    value[0] = 3
    deadline = time.monotonic() + 30
    while published[-1] != 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert published == [0, 3]  # unchanged values are not sent again
    value[0] = 7  # reported just before the phase ends: close() still sends it
    live.close()
    assert published[-1] == 7 and published.count(7) == 1
    assert not live.thread.is_alive()


def test_numbers_as_people_read_them():
    """fmt.number: significant digits, never a repr and never a false zero; ints with separators."""
    from preftune import fmt

    assert fmt.number(0.6640313809568231) == "0.664"
    assert fmt.number(12.345) == "12.3" and fmt.number(1234.5) == "1,234" and fmt.number(1.0) == "1"
    assert fmt.number(392) == "392" and fmt.number(1234567) == "1,234,567"
    assert fmt.number(0.03, decimals=1) == "0.03"  # samples/s of 0.03 is not "0.0"
    assert fmt.number(0.0, decimals=1) == "0.0" and fmt.number(2.25, decimals=1) == "2.2"
    assert fmt.number(None) == fmt.number(float("nan")) == "–"
    assert fmt.rate(3.14159) == "3.1/s" and fmt.rate(0.0312) == "0.031/s"
    assert fmt.usd(0.0) == "$0.00" and fmt.usd(1234.5) == "$1,234.50" and fmt.usd(0.0012) == "$0.0012"
    assert fmt.duration(8.4) == "8.4 s" and fmt.duration(125) == "2 min 05 s" and fmt.duration(3780) == "1 h 03 min"
    assert fmt.percent(0.42) == "42%" and fmt.percent(0.004) == "0.4%"


def test_a_progress_line_has_counts_rate_and_time_left():
    from preftune import fmt

    assert fmt.progress(118, 160, "prompts paired", 38.0) == "118/160 prompts paired, 3.1/s, ~14 s left"
    assert fmt.progress(160, 160, "prompts paired", 50.0) == "160/160 prompts paired, 3.2/s"
    assert fmt.progress(0, 160, "prompts paired", 5.0) == "0/160 prompts paired"


def test_one_token_table_per_distinct_tokenizer():
    """Two base models with the same tokenizer (same counts on every field) are one table naming both."""
    from preftune.templating import token_tables

    same = {"prompt": {"mean": 20.5, "p95": 40.0, "max": 50}}
    other = {"prompt": {"mean": 30.0, "p95": 60.0, "max": 70}}
    tables = token_tables({"/z/tiny-llama": same, "/z/tiny-qwen": dict(same), "/m/smol": other},
                          {"/z/tiny-llama": 2, "/z/tiny-qwen": 2, "/m/smol": 0})
    assert [(t["models"], t["truncated"]) for t in tables] == [(["tiny-llama", "tiny-qwen"], 2), (["smol"], 0)]


def test_the_heartbeat_says_what_the_run_does_how_far_and_for_how_long(capsys):
    from preftune.flows import cards

    before = cards.beat()  # a flow an earlier test left running in this process may hold its own
    with cards.heartbeat(every=0.05) as hb:
        cards.say("phase 3/7 pairs: generating preference pairs")
        cards.show_progress(lambda: "118/160 prompts paired, 3.1/s, ~14 s left")
        deadline = time.monotonic() + 30
        while "prompts paired" not in capsys.readouterr().err and time.monotonic() < deadline:
            time.sleep(0.05)
        line = hb.line()
    assert line.startswith("preftune [") and "]: phase 3/7 pairs: generating preference pairs, " in line
    assert line.endswith(" — 118/160 prompts paired, 3.1/s, ~14 s left")
    assert not hb.thread.is_alive() and cards.beat() is before
    assert cards.sweep_line([{"job": "a", "status": "finished", "step": 40}, {"job": "b", "status": "running", "step": 12},
                             {"job": "c", "status": "queued", "step": None}]) == "1/3 jobs finished; running: b (step 12)"
