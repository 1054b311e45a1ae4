"""The append-only response cache: what a re-run can read back, and what a crash can cost."""

from __future__ import annotations

import json
from pathlib import Path

from preftune.endpoint import Endpoint
from preftune.response_cache import ResponseCache, request_key

EP = Endpoint(base_url="http://127.0.0.1:9/v1", model="m")


def key(text: str) -> str:
    return request_key(EP, [{"role": "user", "content": text}], {"max_tokens": 8})


def test_a_reopened_cache_reads_back_every_reply(tmp_path: Path) -> None:
    first = ResponseCache(tmp_path)
    for i in range(50):
        first.put(key(f"q{i}"), {"text": f"answer {i} — ünïcode", "finish_reason": "stop"})
    assert first.get(key("q7"))["text"] == "answer 7 — ünïcode"  # from its own open segment
    first.close()
    again = ResponseCache(tmp_path)
    assert len(again) == 50
    assert [again.get(key(f"q{i}"))["text"] for i in (0, 49)] == ["answer 0 — ünïcode", "answer 49 — ünïcode"]
    assert again.get(key("never asked")) is None
    assert len(list(tmp_path.glob("seg-*.log"))) == 1  # one file for 50 replies, not 50 files


def test_two_writers_keep_separate_segments_and_a_third_sees_both(tmp_path: Path) -> None:
    a, b = ResponseCache(tmp_path), ResponseCache(tmp_path)
    a.put(key("from a"), {"text": "A"})
    b.put(key("from b"), {"text": "B"})
    assert len(list(tmp_path.glob("seg-*.log"))) == 2
    both = ResponseCache(tmp_path)
    assert (both.get(key("from a"))["text"], both.get(key("from b"))["text"]) == ("A", "B")


def test_a_line_torn_by_a_crash_is_a_miss_and_the_rest_survive(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path)
    cache.put(key("kept"), {"text": "kept"})
    cache.put(key("torn"), {"text": "torn"})
    cache.close()
    seg = next(tmp_path.glob("seg-*.log"))
    data = seg.read_bytes()
    seg.write_bytes(data[: len(data) - 9])  # the crash cut the last line short
    again = ResponseCache(tmp_path)
    assert again.get(key("kept"))["text"] == "kept"
    assert again.get(key("torn")) is None
    again.put(key("torn"), {"text": "sent again"})  # the re-run pays once more, then it is cached
    assert ResponseCache(tmp_path).get(key("torn"))["text"] == "sent again"


def test_a_line_whose_key_does_not_match_its_body_is_a_miss(tmp_path: Path) -> None:
    good, other = key("good"), key("other")
    body = json.dumps({"key": other, "text": "belongs elsewhere"})
    (tmp_path / "seg-manual.log").write_text(f"{good}\t{body}\n")
    assert ResponseCache(tmp_path).get(good) is None


def test_a_reply_edited_in_the_cache_is_a_miss(tmp_path: Path) -> None:
    """Before: an edited reply text was served from the cache (issue 21: an edited pair-cache text
    was used after pairs/done.json was removed). The line's own sha256 no longer matches."""
    cache = ResponseCache(tmp_path)
    cache.put(key("a"), {"text": "the model's answer"})
    cache.put(key("b"), {"text": "another answer"})
    cache.close()
    seg = next(tmp_path.glob("seg-*.log"))
    seg.write_text(seg.read_text().replace("the model's answer", "an answer someone wrote"))
    again = ResponseCache(tmp_path)
    assert again.get(key("a")) is None
    assert again.get(key("b")) == {"key": key("b"), "text": "another answer"}


def test_a_reply_in_the_old_unsealed_layout_is_a_miss(tmp_path: Path) -> None:
    """The old layout (a file per reply, no seal) cannot tell a reply from a planted one: it was sealed
    as read and believed, so a text written there became a preferred answer. Now it is not read."""
    k = key("q")
    (tmp_path / k[:2]).mkdir()
    (tmp_path / k[:2] / f"{k}.json").write_text(json.dumps({"key": k, "text": "planted", "finish_reason": "stop"}))
    assert ResponseCache(tmp_path).get(k) is None
