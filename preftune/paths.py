"""Where the project's own files live (templates, bundled data, default caches).

The repository keeps `templates/` and `examples/` at its top; an installed wheel carries them
inside the package (`preftune/templates`, `preftune/examples`: see pyproject.toml). Each is
looked up inside the package first, so the same code works in a checkout and in site-packages.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# A checkout (editable install) has pyproject.toml beside the package; an installed wheel has not.
REPO_ROOT: Path | None = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "pyproject.toml").is_file() else None


def _bundled(name: str) -> Path:
    inside = PACKAGE_DIR / name
    if inside.is_dir() or REPO_ROOT is None:
        return inside
    return REPO_ROOT / name


TEMPLATES_DIR = _bundled("templates")
EXAMPLES_DIR = _bundled("examples")
DATA_DIR = PACKAGE_DIR / "data"


def cache_dir() -> Path:
    """Root of preftune's caches; PREFTUNE_CACHE overrides (tests point it at a shared folder).
    In a checkout: `.cache/` beside it; installed: the user's cache folder."""
    if "PREFTUNE_CACHE" in os.environ:
        return Path(os.environ["PREFTUNE_CACHE"])
    if REPO_ROOT is not None:
        return REPO_ROOT / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "preftune"


def default_zoo_dir() -> Path:
    return cache_dir() / "zoo"
