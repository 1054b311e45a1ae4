"""Dataset records: streaming validation of JSONL files and conversion to canonical records.

Accepted formats (one file = one format, decided by the first valid record):

* ``openai``  — OpenAI/Fireworks pairs: ``{"input": {"messages": [...], "tools": [...]?},
  "preferred_output": [assistant msg], "non_preferred_output": [assistant msg]}`` (canonical).
* ``trl``     — TRL ``{"prompt", "chosen", "rejected"}``, each a string or a message list. A string
  prompt becomes one user message; for message-list chosen/rejected the final assistant message is
  the output and any preceding turns belong to the prompt (TRL's "implicit prompt" form).
* ``prompts`` — prompts only: ``{"messages": [system?/user...]}`` with no final assistant turn.

Every line is checked; each problem is kept with its 1-based line number. Speed matters (millions
of lines), so checks are hand-written over ``json.loads`` output instead of a pydantic model per line.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from preftune.errors import UserError

MIN_EXAMPLES = 3
MAX_EXAMPLES = 3_000_000
MAX_LISTED = 20  # problems listed to the user; the rest are only counted
ROLES = ("system", "user", "assistant")

FORMAT_KEYS = {
    "openai": ("input", "preferred_output", "non_preferred_output"),
    "trl": ("prompt", "chosen", "rejected"),
    "prompts": ("messages",),
}
FORMAT_NAMES = {"openai": "OpenAI/Fireworks pairs", "trl": "TRL prompt/chosen/rejected",
                "prompts": "prompts-only"}
PAIR_FORMATS = ("openai", "trl")
OPENAI_KEYS = frozenset(FORMAT_KEYS["openai"])
FORMAT_KEYSETS = {fmt: frozenset(keys) for fmt, keys in FORMAT_KEYS.items()}


class DatasetError(UserError):
    """Bad lines in a dataset. ``str()`` is the first problem (``path:line: message``).

    ``errors`` holds the first ``MAX_LISTED`` problems as ``(line, message)`` — ``line`` is None for
    a problem with the file as a whole (e.g. too few examples); ``total`` counts all of them.
    """

    def __init__(self, path: str | Path, errors: list[tuple[int | None, str]], total: int):
        self.errors = list(errors)
        self.total = total
        line, message = self.errors[0]
        super().__init__(message, path=path, line=line)

    def __reduce__(self) -> tuple:  # picklable (Prefect may persist a task's exception)
        return (type(self), (self.path, self.errors, self.total))

    def lines(self) -> list[str]:
        """The listed problems, one ``path:line: message`` each, then ``... and N more``."""
        out = []
        for line, message in self.errors:
            where = f"{self.path}:{line}" if line is not None else f"{self.path}"
            out.append(f"{where}: {message}")
        if self.total > len(self.errors):
            out.append(f"... and {self.total - len(self.errors)} more problems ({self.total} in all)")
        return out


class _Bad(Exception):
    """One line's problem (internal; collected into a DatasetError)."""


def check_dataset_path(path: str | Path) -> None:
    """Raise UserError unless ``path`` is a regular file we can open (never opens it: a FIFO would block)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError("dataset file not found", path=path) from None
    except OSError as err:
        raise UserError(f"cannot read dataset: {err.strerror}", path=path) from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError("is a directory, not a dataset file", path=path)
    if not stat.S_ISREG(st.st_mode):
        raise UserError("not a regular file (a FIFO, socket or device); give a JSONL file", path=path)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """``object_pairs_hook`` of the slow path: a JSON object may not repeat a key."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Bad(f"duplicate key {json.dumps(key, ensure_ascii=False)} in one JSON object")
            seen.add(key)
    return obj


_strict_loads = json.JSONDecoder(object_pairs_hook=_unique_keys).decode
def _load_line(text: str) -> Any:
    """``json.loads`` with every way a line can break the decoder turned into a one-line problem.

    A repeated key in one object is an error too (``_unique_keys``, ~0.3 µs an object: measured
    cheaper than the text pre-checks tried that would let a line skip it).
    """
    try:
        return _strict_loads(text)
    except json.JSONDecodeError as err:
        raise _Bad(f"invalid JSON: {err.msg} (column {err.colno})") from None
    except RecursionError:
        raise _Bad("invalid JSON: nested too deeply") from None
    except ValueError as err:  # Python's int-string limit (sys.get_int_max_str_digits)
        if "digits" in str(err):
            raise _Bad(f"invalid JSON: number too large (more than {sys.get_int_max_str_digits():,} digits)") from None
        raise _Bad(f"invalid JSON: {err}") from None


