"""`preftune run` flags → RunSpec, and its user errors (one line, exit 2, no traceback)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from preftune.cli import build_parser
from preftune.cli.run import spec_from_args
from preftune.errors import UserError


def _spec(*argv: str):
    return spec_from_args(build_parser().parse_args(["run", *argv]))


def test_flags_fill_the_run_spec():
    spec = _spec("--dataset", "d.jsonl", "--base-model", "/m/a", "--base-model", "/m/b", "--beta", "0.1",
                 "--beta", "0.3", "--loss", "dpo", "--loss", "ipo:normalize_by_length=true",
                 "--loss", "simpo:simpo_gamma=0.5", "--lora-r", "16", "--judge", "gpt-x@https://api.example/v1",
                 "--judge-api-key-env", "JUDGE_KEY", "--judge-price-in", "0.5", "--max-concurrent-jobs", "3",
                 "--target-win-rate", "0.8", "--no-deploy", "--yes", "--max-cost-usd", "12.5")
    assert spec.base_models == ["/m/a", "/m/b"] and spec.betas == [0.1, 0.3]
    assert [loss.label for loss in spec.losses] == ["dpo", "ipo-lnorm", "simpo-g0.5"]
    assert spec.lora_r == 16 and spec.full is False
    assert (spec.judge.model, spec.judge.base_url, spec.judge.api_key_env) == ("gpt-x", "https://api.example/v1",
                                                                             "JUDGE_KEY")
    assert spec.judge.price_input_per_m == 0.5
    assert spec.max_concurrent_jobs == 3 and spec.target_win_rate == 0.8 and spec.deploy is False
    assert spec.auto_approve_max_usd == 12.5


def test_endpoints_use_the_one_parser_and_carry_the_secret_block():
    from preftune.endpoint import Endpoint

    spec = _spec("--dataset", "d.jsonl", "--strong", "org/model@v2@http://host/v1", "--strong-api-key-block",
                 "strong-key", "--weak", "/models/weak", "--judge", "j@https://api.example/v1",
                 "--judge-api-key-block", "judge-key", "--judge-price-out", "2")
    assert (spec.strong.model, spec.strong.base_url, spec.strong.api_key_block) == ("org/model@v2", "http://host/v1",
                                                                                  "strong-key")
    assert spec.strong == Endpoint.parse("org/model@v2@http://host/v1", api_key_block="strong-key")
    assert spec.weak.is_local and spec.weak.cost(10**6, 10**6) == 0.0  # a local folder is free
    assert spec.judge.api_key_block == "judge-key" and spec.judge.price_input_per_m is None
    assert spec.judge.cost(10**6, 10**6) == 2.0
    assert _spec("--dataset", "d.jsonl", "--strong", "s@http://h/v1").strong.cost(1, 1) is None  # unpriced


def test_without_yes_every_plan_is_asked():
    assert _spec("--dataset", "d.jsonl").auto_approve_max_usd is None


def test_out_of_range_setting_is_a_user_error():
    with pytest.raises(UserError, match="--max-concurrent-jobs: Input should be greater than or equal to 1"):
        _spec("--dataset", "d.jsonl", "--max-concurrent-jobs", "0")
    with pytest.raises(UserError, match=r"--loss: rpo_alpha \(1.0\) and simpo_gamma \(1.0\) cannot both be positive"):
        _spec("--dataset", "d.jsonl", "--loss", "dpo:rpo_alpha=1,simpo_gamma=1")


def test_bad_dataset_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = ('{"input": {"messages": [{"role": "user", "content": "q"}]}, '
            '"preferred_output": [{"role": "assistant", "content": "a"}], '
            '"non_preferred_output": [{"role": "assistant", "content": "b"}]}')
    bad.write_text(f"{good}\n{good}\n{{not json\n")
    # run in tmp_path: the default workspace is relative (./workspaces/...), so the check below can fail
    proc = subprocess.run([sys.executable, "-m", "preftune.cli", "run", "--dataset", str(bad)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"preftune run: error: {bad}:3: invalid JSON: Expecting property name enclosed in double quotes "
        "(column 2)"]
    assert "Traceback" not in proc.stderr and not (tmp_path / "workspaces").exists()
