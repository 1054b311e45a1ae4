"""Pair diagnostics (tasks/diagnostics.py) on datasets built so the answer is known: the length
shortcut, the surface-feature classifier, near-duplicate prompts, answers cut by max_length, and
where they show (inspection.json, `preftune inspect`, the plan, the report)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd

from preftune.reports.build import write_report
from preftune.spec import RunSpec
from preftune.tasks.diagnostics import (
    SHORTCUT_AT,
    jaccard,
    near_duplicates,
    run_diagnostics,
    shortcut_accuracy,
    surface_features,
)
from preftune.tasks.inspect import inspect_dataset
from preftune.tasks.inspect_stats import cut_counts
from preftune.tasks.plan import build_plan, job_grid, plan_markdown
from preftune.workspace import Workspace

WORDS = ("river", "stone", "light", "table", "music", "green", "quiet", "cloud", "paper", "north", "field", "glass")


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def pair(prompt: str, good: str, bad: str) -> dict:
    return {"input": {"messages": [{"role": "user", "content": prompt}]},
            "preferred_output": [{"role": "assistant", "content": good}],
            "non_preferred_output": [{"role": "assistant", "content": bad}]}


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def longer_preferred(n: int, seed: int = 0) -> list[dict]:
    """The preferred answer is always 20-30 words, the other 3-10: length alone tells them apart."""
    rng = random.Random(seed)
    return [pair(f"Question {i}: {sentence(rng, 6)}", sentence(rng, rng.randint(20, 30)),
                 sentence(rng, rng.randint(3, 10))) for i in range(n)]


def balanced(n: int, seed: int = 1) -> list[dict]:
    """Both answers from one length distribution, same style: nothing on the surface to learn."""
    rng = random.Random(seed)
    return [pair(f"Question {i}: {sentence(rng, 6)}", sentence(rng, rng.randint(5, 30)),
                 sentence(rng, rng.randint(5, 30))) for i in range(n)]


def _plan(data: Path, ws: Path, model: str) -> tuple[dict, str]:
    inspection = inspect_dataset(data, models=[model], max_length=512, workspace=ws)
    spec = RunSpec(dataset=str(data), base_models=[model])
    plan = build_plan(spec, inspection, job_grid(spec, [model]), "evaluator", "cpu")
    return plan, plan_markdown(plan)


def test_always_longer_reads_100_percent_and_the_plan_warns(tmp_path, zoo):
    model = zoo["models"]["tiny-llama"]
    plan, md = _plan(write(tmp_path / "long.jsonl", longer_preferred(120)), tmp_path / "ws", model)
    diag = plan["diagnostics"]
    assert diag["preferred_longer"]["characters"] == 1.0
    assert diag["preferred_longer"]["tokens"] == {model: 1.0}
    assert diag["classifier"]["accuracy"] >= 0.95
    assert "Length shortcut: 100.0% of pairs have the longer answer preferred (characters); 100.0% by tokens" in md
    warnings = [line for line in md.splitlines() if line.startswith("> ⚠ length shortcut")]
    assert len(warnings) == 2  # characters and tokens
    assert "told apart without reading them" in warnings[0] and "saturate" in warnings[0]
    assert "> ⚠ surface shortcut: a classifier on surface features alone" in md


def test_balanced_pairs_give_no_warning(tmp_path, zoo):
    plan, md = _plan(write(tmp_path / "bal.jsonl", balanced(200)), tmp_path / "ws", zoo["models"]["tiny-llama"])
    diag = plan["diagnostics"]
    assert 0.35 <= diag["preferred_longer"]["characters"] <= 0.65
    assert diag["classifier"]["accuracy"] < SHORTCUT_AT
    assert diag["warnings"] == [] and "> ⚠" not in md.split("**Sweep**")[0]


def test_the_classifier_finds_a_formatting_shortcut_that_length_does_not_show():
    """Built so the answer is known: same length distribution on both sides, but the preferred
    answer is always a markdown list. The length share stays near 50%; the classifier, which
    sees the list-item count, is right on (nearly) every held-out pair; on pure noise it is at chance."""
    rng = random.Random(3)
    good, bad, longer = [], [], 0
    for _ in range(300):
        a, b = rng.randint(10, 30), rng.randint(10, 30)
        words = [sentence(rng, 1) for _ in range(a)]
        good_text = "\n".join(f"- {w}" for w in words[: a // 3]) + "\n" + " ".join(words[a // 3:])
        bad_text = sentence(rng, b)
        longer += len(good_text) > len(bad_text)
        good.append(surface_features(good_text))
        bad.append(surface_features(bad_text))
    assert 0.3 < longer / 300 < 0.7
    assert shortcut_accuracy(np.array(good), np.array(bad)) >= 0.97
    noise = np.random.default_rng(0)
    assert 0.4 <= shortcut_accuracy(noise.normal(size=(1000, 12)), noise.normal(size=(1000, 12))) <= 0.6
    assert shortcut_accuracy(np.ones((8, 12)), np.zeros((8, 12))) is None  # fewer than 2 x folds pairs


def test_near_duplicates_across_the_split_not_only_exact():
    test = ["What is the capital of France? Answer in one word.", "Write a haiku about autumn leaves falling."]
    train = ["what is the CAPITAL of france ... answer in one word!",  # same after normalising: 1.0
             "Write a haiku about autumn leaves falling down.",  # one word added: ~0.87
             "Write a limerick about a cat on a hot tin roof.",
             "Explain how a refrigerator keeps food cold."]
    found = near_duplicates(train, test)
    assert (found["near_duplicates"], found["train_prompts"], found["test_prompts"]) == (2, 4, 2)
    assert [e["jaccard"] for e in found["examples"]] == [1.0, round(jaccard(train[1], test[1]), 2)]
    assert 0.8 <= jaccard(train[1], test[1]) < 1.0


def test_near_duplicates_stay_fast_on_100k_prompts():
    rng = random.Random(5)
    vocab = ["".join(rng.choice("abcdefghijklmnop") for _ in range(6)) for _ in range(4000)]
    test = [" ".join(rng.choice(vocab) for _ in range(12)) for _ in range(20_000)]
    train = [" ".join(rng.choice(vocab) for _ in range(12)) for _ in range(80_000)]
    train[123] = test[456].upper()
    found = near_duplicates(train, test)
    assert found["near_duplicates"] == 1 and found["examples"][0]["jaccard"] == 1.0


def test_cut_counts_follow_the_trainers_truncation_rule():
    """max_length 100. Row 0: 20 + 90 > 100, each answer keeps max(100 − 20, min(90, 50)) = 80 tokens:
    the preferred (90) is cut, the non-preferred (30) is not. Row 1: 70 + 60 > 100: budget
    max(30, min(60, 50)) = 50: both cut (60, 55). Row 2: 10 + 40 fits: nothing cut."""
    from preftune.tasks.training.data import truncate

    df = pd.DataFrame({"prompt": [20, 70, 10], "preferred": [90, 60, 40], "non_preferred": [30, 55, 20]})
    assert cut_counts(df, 100) == {"preferred": 2, "non_preferred": 1, "max_length": 100}
    cut = [truncate([0] * p, [0] * c, [0] * r, 100, None) for p, c, r in df.itertuples(index=False)]
    assert [(len(t[1]), len(t[2])) for t in cut] == [(80, 30), (50, 50), (40, 20)]


def _workspace(tmp_path: Path, data: Path) -> Workspace:
    """A workspace as the flow leaves it for the report: run.json with the spec."""
    ws = Workspace(tmp_path / "ws")
    ws.ensure()
    ws.run_record.write_text(json.dumps({"spec": RunSpec(dataset=str(data)).model_dump(mode="json")}))
    ws.outcome.write_text(json.dumps({"status": "completed", "target_met": None}))
    return ws


def test_the_report_has_the_data_diagnostics_section(tmp_path):
    data = write(tmp_path / "long.jsonl", longer_preferred(40))
    ws = _workspace(tmp_path, data)
    inspection = inspect_dataset(data, workspace=ws)
    run_diagnostics(ws.root, inspection, {})
    report = write_report(ws)
    section = report.split("## Data diagnostics\n", 1)[1]
    assert section.lstrip().startswith("Length shortcut: 100.0% of pairs have the longer answer preferred")


def test_generated_pairs_are_diagnosed_after_phase_3_and_say_so(tmp_path):
    train = write(tmp_path / "train_pairs.jsonl", balanced(40))
    ws = _workspace(tmp_path, train)
    test = write(tmp_path / "test_pairs.jsonl", balanced(10, seed=9))
    diag = run_diagnostics(ws.root, {"format": "prompts"}, {"train": str(train), "test": str(test)})
    assert diag["source"] == "generated pairs (phase 3)" and diag["pairs"] == 50
    report = write_report(ws)
    first = report.split("## Data diagnostics\n", 1)[1].strip().splitlines()[0]
    assert first.startswith("Length shortcut: ") and first.endswith("50 pairs (generated pairs (phase 3)).")


def test_prompts_only_inspection_runs_the_prompt_checks_only(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Prompt number {i} about {WORDS[i % 12]}"}]} for i in range(30)]
    report = inspect_dataset(write(tmp_path / "p.jsonl", rows), workspace=tmp_path / "ws")
    diag = report["diagnostics"]
    assert diag["source"] == "dataset prompts" and "preferred_longer" not in diag
    assert diag["near_duplicates"]["train_prompts"] + diag["near_duplicates"]["test_prompts"] == 30
