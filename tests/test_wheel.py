"""The installed package is self-contained: a regular wheel, installed outside the checkout,
inspects a bundled example and renders a plan (templates and examples travel as package data),
and puts nothing but `preftune` into site-packages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

RENDER_PLAN = """
import json, sys
from preftune.paths import EXAMPLES_DIR, TEMPLATES_DIR
from preftune.spec import RunSpec
from preftune.tasks.inspect import inspect_dataset
from preftune.tasks.plan import build_plan, job_grid, plan_markdown
model, ws = sys.argv[1], sys.argv[2]
spec = RunSpec(dataset=str(EXAMPLES_DIR / "pairs.jsonl"), base_models=[model], betas=[0.1, 0.3],
               evaluator="preftune.judges.builtin:answer_quality")
inspection = inspect_dataset(spec.dataset, models=[model], max_length=spec.max_length, workspace=ws)
plan = build_plan(spec, inspection, job_grid(spec, [model]), "evaluator", "cpu")
print(json.dumps({"examples": str(EXAMPLES_DIR), "templates": str(TEMPLATES_DIR), "markdown": plan_markdown(plan)}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build_dir = REPO / "build"
    existed = build_dir.exists()
    # --no-build-isolation: build with this environment's setuptools, offline.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(REPO)], check=True, cwd=out, timeout=600)
    if not existed:  # setuptools builds in the checkout's build/: leave no stale copy of the package there
        shutil.rmtree(build_dir, ignore_errors=True)
    (found,) = out.glob("preftune-*.whl")
    return found


def test_wheel_holds_one_package_with_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"preftune", wheel.name.split("-py")[0] + ".dist-info"}
    for data in ("preftune/templates/final_report.md.j2", "preftune/templates/plan.md.j2",
                 "preftune/examples/pairs.jsonl", "preftune/examples/prompts.jsonl",
                 "preftune/corpus/corpus.jsonl", "preftune/data/prices.json", "preftune/flows/pipeline.py",
                 "preftune/tasks/training/losses.py"):
        assert data in names, data
    assert not [n for n in names if "stub_server" in n or "make_corpus" in n or "make_examples" in n]


def test_installed_wheel_works_outside_the_checkout(wheel, zoo, tmp_path):
    """A fresh virtual environment with the wheel installed (its dependencies are this test
    environment's, reached through a .pth file rather than installed again), run from a folder
    outside the checkout."""
    env_dir, site, outside = tmp_path / "venv", tmp_path / "site", tmp_path / "elsewhere"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    fresh_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    (fresh_site / "_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "preftune"]
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}

    cli = subprocess.run([str(python), "-m", "preftune.cli", "inspect", "--json", "--workspace", str(outside / "ws"),
                          str(site / "preftune" / "examples" / "pairs.jsonl")],
                         capture_output=True, text=True, cwd=outside, env=env, timeout=300)
    assert cli.returncode == 0, cli.stderr
    report = json.loads(cli.stdout)
    assert report["format"] == "pairs" and report["examples"] == 306
    assert (outside / "ws" / "inspection.json").is_file()

    model = zoo["models"]["tiny-llama"]
    proc = subprocess.run([str(python), "-c", RENDER_PLAN, model, str(outside / "ws2")],
                          capture_output=True, text=True, cwd=outside, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["examples"] == str(site / "preftune" / "examples")
    assert out["templates"] == str(site / "preftune" / "templates")
    assert "tiny-llama-dpo-b0.1" in out["markdown"] and "tiny-llama-dpo-b0.3" in out["markdown"]
    assert str(REPO) not in proc.stdout + cli.stdout
