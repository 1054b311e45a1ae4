"""One Jinja2 environment over `templates/`: every prompt and report template lives there."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from preftune import fmt
from preftune.paths import TEMPLATES_DIR


def _num(value: float | None, digits: int = 3) -> str:
    """`num` is fmt.number at `digits` fixed places (3 unless given; integers as they are), never a
    false zero: a rate of 0.03 at one place is "0.03", not "0.0"."""
    return fmt.number(value, decimals=digits)


def token_tables(token_stats: dict, truncated: dict | None = None) -> list[dict]:
    """One token table per distinct tokenizer: models whose token counts and truncation agree on every
    field (two bases sharing a tokenizer) are one table naming them all."""
    groups: list[dict] = []
    for model, stats in token_stats.items():
        over = (truncated or {}).get(model, 0)
        name = model.rstrip("/").split("/")[-1]
        for group in groups:
            if group["stats"] == stats and group["truncated"] == over:
                group["models"].append(name)
                break
        else:
            groups.append({"models": [name], "stats": stats, "truncated": over})
    return groups


@lru_cache(maxsize=1)
def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES_DIR)), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["usd"] = fmt.usd
    env.filters["num"] = _num
    env.filters["sig"] = fmt.number  # significant digits: a beta of 0.1 is "0.1", 0.6640313809568231 "0.664"
    env.filters["rate"] = fmt.rate
    env.filters["duration"] = fmt.duration
    env.filters["percent"] = fmt.percent
    env.filters["token_tables"] = token_tables
    return env


def render(name: str, **context: Any) -> str:
    return environment().get_template(name).render(**context)
