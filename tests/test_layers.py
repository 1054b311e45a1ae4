"""The one-way imports of docs/ARCHITECTURE.md, checked on the source: flows → tasks → (judges,
reports, preftune); only flows/ and the CLI talk to Prefect; nothing but the CLI imports flows."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# preftune/client.py reads a key from a Prefect Secret block when an endpoint names one (a lazy
# import inside that one function): the only Prefect use outside flows/ and the CLI.
PREFECT_ALLOWED = {"preftune/client.py"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _sources(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((REPO / f).rglob("*.py"))]


def _offenders(files: list[Path], forbidden: tuple[str, ...], allowed: set[str] = frozenset()) -> dict:
    out = {}
    for path in files:
        rel = str(path.relative_to(REPO))
        bad = sorted(m for m in _imports(path) if m.split(".")[0] in forbidden or m.startswith(forbidden))
        if bad and rel not in allowed:
            out[rel] = bad
    return out


def test_only_flows_and_the_cli_import_prefect():
    files = _sources("tasks", "judges", "reports") + [
        p for p in _sources("preftune") if "preftune/cli" not in str(p)]
    assert _offenders(files, ("prefect",), PREFECT_ALLOWED) == {}


def test_nothing_but_the_cli_imports_flows():
    files = _sources("tasks", "judges", "reports") + [
        p for p in _sources("preftune") if "preftune/cli" not in str(p)]
    assert _offenders(files, ("preftune.flows",)) == {}


def test_the_shared_package_imports_no_phase():
    files = [p for p in _sources("preftune") if "preftune/cli" not in str(p)]
    assert _offenders(files, ("preftune.tasks", "preftune.judges", "preftune.reports")) == {}


def test_judges_and_reports_import_no_task():
    assert _offenders(_sources("judges", "reports"), ("preftune.tasks",)) == {}


def test_the_trainer_imports_only_its_libraries_and_preftune():
    allowed_roots = {"torch", "transformers", "peft", "accelerate", "preftune", "tqdm"}
    stdlib = set(sys.stdlib_module_names)
    for path in _sources("tasks/training"):
        for name in _imports(path):
            root = name.split(".")[0]
            assert root in allowed_roots | stdlib, f"{path.relative_to(REPO)} imports {name}"
            if root == "preftune":
                assert not name.startswith(("preftune.flows", "preftune.judges", "preftune.reports")) and (
                    not name.startswith("preftune.tasks") or name.startswith("preftune.tasks.training")), (
                    f"{path.relative_to(REPO)} imports {name}")
