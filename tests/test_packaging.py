"""pyproject's dependencies are ranges and constraints.txt pins a set inside them, which the
Makefile installs with -c (a bare torch range with nothing installed pulls a multi-GB CUDA build)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_dependencies_are_ranges_that_the_pinned_set_satisfies():
    pins = _pins()
    for text in _project()["dependencies"]:
        req = Requirement(text)
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"{text}: an exact pin in dependencies"
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"constraints.txt {name}=={pins[name]} is outside {text}"
    assert Requirement(next(d for d in _project()["dependencies"] if d.startswith("torch"))).specifier.contains("2.14.0")


def test_the_gpu_extras_and_the_pinned_install():
    extras = _project()["optional-dependencies"]
    assert [Requirement(r).name for r in extras["vllm"]] == ["vllm"]
    assert [Requirement(r).name for r in extras["qlora"]] == ["bitsandbytes"]
    makefile = (REPO / "Makefile").read_text()
    assert "pip install -q -c constraints.txt -e '.[dev]'" in makefile
