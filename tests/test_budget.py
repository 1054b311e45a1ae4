"""The budget cap is held against the jobs that run: dropping betas brings a plan under it."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from preftune.errors import RunEnded
from preftune.flows.approvals import PlanDecision
from preftune.flows.questions import apply_decision
from preftune.spec import RunSpec
from preftune.tasks.plan import build_plan, job_grid, with_approved


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A remote-priced plan (work pool, $ per trained token) of 1 model x 3 betas: each job costs the same."""
    model = tmp_path_factory.mktemp("cfg") / "m"
    LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2).save_pretrained(model)
    insp = {"format": "pairs", "examples": 120, "train_examples": 100, "test_examples": 20,
            "token_stats": {str(model): {"prompt": {"mean": 10.0}, "preferred": {"mean": 20.0},
                                         "non_preferred": {"mean": 30.0}}}}
    spec = RunSpec(dataset="d.jsonl", base_models=[str(model)], betas=[0.1, 0.3, 0.5], work_pool="gpus",
                   target_win_rate=None, evaluator="preftune.judges.builtin:answer_quality")
    jobs = job_grid(spec, [str(model)])
    plan = build_plan(spec, insp, jobs, "evaluator", "gpu")
    return spec, insp, jobs, plan


def _decide(grid, **answer):
    spec, insp, jobs, plan = grid
    return apply_decision(spec, plan, jobs, PlanDecision(decision="approve", **answer),
                          lambda kept: with_approved(spec, insp, plan, kept, "evaluator"))


def test_a_cap_below_the_full_grid_is_met_by_dropping_betas(grid):
    full = grid[3]["estimate"]["total"]["high"]
    assert full > 0
    cap = full * 0.7  # two of three equal jobs fit (2/3 < 0.7), three do not
    with pytest.raises(RunEnded) as err:
        _decide(grid, budget_usd=cap)
    assert err.value.status == "rejected" and f"${full:.2f} exceeds the budget cap ${cap:.2f}" in str(err.value)
    kept, plan = _decide(grid, budget_usd=cap, drop_betas=[0.5])
    assert [j["beta"] for j in kept] == [0.1, 0.3]
    approved = plan["approved"]["estimate"]["total"]["high"]
    assert approved == pytest.approx(full * 2 / 3, rel=1e-3) and approved <= cap
    assert plan["approved"]["dropped"] == [j["id"] for j in grid[2] if j["beta"] == 0.5]
    with pytest.raises(RunEnded) as err:  # one more than fits
        _decide(grid, budget_usd=full / 2, drop_betas=[0.5])
    assert "of the approved jobs" in str(err.value)


def test_rejected_or_empty_grids_end_the_run(grid):
    spec, _, jobs, plan = grid
    with pytest.raises(RunEnded, match="too dear"):
        apply_decision(spec, plan, jobs, PlanDecision(decision="reject", note="too dear"), lambda kept: plan)
    with pytest.raises(RunEnded, match="every job was dropped"):
        _decide(grid, drop_betas=[0.1, 0.3, 0.5])
