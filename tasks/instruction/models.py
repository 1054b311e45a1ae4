"""Model names in a sentence, matched against the models this machine knows.

People write model names loosely: "Qwen3 32B" for a folder named `Qwen3-32B`, "smollm2 135m" for
`SmolLM2-135M-Instruct`. A known model (a catalogue entry or a folder under a model directory)
matches when its name's letter and digit runs appear in that order, separated by nothing or by
spaces, dashes, dots, slashes or underscores, in any case; a trailing `-Instruct`/`-Chat`/`-it`
may be left out. Anything else that looks like a model name (`Llama 3.1 8B`, `org/name-7B`) is
an *unknown* mention: the caller asks about it instead of guessing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from preftune.workspace import short_name

_SEP = r"[\s_\-./]*"
_SUFFIXES = {"instruct", "chat", "it", "base", "hf"}
# A name with a parameter count: `Qwen3 32B`, `Qwen3-30B-A3B`, `Llama 3.1 8B`, `org/Model-7B-Instruct`; a
# second word only when it is a version number, so "using Qwen3 235B" is `Qwen3 235B`.
_MODEL_LIKE = re.compile(
    r"(?<![\w/.-])(?:[A-Za-z][\w.-]*/)?[A-Za-z][A-Za-z0-9.]*(?:[ _-]\d[\d.]*)??[ _-]?\d+(?:\.\d+)?[BbMm]"
    r"(?:-[A-Za-z0-9.]+)*(?![\w])")
# An existing local model folder named by its path.
_PATH = re.compile(r"(?<![\w@])(?:~|\.{1,2})?/[\w./~-]+|(?<![\w/@])[\w.-]+/[\w./-]+")


@dataclass(frozen=True)
class Mention:
    """A model named in the sentence: `model` is what it resolved to (None: unknown)."""

    start: int
    end: int
    text: str
    model: str | None


def _runs(name: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+(?:\.\d+)?", name.lower())


def _pattern(runs: list[str]) -> str:
    return r"(?<![a-z0-9])" + _SEP.join(re.escape(r) for r in runs) + r"(?![a-z0-9])"


def name_patterns(models: list[str]) -> list[tuple[re.Pattern, str]]:
    """(regex, model) for every known model, longest names first (so `Qwen3-30B-A3B` is tried
    before a shorter name that is its prefix)."""
    out = []
    for model in models:
        runs = _runs(short_name(model))
        if not runs:
            continue
        variants = [runs]
        while len(runs) > 1 and runs[-1] in _SUFFIXES:
            runs = runs[:-1]
            variants.append(runs)
        out += [(re.compile(_pattern(v), re.IGNORECASE), model) for v in variants]
    return sorted(out, key=lambda p: -len(p[0].pattern))


def local_models(dirs: list[str | Path]) -> list[str]:
    """Model folders (holding a config.json) directly under each directory."""
    found = []
    for d in dirs:
        root = Path(d).expanduser()
        if root.is_dir():
            found += sorted(str(p) for p in root.iterdir() if (p / "config.json").is_file())
    return found


def model_dirs() -> list[str]:
    """Directories whose model folders the planner knows: `PREFTUNE_MODEL_DIRS` (os.pathsep-separated)."""
    return [d for d in os.environ.get("PREFTUNE_MODEL_DIRS", "").split(os.pathsep) if d]


def find_mentions(text: str, models: list[str], taken: list[tuple[int, int]]) -> list[Mention]:
    """Every model named in `text` outside the `taken` spans, in order: known ones first claim
    their span, then folder paths, then unknown model-like names."""
    spans = list(taken)
    found: list[Mention] = []

    def free(a: int, b: int) -> bool:
        return all(b <= s or a >= e for s, e in spans)

    for pattern, model in name_patterns(models):
        for m in pattern.finditer(text):
            if free(m.start(), m.end()):
                spans.append((m.start(), m.end()))
                found.append(Mention(m.start(), m.end(), m.group(0), model))
    for m in _PATH.finditer(text):
        path = m.group(0).rstrip(".,;")
        if free(m.start(), m.start() + len(path)) and (Path(path).expanduser() / "config.json").is_file():
            spans.append((m.start(), m.start() + len(path)))
            found.append(Mention(m.start(), m.start() + len(path), path, path))
    for m in _MODEL_LIKE.finditer(text):
        if free(m.start(), m.end()):
            spans.append((m.start(), m.end()))
            found.append(Mention(m.start(), m.end(), m.group(0), None))
    return sorted(found, key=lambda x: x.start)
