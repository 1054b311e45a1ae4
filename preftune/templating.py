"""One Jinja2 environment over `templates/`: every prompt and report template lives there; and the
limits under which a model folder's chat template (someone else's code) is rendered."""

from __future__ import annotations

import ctypes
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, Template, TemplateError
from jinja2.exceptions import SecurityError

from preftune import fmt
from preftune.errors import UserError
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


# --- Chat templates from model folders -------------------------------------------------------------
# A model folder's chat template is code someone else wrote. transformers renders it in Jinja's
# immutable sandbox (no attribute of Python's internals, no mutation of the data); that stops what
# it reaches for, not how long it runs. So each render gets a deadline: one watchdog thread keeps
# {thread: deadline} and raises ChatTemplateTimeout in a thread still rendering past it (a
# template's loops are Python bytecode, so the exception lands within a few of them). A render only
# registers and clears its entry (about a microsecond: inspect renders every prompt of a dataset).
# What a single bytecode could do for ever (a string repeated 10^12 times, 10**10**10, "%*d" with a
# huge width) is refused before it is computed, by intercepting those operators; `lipsum` is removed.
RENDER_SECONDS = 5.0
MAX_ITEMS = 1_000_000  # the longest string or list one operator of a template may build
_deadlines: dict[int, float] = {}
_deadlines_lock = threading.Lock()
_watchdog: threading.Thread | None = None


class ChatTemplateTimeout(TemplateError):
    """A chat template rendered longer than RENDER_SECONDS (raised inside the rendering thread)."""


def _watch() -> None:
    while True:
        time.sleep(0.05)
        now = time.monotonic()
        with _deadlines_lock:
            for ident, deadline in list(_deadlines.items()):
                if now > deadline:
                    del _deadlines[ident]
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(ChatTemplateTimeout))


def _start(ident: int) -> None:
    global _watchdog
    with _deadlines_lock:
        if _watchdog is None:
            _watchdog = threading.Thread(target=_watch, name="preftune-template-watchdog", daemon=True)
            _watchdog.start()
        _deadlines[ident] = time.monotonic() + RENDER_SECONDS


def _stop(ident: int) -> None:
    with _deadlines_lock:  # the watchdog checks and raises under this lock: never after a render ended
        _deadlines.pop(ident, None)


class _TimedTemplate(Template):
    def render(self, *args: Any, **kwargs: Any) -> str:
        ident = threading.get_ident()
        _start(ident)
        try:
            return super().render(*args, **kwargs)
        finally:
            _stop(ident)

    def generate(self, *args: Any, **kwargs: Any) -> Iterator[str]:
        ident = threading.get_ident()
        _start(ident)
        try:
            yield from super().generate(*args, **kwargs)
        finally:
            _stop(ident)


_WIDE_FORMAT = re.compile(r"%[-+ #0]*(\*|\d{7,})|%[-+ #0\d]*\.(\*|\d{7,})")


def _checked_binop(call_binop):
    def call(context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "*":
            n, seq = (left, right) if isinstance(left, int) else (right, left)
            if isinstance(n, int) and isinstance(seq, str | list | tuple) and n * len(seq) > MAX_ITEMS:
                raise SecurityError(f"the template builds a value of {n * len(seq):,} items (limit {MAX_ITEMS:,})")
        elif op == "**" and isinstance(left, int) and isinstance(right, int) and abs(right) > 1024:
            raise SecurityError(f"the template raises a number to the power {right:,} (limit 1,024)")
        elif op == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
            raise SecurityError("the template formats with a computed or huge width")
        return call_binop(context, op, left, right)

    return call


def limit_chat_templates() -> None:
    """Make transformers compile every chat template (this process's, from now on) with the limits
    above. It compiles through ``chat_template_utils._compile_jinja_template`` (transformers 5.23),
    looked up at each render: we replace it with one that takes transformers' own sandboxed
    environment (its filters and globals: tojson, raise_exception, the tracker of `generation`
    blocks) and compiles the template there after adding the limits."""
    from transformers.utils import chat_template_utils as ctu

    if getattr(ctu._compile_jinja_template, "preftune_limited", False):
        return

    @lru_cache
    def compile_limited(chat_template: str) -> Template:
        env = ctu._cached_compile_jinja_template("").environment  # a fresh environment per template
        env.template_class = _TimedTemplate
        env.intercepted_binops = frozenset({"*", "**", "%"})  # read when the template is compiled
        env.call_binop = _checked_binop(env.call_binop)
        env.globals.pop("lipsum", None)
        return env.from_string(chat_template)

    compile_limited.preftune_limited = True  # type: ignore[attr-defined]
    ctu._compile_jinja_template = compile_limited


@contextmanager
def chat_template_errors(model: str | Path) -> Iterator[None]:
    """What a chat template does wrong, as one line naming the model folder (UserError, exit 2)."""
    try:
        yield
    except ChatTemplateTimeout:
        raise UserError(f"rendering its chat template took longer than {RENDER_SECONDS:g} s "
                        "(a loop that does not end?)", path=model) from None
    except SecurityError as err:
        raise UserError(f"its chat template was stopped by the sandbox: {_one_line(err)}", path=model) from None
    except TemplateError as err:
        raise UserError(f"its chat template refused to render: {_one_line(err)}", path=model) from None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__
