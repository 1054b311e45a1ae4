"""Rubrics for the pairwise judge: the user's text, or one the judge writes from training pairs.

The auto rubric shows the judge a seeded sample of training pairs (templates/rubric_auto.j2,
fenced as untrusted data like the judge prompt) and asks what separates preferred from
non-preferred responses. The request is deterministic (same sample, temperature 0), so the client
cache answers a re-run. If the judge fails or replies with no bullet points, the bundled default
rubric (templates/rubric_default.j2) is used and the caller is told why.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from typing import Any

from preftune.templating import render

RUBRIC_MAX_TOKENS = 600


def default_rubric() -> str:
    return render("rubric_default.j2").strip()


def sample_pairs(pairs: Sequence[dict], k: int, seed: int) -> list[dict]:
    """``k`` canonical pair records, chosen reproducibly, as {messages, preferred, non_preferred}."""
    chosen = random.Random(seed).sample(list(pairs), min(k, len(pairs)))
    return [{"messages": p["input"]["messages"],
             "preferred": p["preferred_output"][-1]["content"],
             "non_preferred": p["non_preferred_output"][-1]["content"]} for p in chosen]


def rubric_prompt(sample: list[dict]) -> list[dict]:
    token = "FENCE-" + hashlib.sha256(json.dumps(sample, sort_keys=True).encode()).hexdigest()[:24]
    return [{"role": "user", "content": render("rubric_auto.j2", pairs=sample, boundary=token)}]


def clean_rubric(text: str) -> str:
    """Keep the bullet lines; a reply without any is not a rubric (returns "")."""
    bullets = [ln.strip() for ln in text.splitlines() if ln.strip().startswith(("- ", "* ", "• "))]
    bullets = [ln for ln in bullets if "[[" not in ln]  # a rubric must not carry verdict tokens
    return "\n".join("- " + ln[2:].strip() for ln in bullets)


async def auto_rubric(client: Any, pairs: Sequence[dict], *, sample: int, seed: int) -> tuple[str, str | None]:
    """(rubric text, None) from the judge, or (default rubric, why) when that did not work."""
    from preftune.client import ChatError

    if not pairs:
        return default_rubric(), "auto rubric: no training pairs to learn from; used the default rubric"
    try:
        reply = await client.chat(rubric_prompt(sample_pairs(pairs, sample, seed)),
                                  max_tokens=RUBRIC_MAX_TOKENS, temperature=0.0,
                                  accept=lambda r: bool(clean_rubric(r.text)))  # no bullets: ask again next run
    except ChatError as err:
        return default_rubric(), f"auto rubric: the judge failed ({err}); used the default rubric"
    rubric = clean_rubric(reply.text)
    if not rubric:
        return default_rubric(), "auto rubric: the judge's reply had no bullet points; used the default rubric"
    return rubric, None
