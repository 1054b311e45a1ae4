"""The "marker" pairs (plain helpers, shared by the trainer's tests and bench/bench_real_learns.py):
the preferred answer is a corpus answer opening with MARKER, the non-preferred one the same answer
without it, so the only thing a preference can teach is to open with the marker."""

from __future__ import annotations

import json

from preftune.zoo import CORPUS_PATH as CORPUS

MARKER = "Sure!"


def corpus_chats(split: str) -> list[list[dict]]:
    """Chat records of the zoo corpus (``train`` or ``heldout``), each a message list."""
    chats = []
    with open(CORPUS, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec["split"] == split and "messages" in rec and rec["messages"][-1]["role"] == "assistant":
                chats.append(rec["messages"])
    return chats


def marker_pair(chat: list[dict]) -> dict:
    answer = chat[-1]["content"]
    return {"input": {"messages": chat[:-1]},
            "preferred_output": [{"role": "assistant", "content": f"{MARKER} {answer}"}],
            "non_preferred_output": [{"role": "assistant", "content": answer}]}
