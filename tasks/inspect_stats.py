"""Phase 1 statistics: character and token lengths, turns and roles, kept in compact arrays.

Per example we keep a few 32-bit integers (characters, and tokens per model), never the text, so
memory grows by tens of bytes an example. Token counts use each model's own chat template, the same
rendering training and generation use: the prompt is ``template(prompt, add_generation_prompt=True)``
and a completion is the rest of ``template(prompt + [answer])`` after that text, tokenized on its own.
"""

from __future__ import annotations

from array import array
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from preftune.templating import chat_template_errors

FIELDS = ("prompt", "preferred", "non_preferred")


def _plain_backend(tokenizer: Any) -> Any:
    """The Rust tokenizer's batch encoder with truncation and padding off, or None (slow tokenizer).

    It gives the same ids as ``tokenizer(texts, add_special_tokens=False)`` without building a
    Python encoding object per text (faster on short texts; bench/bench_inspect.py).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_truncation()
    plain.no_padding()
    return getattr(plain, "encode_batch_fast", plain.encode_batch)  # fast: skips offsets


class TokenCounter:
    """Token lengths of prompts and completions under one model's chat template."""

    def __init__(self, name: str, tokenizer: Any, pairs: bool):
        self.name = name
        self.tok = tokenizer
        self.backend = _plain_backend(tokenizer)
        self.pairs = pairs
        self.lengths = {f: array("I") for f in (FIELDS if pairs else FIELDS[:1])}

    def _render(self, convs: list[list[dict]], tools: list[list | None], gen: bool) -> list[str]:
        with chat_template_errors(self.name):  # someone else's code: one line, not a traceback
            return self._render_all(convs, tools, gen)

    def _render_all(self, convs: list[list[dict]], tools: list[list | None], gen: bool) -> list[str]:
        plain = [i for i, t in enumerate(tools) if not t]
        out: list[str] = [""] * len(convs)
        if plain:  # one batched render for the (usual) records without tools
            texts = self.tok.apply_chat_template([convs[i] for i in plain], tokenize=False,
                                                 add_generation_prompt=gen)
            for i, text in zip(plain, texts, strict=True):
                out[i] = text
        for i, t in enumerate(tools):
            if t:
                out[i] = self.tok.apply_chat_template(convs[i], tools=t, tokenize=False, add_generation_prompt=gen)
        return out

    def _count(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        if self.backend is not None:
            return [len(e.ids) for e in self.backend(texts, add_special_tokens=False)]
        return [len(x) for x in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def add(self, records: list[dict]) -> None:
        inputs = [r.get("input", r) for r in records]
        prompts = [i["messages"] for i in inputs]
        tools = [i.get("tools") for i in inputs]
        prompt_texts = self._render(prompts, tools, gen=True)
        n_prompt = self._count(prompt_texts)
        self.lengths["prompt"].extend(n_prompt)
        if not self.pairs:
            return
        for field, key in (("preferred", "preferred_output"), ("non_preferred", "non_preferred_output")):
            full = self._render([p + r[key] for p, r in zip(prompts, records, strict=True)], tools, gen=False)
            self.lengths[field].extend(self._completion_lengths(prompt_texts, full, n_prompt))

    def _completion_lengths(self, prompt_texts: list[str], full: list[str], n_prompt: list[int]) -> list[int]:
        """Tokens of the text the template adds after the prompt — tokenized on its own, as TRL-style
        DPO collators tokenize prompt and completion separately. A template whose full text does not
        extend the prompt text falls back to the difference of the two token counts."""
        tails = [f[len(p):] if f.startswith(p) else None for p, f in zip(prompt_texts, full, strict=True)]
        counted = iter(self._count([t for t in tails if t is not None]))
        odd = [i for i, t in enumerate(tails) if t is None]
        whole = dict(zip(odd, self._count([full[i] for i in odd]), strict=True)) if odd else {}
        return [next(counted) if t is not None else max(whole[i] - n_prompt[i], 0) for i, t in enumerate(tails)]

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({f: np.frombuffer(a, dtype=np.uint32).astype(np.int64)
                             for f, a in self.lengths.items()})

    def truncated(self, max_length: int) -> int:
        df = self.frame()
        total = df["prompt"]
        if self.pairs:
            total = total + df[["preferred", "non_preferred"]].max(axis=1)
        return int((total > max_length).sum())


class Stats:
    """Characters, turns and roles of the unique examples, plus one TokenCounter per model."""

    def __init__(self, pairs: bool, counters: list[TokenCounter], batch_size: int = 256):
        self.pairs = pairs
        self.counters = counters
        self.chars = {f: array("I") for f in (FIELDS if pairs else FIELDS[:1])}
        self.turns: Counter[int] = Counter()
        self.roles: Counter[str] = Counter()
        self.with_system = 0
        self.with_tools = 0
        self.batch: list[dict] = []
        self.batch_size = batch_size

    def add(self, record: dict) -> None:
        inp = record.get("input", record)
        messages = inp["messages"]
        self.turns[len(messages)] += 1
        self.roles.update(m["role"] for m in messages)
        self.with_system += messages[0]["role"] == "system"
        self.with_tools += bool(inp.get("tools"))
        self.chars["prompt"].append(sum(len(m["content"]) for m in messages))
        if self.pairs:
            self.chars["preferred"].append(len(record["preferred_output"][0]["content"]))
            self.chars["non_preferred"].append(len(record["non_preferred_output"][0]["content"]))
        if self.counters:
            self.batch.append(record)
            if len(self.batch) >= self.batch_size:
                self.flush()

    def flush(self) -> None:
        if self.batch:
            for counter in self.counters:
                counter.add(self.batch)
            self.batch = []


def describe(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    """{column: {mean, p50, p95, max}} — the summary each length table shows."""
    if df.empty:
        return {c: {"mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0} for c in df.columns}
    table = pd.DataFrame({"mean": df.mean(), "p50": df.quantile(0.5), "p95": df.quantile(0.95),
                          "max": df.max()})
    return {col: {"mean": round(float(row["mean"]), 2), "p50": float(row["p50"]),
                  "p95": round(float(row["p95"]), 2), "max": int(row["max"])}
            for col, row in table.iterrows()}


def longer_share(df: pd.DataFrame) -> float | None:
    """Share of pairs whose preferred answer is strictly longer than the non-preferred one."""
    if df.empty or "preferred" not in df:
        return None
    return round(float((df["preferred"] > df["non_preferred"]).mean()), 4)


def cut_counts(df: pd.DataFrame, max_length: int) -> dict[str, int]:
    """Preferred and non-preferred answers the trainer cuts at ``max_length``, counted apart.

    The trainer's rule (tasks/training/data.truncate, without max_prompt_length): when the prompt and
    the longer answer exceed max_length, each answer keeps max(max_length − prompt, min(longer answer,
    max_length // 2)) tokens."""
    longest = df[["preferred", "non_preferred"]].max(axis=1)
    over = df["prompt"] + longest > max_length
    budget = np.maximum(max_length - df["prompt"], np.minimum(longest, max_length // 2))
    return {"preferred": int((over & (df["preferred"] > budget)).sum()),
            "non_preferred": int((over & (df["non_preferred"] > budget)).sum()), "max_length": max_length}


def summarize(stats: Stats, max_length: int | None) -> dict[str, Any]:
    """The statistics part of inspection.json."""
    stats.flush()
    chars = pd.DataFrame({f: np.frombuffer(a, dtype=np.uint32).astype(np.int64) for f, a in stats.chars.items()})
    out: dict[str, Any] = {
        "turns": {"mean": round(float(sum(k * v for k, v in stats.turns.items()) / max(chars.shape[0], 1)), 3),
                  "max": max(stats.turns, default=0),
                  "histogram": {str(k): v for k, v in sorted(stats.turns.items())}},
        "roles": {r: stats.roles.get(r, 0) for r in ("system", "user", "assistant")},
        "with_system": stats.with_system,
        "with_tools": stats.with_tools,
        "chars": describe(chars),
        "token_stats": {},
        "truncated": {},
        "warnings": [],
    }
    if stats.pairs:  # a shortcut warning from these shares is tasks/diagnostics.py's
        out["preferred_longer_share"] = longer_share(chars)
        out["cut"] = {}
    for counter in stats.counters:
        df = counter.frame()
        entry: dict[str, Any] = describe(df)
        if stats.pairs:
            entry["preferred_longer_share"] = longer_share(df)
            if max_length is not None:
                out["cut"][counter.name] = cut_counts(df, max_length)
        out["token_stats"][counter.name] = entry
        if max_length is not None:
            out["truncated"][counter.name] = counter.truncated(max_length)
    return out