def _check_text(obj: Any) -> None:
    """Raise for a lone surrogate (``"\\ud800"``): it decodes, but no text with it can be written as UTF-8."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise _Bad(f"invalid text: lone surrogate \\u{ord(err.object[err.start]):04x} "
                   "(a \\uD800-\\uDFFF escape without its pair)") from None
    except RecursionError:
        raise _Bad("invalid JSON: nested too deeply") from None


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _check_fields(obj: dict, required: tuple[str, ...], where: str, optional: tuple[str, ...] = ()) -> None:
    """Raise for a missing required field, suggesting an unknown field that looks like a misspelling.

    Unknown fields are otherwise ignored (datasets often carry ids or scores we don't need).
    """
    for name in required:
        if name in obj:
            continue
        known = set(required) | set(optional)
        unknown = [k for k in obj if k not in known and isinstance(k, str)]
        close = difflib.get_close_matches(name, unknown, n=1, cutoff=0.75)
        if close:
            raise _Bad(f'unknown field "{where}{close[0]}" (did you mean "{where}{name}"?)')
        raise _Bad(f'missing field "{where}{name}"')


def _messages(value: Any, where: str) -> list[dict]:
    """Validate a message list; return it as plain ``{"role", "content"}`` dicts."""
    if type(value) is not list:
        raise _Bad(f'"{where}" must be a list of messages, got {_type(value)}')
    if not value:
        raise _Bad(f'"{where}" is an empty list')
    out = []
    for i, msg in enumerate(value):
        # Fast path for a well-formed message; anything else goes to _message_problem for the exact error.
        if type(msg) is dict:
            content = msg.get("content")
            if msg.get("role") in ROLES and type(content) is str and content and not content.isspace():
                out.append(msg if len(msg) == 2 else {"role": msg["role"], "content": content})
                continue
        _message_problem(msg, f"{where}[{i}]")
    return out


def _message_problem(msg: Any, where: str) -> None:
    if type(msg) is not dict:
        raise _Bad(f'"{where}" must be a message object, got {_type(msg)}')
    role = msg.get("role")
    content = msg.get("content")
    if role is None or (content is None and "content" not in msg):
        _check_fields(msg, ("role", "content"), f"{where}.")
    if role not in ROLES:
        shown = json.dumps(role) if isinstance(role, str) else _type(role)
        raise _Bad(f'"{where}.role" is {shown}; expected "system", "user" or "assistant"')
    if type(content) is not str:
        raise _Bad(f'"{where}.content" must be a string, got {_type(content)}')
    raise _Bad(f'"{where}.content" is empty')


def _prompt_end(messages: list[dict], where: str) -> None:
    last = messages[-1]["role"]
    if last == "assistant":
        raise _Bad(f'"{where}" ends with an assistant turn; the outputs must be the last assistant message')
    if last != "user":
        raise _Bad(f'"{where}" ends with a {last} turn; it must end with a user turn')


def _output(value: Any, where: str) -> list[dict]:
    if type(value) is list and len(value) == 1 and type(value[0]) is dict:  # fast path
        msg = value[0]
        content = msg.get("content")
        if msg.get("role") == "assistant" and type(content) is str and content and not content.isspace():
            return value if len(msg) == 2 else [{"role": "assistant", "content": content}]
    msgs = _messages(value, where)
    if len(msgs) != 1:
        raise _Bad(f'"{where}" must hold exactly one assistant message, got {len(msgs)} messages')
    if msgs[0]["role"] != "assistant":
        raise _Bad(f'"{where}[0].role" is "{msgs[0]["role"]}"; the output must be an assistant message')
    return msgs


def _tools(value: Any, where: str) -> list:
    if type(value) is not list:
        raise _Bad(f'"{where}" must be a list, got {_type(value)}')
    return value


def _pair(prompt: list[dict], tools: list | None, chosen: list[dict], rejected: list[dict]) -> dict:
    if chosen[0]["content"] == rejected[0]["content"]:
        raise _Bad("preferred and non-preferred outputs are identical")
    inp: dict[str, Any] = {"messages": prompt}
    if tools:
        inp["tools"] = tools
    return {"input": inp, "preferred_output": chosen, "non_preferred_output": rejected}


def _convert_openai(obj: dict) -> dict:
    if not OPENAI_KEYS <= obj.keys():
        _check_fields(obj, FORMAT_KEYS["openai"], "")
    inp = obj["input"]
    if type(inp) is not dict:
        raise _Bad(f'"input" must be an object, got {_type(inp)}')
    if "messages" not in inp:
        _check_fields(inp, ("messages",), "input.", optional=("tools",))
    prompt = _messages(inp["messages"], "input.messages")
    _prompt_end(prompt, "input.messages")
    tools = _tools(inp["tools"], "input.tools") if inp.get("tools") is not None else None
    chosen = _output(obj["preferred_output"], "preferred_output")
    rejected = _output(obj["non_preferred_output"], "non_preferred_output")
    return _pair(prompt, tools, chosen, rejected)


def _trl_side(value: Any, where: str) -> tuple[list[dict], list[dict]]:
    """(preceding turns, [final assistant message]) of a TRL chosen/rejected value."""
    if type(value) is str:
        if not value.strip():
            raise _Bad(f'"{where}" is empty')
        return [], [{"role": "assistant", "content": value}]
    if type(value) is not list:
        raise _Bad(f'"{where}" must be a string or a list of messages, got {_type(value)}')
    msgs = _messages(value, where)
    if msgs[-1]["role"] != "assistant":
        raise _Bad(f'"{where}" must end with an assistant message, got {msgs[-1]["role"]}')
    return msgs[:-1], msgs[-1:]


def _convert_trl(obj: dict) -> dict:
    required = FORMAT_KEYS["trl"] if "prompt" in obj or not _implicit_prompt(obj) else ("chosen", "rejected")
    _check_fields(obj, required, "")
    pre_c, chosen = _trl_side(obj["chosen"], "chosen")
    pre_r, rejected = _trl_side(obj["rejected"], "rejected")
    if pre_c != pre_r:
        raise _Bad('"chosen" and "rejected" have different turns before their final assistant message')
    prompt_value = obj.get("prompt")
    if prompt_value is None:
        prompt = []
    elif type(prompt_value) is str:
        if not prompt_value.strip():
            raise _Bad('"prompt" is empty')
        prompt = [{"role": "user", "content": prompt_value}]
    elif type(prompt_value) is list:
        prompt = _messages(prompt_value, "prompt")
    else:
        raise _Bad(f'"prompt" must be a string or a list of messages, got {_type(prompt_value)}')
    prompt = prompt + pre_c
    if not prompt:
        raise _Bad('missing field "prompt"')
    _prompt_end(prompt, "prompt")
    return _pair(prompt, obj.get("tools") if type(obj.get("tools")) is list else None, chosen, rejected)


def _implicit_prompt(obj: dict) -> bool:
    """TRL's implicit-prompt form: no "prompt" field, the prompt is inside chosen/rejected lists."""
    chosen = obj.get("chosen")
    return type(chosen) is list and len(chosen) > 1 and not any(
        difflib.get_close_matches("prompt", [k for k in obj if isinstance(k, str)], n=1, cutoff=0.75))


def _convert_prompts(obj: dict) -> dict:
    _check_fields(obj, ("messages",), "", optional=("tools",))
    messages = _messages(obj["messages"], "messages")
    _prompt_end(messages, "messages")
    out: dict[str, Any] = {"messages": messages}
    if obj.get("tools") is not None:
        out["tools"] = _tools(obj["tools"], "tools")
    return out


CONVERTERS = {"openai": _convert_openai, "trl": _convert_trl, "prompts": _convert_prompts}


def classify(obj: dict) -> str | None:
    """The format an object's keys point to (exact or close field names), or None."""
    keys = [k for k in obj if isinstance(k, str)]
    best, best_score = None, 0
    for fmt, names in FORMAT_KEYS.items():
        score = sum(1 for n in names if n in obj or difflib.get_close_matches(n, keys, n=1, cutoff=0.75))
        if score > best_score:
            best, best_score = fmt, score
    return best


class RecordReader:
    """Stream a JSONL dataset: ``for line, record in reader`` yields canonical records.

    Every line is validated; problems are collected and, once the file is read, raised together as
    one ``DatasetError``. After iteration: ``format``, ``sha256`` (of the file's bytes), ``count``.
    ``expect`` is ``"pairs"`` or ``"prompts"`` to restrict the formats accepted.
    """

    def __init__(self, path: str | Path, expect: str | None = None,
                 min_examples: int = MIN_EXAMPLES, max_examples: int = MAX_EXAMPLES):
        self.path = Path(path)
        self.expect = expect
        self.min_examples = min_examples
        self.max_examples = max_examples
        self.format: str | None = None
        self.format_line: int | None = None
        self.sha256: str | None = None
        self.count = 0
        self.errors: list[tuple[int | None, str]] = []
        self.total_errors = 0

    def _error(self, line: int | None, message: str) -> None:
        self.total_errors += 1
        if len(self.errors) < MAX_LISTED:
            self.errors.append((line, message))

    def _record(self, text: str) -> dict:
        obj = _load_line(text)
        if "\\ud" in text or "\\uD" in text:  # a surrogate can only come from an escape (strict UTF-8)
            _check_text(obj)
        if type(obj) is not dict:
            raise _Bad(f"expected a JSON object, got {_type(obj)}")
        fmt = self.format
        if fmt is None or obj.keys().isdisjoint(FORMAT_KEYSETS[fmt]):
            found = classify(obj)
            if found is None:
                raise _Bad('not a recognised record: expected "input"/"preferred_output"/'
                           '"non_preferred_output" (pairs), "prompt"/"chosen"/"rejected" (TRL) '
                           'or "messages" (prompts only)')
            if fmt is not None and found != fmt:
                raise _Bad(f"record is in {FORMAT_NAMES[found]} format, but this file is "
                           f"{FORMAT_NAMES[fmt]} (from line {self.format_line}); one file must be one format")
            fmt = found
        record = CONVERTERS[fmt](obj)
        if self.format is None:
            self._set_format(fmt)
        return record

    def _set_format(self, fmt: str) -> None:
        kind = "pairs" if fmt in PAIR_FORMATS else "prompts"
        if self.expect is not None and kind != self.expect:
            raise UserError(f"expected a {self.expect} dataset, but this file is {FORMAT_NAMES[fmt]} "
                            f"(line {self._line})", path=self.path, line=self._line)
        self.format, self.format_line = fmt, self._line

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        digest = hashlib.sha256()
        update, record_of = digest.update, self._record  # bound once: this loop runs millions of times
        self._line = line = 0
        check_dataset_path(self.path)
        try:
            fh = open(self.path, "rb")
        except OSError as err:
            raise UserError(f"cannot read dataset: {err.strerror}", path=self.path) from None
        with fh:
            for raw in fh:
                update(raw)
                self._line = line = line + 1
                if line == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if raw.isspace() or not raw:
                    continue
                try:
                    record = record_of(raw.decode("utf-8"))
                except UnicodeDecodeError as err:
                    self._error(line, f"invalid UTF-8 at byte {err.start + 1} of the line")
                    continue
                except _Bad as bad:
                    self._error(line, str(bad))
                    continue
                self.count += 1
                if self.count > self.max_examples:
                    self._error(None, f"more than {self.max_examples:,} examples (the limit)")
                    break
                yield line, record
        self.sha256 = digest.hexdigest() if self.count <= self.max_examples else None
        self._finish()

    def _finish(self) -> None:
        if self.total_errors == 0 and self.count < self.min_examples:
            self._error(None, f"{self.count} valid examples; at least {self.min_examples} are needed")
        if self.total_errors:
            raise DatasetError(self.path, self.errors, self.total_errors)


# The 3..3,000,000 limit is the intake rule for a user's dataset (RecordReader's default, applied by
# `inspect`). The loaders below also read files the pipeline wrote itself — a small test split may
# hold one or two records — so they take any count unless asked otherwise.


def iter_records(path: str | Path, expect: str | None = None, *,
                 min_examples: int = 0) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, canonical record)``; raise DatasetError at the end if any line was bad."""
    yield from RecordReader(path, expect=expect, min_examples=min_examples)


def load_pairs(path: str | Path, *, min_examples: int = 0) -> list[dict]:
    """All canonical pair records of an OpenAI/Fireworks or TRL file (UserError naming file:line)."""
    return [rec for _, rec in RecordReader(path, expect="pairs", min_examples=min_examples)]


def load_prompts(path: str | Path, *, min_examples: int = 0) -> list[dict]:
    """All canonical prompt records ``{"messages": [...], "tools"?}`` of a prompts-only file."""
    return [rec for _, rec in RecordReader(path, expect="prompts", min_examples=min_examples)]


def prompt_of(record: dict) -> tuple[list[dict], list | None]:
    """(messages, tools) of a canonical pair or prompt record."""
    inp = record.get("input", record)
    return inp["messages"], inp.get("tools")


def prompt_hash(messages: list[dict], tools: list | None = None) -> str:
    """sha256 of a canonical JSON of the prompt (roles, contents, tools): stable across machines."""
    canon = {"messages": [{"role": m["role"], "content": m["content"]} for m in messages],
             "tools": tools or []}
    text = json.dumps(canon, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def validate_files(*paths: str | Path | None) -> None:
    """Read every line of each dataset once (None skipped): a missing file or a bad line is one
    UserError before anything else happens (`preftune run` exits 2; a run started from the UI fails
    with that line before it asks a person anything). Only reads."""
    for path in filter(None, paths):
        for _ in iter_records(path, min_examples=3):
            pass
