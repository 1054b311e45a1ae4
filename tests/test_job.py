"""The one job definition (preftune/job.py): the form, `preftune run` and `preftune train` accept
and refuse the same values, and a bad setting stops a run before anything is spent."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from preftune.cli import build_parser
from preftune.job import LoraOptions, LossOptions, TrainConfig, TrainingOptions
from preftune.spec import RunSpec
from tests.stub_server import Reply, StubServer

BAD_BETAS = [-1.0, 0.0, float("nan"), float("inf"), 101.0]


@pytest.mark.parametrize("beta", BAD_BETAS)
def test_a_bad_beta_is_refused_by_the_form_and_by_a_job(beta, tmp_path):
    with pytest.raises(ValidationError, match="betas"):
        RunSpec(dataset="d.jsonl", betas=[0.1, beta])
    with pytest.raises(ValidationError, match="beta"):
        TrainConfig(data=tmp_path / "d.jsonl", model=tmp_path, out=tmp_path / "o", beta=beta)


def test_run_spec_inherits_every_job_option():
    """RunSpec holds the training and LoRA fields themselves, not copies with other bounds."""
    for options in (TrainingOptions, LoraOptions):
        for name, field in options.model_fields.items():
            assert repr(RunSpec.model_fields[name]) == repr(field), name
    assert RunSpec.model_fields["losses"].annotation == list[LossOptions]


@pytest.mark.parametrize("options, message", [
    ({"loss_type": "dpo", "simpo_gamma": 0.5}, "simpo_gamma only applies to loss_type 'simpo'"),
    ({"loss_type": "orpo", "rpo_alpha": 0.5}, "ORPO already includes an NLL term"),
    ({"loss_type": "kto"}, "Input should be 'dpo', 'ipo', 'hinge', 'simpo' or 'orpo'"),
])
def test_loss_rules_are_the_same_in_the_form_and_in_a_job(options, message, tmp_path):
    with pytest.raises(ValidationError, match=message):
        RunSpec(dataset="d.jsonl", losses=[options])
    with pytest.raises(ValidationError, match=message):
        TrainConfig(data=tmp_path / "d.jsonl", model=tmp_path, out=tmp_path / "o", **options)


def test_train_flags_are_generated_from_the_job_fields():
    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["train"]
    flags = {opt for action in sub._actions for opt in action.option_strings}
    for name in TrainConfig.model_fields:
        if name != "progress":
            assert "--" + name.replace("_", "-") in flags, name
    defaults = {a.dest: a.default for a in sub._actions if a.dest in TrainConfig.model_fields}
    assert set(defaults.values()) == {None}  # no hand-listed defaults: the model's apply
    help_text = sub.format_help()
    assert "(default: 0.0005)" in help_text and "{dpo,ipo,hinge,simpo,orpo}" in help_text


@pytest.mark.parametrize("beta, problem", [("-1", "Input should be greater than 0 (got -1.0)"),
                                           ("0", "Input should be greater than 0 (got 0.0)"),
                                           ("nan", "Input should be a finite number (got nan)")])
def test_run_with_a_bad_beta_exits_2_before_any_request(beta, problem, tmp_path):
    """Prompts-only data with remote generators: a bad beta must stop the run before pair
    generation pays for a single request."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"messages": [{{"role": "user", "content": "q{i}"}}]}}\n' for i in range(8)))
    with StubServer(lambda req: Reply(text="an answer")) as srv:
        proc = subprocess.run(
            [sys.executable, "-m", "preftune.cli", "run", "--dataset", str(prompts), "--base-model", str(tmp_path),
             "--strong", f"strong@{srv.base_url}", "--weak", f"weak@{srv.base_url}", "--beta", "0.1",
             "--beta", beta, "--evaluator", "preftune.judges.builtin:answer_quality", "--yes",
             "--workspace", str(tmp_path / "ws")],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert srv.requests == []
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"preftune run: error: --beta: {problem}"]
    assert not (tmp_path / "ws").exists()


def test_train_with_a_bad_beta_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "preftune.cli", "train", "--data", "d.jsonl", "--model", "m",
                           "--out", str(tmp_path / "o"), "--beta", "-0.5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "preftune train: error: --beta: Input should be greater than 0 (got -0.5)"]
