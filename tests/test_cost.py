"""The cost estimate against hand-computed values."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from preftune import cost
from preftune.endpoint import Endpoint
from preftune.errors import UserError
from preftune.spec import RunSpec
from preftune.tasks.plan import build_plan, estimate, job_grid, plan_markdown


@pytest.fixture(scope="module")
def config_only_model(tmp_path_factory) -> str:
    """A model folder with a config and no weights: the size must come from the config alone."""
    path = tmp_path_factory.mktemp("cfg") / "m"
    LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False).save_pretrained(path)
    return str(path)


def test_model_params_from_config_without_weights(config_only_model):
    """embeddings 100*16 = 1600; per layer q,k,v,o 4*16*16 = 1024, gate/up/down 3*16*32 = 1536,
    two RMSNorms 2*16 = 32 → 2592, times 2 layers = 5184; final norm 16; lm_head 1600.
    Total 1600 + 5184 + 16 + 1600 = 8400."""
    assert cost.model_params(config_only_model) == 8400


def test_price_tiers():
    prices = cost.load_prices()
    assert cost.training_usd_per_1m(7_000_000_000, False, prices) == 1.00
    assert cost.training_usd_per_1m(16_000_000_000, False, prices) == 1.00
    assert cost.training_usd_per_1m(16_100_000_000, False, prices) == 6.00
    assert cost.training_usd_per_1m(70_000_000_000, False, prices) == 6.00
    assert cost.training_usd_per_1m(200_000_000_000, False, prices) == 12.00
    assert cost.training_usd_per_1m(8_000_000_000, True, prices) == 2.00
    with pytest.raises(UserError, match="full-parameter training of a 70.0B"):
        cost.training_usd_per_1m(70_000_000_000, True, prices)


def test_pair_tokens_caps_each_sequence():
    assert cost.pair_tokens(10, 20, 30, 256) == 70
    assert cost.pair_tokens(100, 200, 50, 256) == 256 + 150


def _inspection(model: str) -> dict:
    return {"format": "pairs", "source_format": "openai", "examples": 125, "duplicates": 0,
            "train_examples": 100, "test_examples": 20,
            "token_stats": {model: {"prompt": {"mean": 10.0}, "preferred": {"mean": 20.0},
                                    "non_preferred": {"mean": 30.0}}}}


def test_estimate_by_hand(config_only_model):
    """Per example (10+20) + (10+30) = 70 tokens (high +5%: 73.5); 100 train examples x 2 epochs
    → 14,000–14,700 tokens a job. Remote (work pool), $1.00/1M: $0.014 a job. Two betas with a
    target: low = 1 job ($0.014), high = 2 jobs ($0.0294).

    Judge ($2/1M in, $8/1M out), rubric, 20 eval prompts x 2 jobs x 2 orders + 20 validity pairs
    x 2 orders = 120 calls; input/call low 350 + 10 + 2*16 = 392, high 350 + 12.5 + 2*64 = 490.5;
    output 8–256. High: 120*490.5*2e-6 + 120*256*8e-6 = 0.11772 + 0.24576 = 0.36348.
    Low with early stop after one job: 80 of 120 calls at the low rates:
    (120*392*2e-6 + 120*8*8e-6) * 80/120 = (0.09408 + 0.00768) * 2/3 = 0.06784."""
    spec = RunSpec(dataset="d.jsonl", base_models=[config_only_model], betas=[0.1, 0.5], epochs=2,
                   max_length=256, work_pool="gpu-pool", target_win_rate=0.7, eval_max_new_tokens=64,
                   judge=Endpoint(model="j", base_url="http://x/v1", price_input_per_m=2.0,
                                       price_output_per_m=8.0), rubric="be helpful")
    jobs = job_grid(spec, [config_only_model])
    est = estimate(spec, _inspection(config_only_model), jobs, "rubric", "cpu")
    train = est["phases"]["training"]
    assert (train["tokens_low"], train["tokens_high"]) == (14000, 29400)
    assert train["low"] == pytest.approx(0.014, abs=1e-9)
    assert train["high"] == pytest.approx(0.0294, abs=1e-9)
    ev = est["phases"]["evaluation"]
    assert ev["calls"] == 120
    assert ev["high"] == pytest.approx(0.36348, abs=1e-9)
    assert ev["low"] == pytest.approx(0.06784, abs=1e-9)
    assert est["phases"]["pair_generation"]["high"] == 0
    assert est["total"]["high"] == pytest.approx(0.0294 + 0.36348, abs=1e-6)


def test_local_cpu_training_is_free_but_shows_hosted_equivalent(config_only_model):
    spec = RunSpec(dataset="d.jsonl", base_models=[config_only_model], evaluator="preftune.judges.builtin:answer_quality",
                   epochs=1, target_win_rate=None)
    jobs = job_grid(spec, [config_only_model])
    plan = build_plan(spec, _inspection(config_only_model), jobs, "evaluator", "cpu")
    train = plan["estimate"]["phases"]["training"]
    assert (train["low"], train["high"]) == (0.0, 0.0)
    assert train["hosted_equivalent_low"] == pytest.approx(7000 / 1e6)
    assert plan["estimate"]["total"] == {"low": 0.0, "high": 0.0}
    assert plan["evaluator"]["kind"] == "evaluator"


def test_prompts_only_pair_generation_by_hand(config_only_model):
    """300 prompts, mean 10 tokens, strong $1/$4 per 1M, weak unpriced (listed, not $0), max_tokens 100.
    Input per call 9–12.5 tokens; output 25–100 tokens.
    Strong: low 300*9*1e-6 + 300*25*4e-6 = 0.0027 + 0.03 = 0.0327;
    high 300*12.5*1e-6 + 300*100*4e-6 = 0.00375 + 0.12 = 0.12375."""
    insp = _inspection(config_only_model) | {"format": "prompts", "examples": 300, "train_examples": 240,
                                             "test_examples": 60}
    spec = RunSpec(dataset="p.jsonl", base_models=[config_only_model], pair_max_tokens=100,
                   strong=Endpoint(model="s", base_url="http://s/v1", price_input_per_m=1.0,
                                        price_output_per_m=4.0),
                   weak=Endpoint(model="w", base_url="http://w/v1"), evaluator="x:y")
    est = estimate(spec, insp, job_grid(spec, [config_only_model]), "evaluator", "cpu")
    pg = est["phases"]["pair_generation"]
    assert pg["calls"] == 600
    assert pg["low"] == pytest.approx(0.0327, abs=1e-9)
    assert pg["high"] == pytest.approx(0.12375, abs=1e-9)
    assert pg["unpriced"] == est["unpriced"] == ["w@http://w/v1"]
    plan = build_plan(spec, insp, job_grid(spec, [config_only_model]), "evaluator", "cpu")
    assert "no price was given for w@http://w/v1" in plan_markdown(plan)
    local = spec.model_copy(update={"weak": Endpoint(model="/models/weak")})  # a folder preftune serves: free
    assert estimate(spec=local, inspection=insp, jobs=job_grid(local, [config_only_model]),
                    evaluator_kind="evaluator", device="cpu")["unpriced"] == []


def test_report_prices_usage_with_the_same_rule():
    """The report's actual cost: priced endpoints in USD, a local folder free, an unpriced remote
    endpoint unknown (None), and so is any total that includes it."""
    from preftune.reports.build import actual_cost

    spec = {"work_pool": None, "lora": {"full": False},
            "strong": {"model": "s", "base_url": "http://s/v1", "price_input_per_m": 1.0, "price_output_per_m": 4.0},
            "weak": {"model": "/models/weak"}, "judge": {"model": "j", "base_url": "http://j/v1"}}
    usage = {"prompt_tokens": 1_000_000, "completion_tokens": 500_000}
    out = actual_cost(spec, [], {"usage": {"strong": usage, "weak": usage}}, {"judge_usage": usage}, "cpu")
    assert out["pair_generation"] == pytest.approx(3.0)
    assert out["evaluation"] is None and out["total"] is None
    priced = spec | {"judge": spec["judge"] | {"price_input_per_m": 0.5}}
    out = actual_cost(priced, [], {"usage": {"strong": usage, "weak": usage}}, {"judge_usage": usage}, "cpu")
    assert (out["evaluation"], out["total"]) == (pytest.approx(0.5), pytest.approx(3.5))


def test_max_pair_prompts_keeps_the_split_proportion(config_only_model):
    """300 prompts split 240/60 (80/20); a cap of 100 keeps 80 train and 20 test prompts, so the
    pair-generation estimate counts 100 calls per generator."""
    from preftune.tasks.plan import prompt_quota

    insp = _inspection(config_only_model) | {"format": "prompts", "examples": 300, "train_examples": 240,
                                             "test_examples": 60}
    spec = RunSpec(dataset="p.jsonl", base_models=[config_only_model], max_pair_prompts=100, evaluator="x:y",
                   strong=Endpoint(model="s", base_url="http://s/v1"),
                   weak=Endpoint(model="w", base_url="http://w/v1"))
    assert prompt_quota(spec, insp) == (80, 20)
    assert prompt_quota(spec, _inspection(config_only_model)) == (100, 20)  # pairs data: no cap
    est = estimate(spec, insp, job_grid(spec, [config_only_model]), "evaluator", "cpu")
    assert est["phases"]["pair_generation"]["calls"] == 200


def test_wall_time_parts_from_measured_speeds(config_only_model):
    """100 prompts (80 train / 20 test), 8 of them done by the calibration: 92 at 0.5 s each + 4 s of
    server start = 50 s; two jobs, no
    target (every job is evaluated): evaluation = 3 models x (2 s load + 20 prompts x 0.1 s) = 12 s;
    each shown as 0.75x–1.5x of that; the total adds the training part."""
    insp = _inspection(config_only_model) | {"format": "prompts", "examples": 100, "train_examples": 80,
                                             "test_examples": 20}
    spec = RunSpec(dataset="p.jsonl", base_models=[config_only_model], betas=[0.1, 0.5], target_win_rate=None,
                   evaluator="x:y", strong=Endpoint(model="/m/s"), weak=Endpoint(model="/m/w"))
    jobs = job_grid(spec, [config_only_model])
    measured = {"pairs": {"prompts": 8, "seconds": 4.0, "seconds_per_prompt": 0.5, "completion_tokens": 160,
                          "tokens_per_s": 40.0, "concurrency": 2, "server_start_s": 4.0},
                "evaluation": {config_only_model: {"load_s": 2.0, "prompts": 16, "seconds_per_prompt": 0.1}}}
    plan = build_plan(spec, insp, jobs, "evaluator", "cpu", throughput=measured)
    parts = plan["estimate"]["wall_parts"]
    assert (parts["pairs"]["low"], parts["pairs"]["high"]) == (37.5, 75.0)
    assert parts["pairs"]["note"].startswith("92 more prompts at 0.50 s each")
    assert (parts["evaluation"]["low"], parts["evaluation"]["high"]) == (9.0, 18.0)
    train = parts["training"]
    assert plan["estimate"]["wall_seconds"] == {"low": pytest.approx(46.5 + train["low"], abs=0.11),
                                                "high": pytest.approx(93.0 + train["high"], abs=0.11)}
    text = plan_markdown(plan)
    assert "| pairs | 0.6–1.2 |" in text and "| evaluation | 0.1–0.3 |" in text and "| training |" in text
    unmeasured = build_plan(spec, insp, jobs, "evaluator", "cpu")["estimate"]["wall_parts"]
    assert unmeasured["pairs"]["low"] is None and "not estimated" in plan_markdown(
        build_plan(spec, insp, jobs, "evaluator", "cpu"))


def test_job_seconds_from_a_measured_training_speed():
    """Per trained token: forward 1 ms, full forward + backward 3 ms; LoRA = 1 + (3 - 1)/2 = 2 ms.
    1,000-1,100 trained tokens (500-550 an epoch, the reference pass), 2 s load.
    LoRA: low 1000 x 0.002 x 0.8 + 2 + 3 = 6.6; high (1100 x 0.002 + 550 x 0.001) x 2 + 2 + 12 = 19.5.
    Full: low 1000 x 0.003 x 0.8 + 5 = 7.4; high (3.3 + 0.55) x 2 + 14 = 21.7."""
    m = {"load_s": 2.0, "forward_s_per_token": 0.001, "train_full_s_per_token": 0.003}
    tokens, epoch = cost.Range(1000, 1100), cost.Range(500, 550)
    lora = cost.measured_job_seconds(tokens, epoch, m, full=False)
    assert (lora.low, lora.high) == (pytest.approx(6.6), pytest.approx(19.5))
    full = cost.measured_job_seconds(tokens, epoch, m, full=True)
    assert (full.low, full.high) == (pytest.approx(7.4), pytest.approx(21.7))


def test_plan_training_time_uses_the_calibration_when_there_is_one(config_only_model):
    """100 train examples x 70-73.5 tokens, one epoch, LoRA, two jobs, no target (both count):
    per job low 7000 x 0.002 x 0.8 + 5 = 16.2 s; high (7350 x 0.002 + 7350 x 0.001) x 2 + 14 = 58.1 s."""
    spec = RunSpec(dataset="d.jsonl", base_models=[config_only_model], betas=[0.1, 0.5], epochs=1,
                   target_win_rate=None, evaluator="x:y")
    jobs = job_grid(spec, [config_only_model])
    measured = {"training": {config_only_model: {"load_s": 2.0, "row_tokens": 35, "forward_s_per_token": 0.001,
                                                 "train_full_s_per_token": 0.003}}}
    est = build_plan(spec, _inspection(config_only_model), jobs, "evaluator", "cpu", throughput=measured)["estimate"]
    train = est["phases"]["training"]
    assert (train["job_seconds_low"], train["job_seconds_high"]) == (16.2, 58.1)
    assert train["job_seconds_from"] == "measured"
    part = est["wall_parts"]["training"]
    assert (part["low"], part["high"]) == (32.4, 116.2) and "measured" in part["note"]
    flops = build_plan(spec, _inspection(config_only_model), jobs, "evaluator", "cpu")["estimate"]
    assert flops["phases"]["training"]["job_seconds_from"] == "flops"
    assert "model size" in flops["wall_parts"]["training"]["note"]


def test_calibration_times_local_generators_once_and_never_calls_a_remote_one(tmp_path, zoo):
    """The zoo's strong and weak folders are served and timed on the run's own prompts; the
    completions land in the pairs phase's cache; throughput.json makes the second call free. A
    remote generator is not called at all (its speed is not measured before approval)."""
    import json

    from preftune.response_cache import ResponseCache
    from preftune.tasks.throughput import calibrate
    from preftune.workspace import Workspace
    from tests.stub_server import Reply, StubServer

    ws = Workspace(tmp_path / "ws")
    ws.data_dir.mkdir(parents=True)
    for path, n in ((ws.train_data, 12), (ws.test_data, 4)):
        path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Tell me about town {i}."}]})
                                + "\n" for i in range(n)))
    insp = {"format": "prompts", "train_examples": 12, "test_examples": 4}
    models = zoo["models"]
    spec = RunSpec(dataset="p.jsonl", base_models=[models["tiny-llama"]], evaluator="x:y", pair_max_tokens=8,
                   eval_max_new_tokens=8, strong=Endpoint(model=models["tiny-strong"]),
                   weak=Endpoint(model=models["tiny-weak"]))
    got = calibrate(spec, ws, insp, [models["tiny-llama"]])
    pairs = got["pairs"]
    # one wave of what the servers batch (32 requests), so all 12 prompts
    assert pairs["prompts"] == 12 and pairs["concurrency"] == 32
    assert pairs["seconds"] > 0 and 0 < pairs["completion_tokens"] <= 2 * 12 * 8
    assert len(ResponseCache(ws.pairs_dir / "cache")._index) == 24  # both sides of 12 prompts, kept
    ev = got["evaluation"][models["tiny-llama"]]
    assert ev["prompts"] == 4 and ev["seconds_per_prompt"] > 0 and ev["load_s"] > 0
    train = got["training"][models["tiny-llama"]]
    # prompts-only data: a row is the prompt and half the pair budget (8 tokens), at least 16
    assert train["row_tokens"] == 16 and train["load_s"] == ev["load_s"]
    assert 0 < train["forward_s_per_token"] and 0 < train["train_full_s_per_token"]
    assert calibrate(spec, ws, insp, [models["tiny-llama"]]) == got  # read back, not measured again

    with StubServer(lambda req: Reply(text="paid")) as srv:
        remote = spec.model_copy(update={"strong": Endpoint(model="s", base_url=srv.base_url)})
        other = Workspace(tmp_path / "ws2")
        other.data_dir.mkdir(parents=True)
        for name in ("train_data", "test_data"):
            getattr(other, name).write_text(getattr(ws, name).read_text())
        assert calibrate(remote, other, insp, [models["tiny-llama"]])["pairs"] is None
        assert srv.requests == []
