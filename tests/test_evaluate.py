"""Phase 5 end to end through `preftune evaluate`: a zoo base model and a random LoRA candidate,
scored by the bundled Python evaluator and, separately, by a real local judge server."""

from __future__ import annotations

import json
import re

import pytest

from preftune.cli import main
from preftune.tasks.evaluate import EvalConfig
from tests.stub_server import Reply, StubRequest, StubServer

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "How many legs does a spider have?",
             "Why is the sky blue?", "What do bees make?", "What is two plus two?"]
BLOCK = re.compile(r"=====BEGIN RESPONSE ([AB]) (FENCE-\w+)=====\n(.*?)\n=====END RESPONSE \1 \2=====", re.S)


def write_pairs(path, questions, long_preferred=5):
    """Pairs whose preferred answer is the longer one in the first ``long_preferred`` records."""
    with open(path, "w") as fh:
        for i, q in enumerate(questions):
            long, short = f"A complete answer to: {q} With the reasoning spelled out.", "Dunno."
            pref, nonpref = (long, short) if i < long_preferred else (short, long)
            fh.write(json.dumps({"input": {"messages": [{"role": "user", "content": q}]},
                                 "preferred_output": [{"role": "assistant", "content": pref}],
                                 "non_preferred_output": [{"role": "assistant", "content": nonpref}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def adapter(zoo, tmp_path_factory):
    """A LoRA adapter with random (non-zero) weights on tiny-llama: a candidate that differs from base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(zoo["models"]["tiny-llama"])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter") / "lora"
    peft_model.save_pretrained(out)
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, dict | None, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 and "--json" in argv else None), captured.err


def lines(path) -> list[dict]:
    return [json.loads(x) for x in open(path)]


def test_bundled_evaluator_end_to_end(zoo, adapter, tmp_path, capsys) -> None:
    test = write_pairs(tmp_path / "test.jsonl", QUESTIONS)
    out = tmp_path / "eval"
    argv = ["evaluate", "--test", str(test), "--base", zoo["models"]["tiny-llama"],
            "--candidate", f"lora={adapter}", "--evaluator", "preftune.judges.builtin:answer_quality",
            "--out", str(out), "--max-new-tokens", "12", "--json"]
    code, scores, err = run_cli(argv, capsys)
    assert code == 0, err
    assert scores == json.loads((out / "scores.json").read_text())
    assert scores["mode"] == "evaluator" and scores["n_prompts"] == 6
    assert set(scores["models"]) == {"base", "lora"}
    per_item = lines(out / "evaluator_scores.jsonl")
    assert len(per_item) == 12 and all(r["error"] is None for r in per_item)
    for k, name in enumerate(["base", "lora"]):
        m = scores["models"][name]
        own = [r["score"] for r in per_item[6 * k:6 * (k + 1)]]
        assert m["n"] == 6 and m["errors"] == 0
        assert m["mean_score"] == pytest.approx(sum(own) / 6)
        assert m["ci_low"] <= m["mean_score"] <= m["ci_high"]
    vs = scores["models"]["lora"]["vs_base"]
    assert vs["wins"] + vs["ties"] + vs["losses"] == 6
    base_file = scores["models_info"]["base"]["completions"]
    lora_file = scores["models_info"]["lora"]["completions"]
    assert base_file != lora_file
    assert {p.name for p in (out / "completions").iterdir()} == {base_file.split("/")[-1], lora_file.split("/")[-1]}
    base_texts = [r["completion"] for r in lines(base_file)]
    lora_texts = [r["completion"] for r in lines(lora_file)]
    assert len(base_texts) == len(lora_texts) == 6
    assert base_texts != lora_texts  # the random adapter changes what the model says
    assert scores["models_info"]["lora"]["generated"] == 6

    code, again, err = run_cli(argv, capsys)  # re-run: every completion comes from the cache
    assert code == 0, err
    assert again["models_info"]["base"]["generated"] == 0 and again["models_info"]["lora"]["generated"] == 0
    assert len(lines(lora_file)) == 6
    assert again["models"] == scores["models"]


def length_judge(req: StubRequest) -> Reply:
    """Writes a rubric when asked; otherwise prefers the longer response (equal → tie)."""
    if "writing the grading rubric" in req.last_user:
        return Reply(text="Here is the rubric:\n- Prefer answers that explain their reasoning.\n"
                          "- Penalise one-word dismissals.")
    r = {m.group(1): m.group(3) for m in BLOCK.finditer(req.last_user)}
    a, b = len(r["A"]), len(r["B"])
    verdict = "A>B" if a > b else "B>A" if b > a else "A=B"
    return Reply(text=f"Judging by thoroughness.\nFinal verdict: [[{verdict}]]")


def test_stub_judge_end_to_end_and_free_rerun(zoo, adapter, tmp_path, capsys) -> None:
    test = write_pairs(tmp_path / "test.jsonl", QUESTIONS)
    train = write_pairs(tmp_path / "train.jsonl", QUESTIONS[::-1])
    out = tmp_path / "eval"
    with StubServer(length_judge) as srv:
        argv = ["evaluate", "--test", str(test), "--base", zoo["models"]["tiny-llama"],
                "--candidate", f"lora={adapter}", "--auto-rubric", "--train", str(train),
                "--judge", f"judge-model@{srv.base_url}", "--out", str(out), "--max-new-tokens", "12", "--json"]
        code, scores, err = run_cli(argv, capsys)
        assert code == 0, err
        # 1 rubric + 6 prompts × 2 orders + 6 labelled pairs × 2 orders
        assert len(srv.requests) == 25
        code, again, err = run_cli(argv, capsys)
        assert code == 0, err
        assert len(srv.requests) == 25  # the re-run is answered by the cache: no new judge request
    assert scores["mode"] == "auto" and scores["rubric"]["source"] == "auto"
    rubric_md = (out / "rubric.md").read_text()
    assert "- Prefer answers that explain their reasoning." in rubric_md and "Here is the rubric" not in rubric_md

    # expected outcomes, recomputed from the cached completions: the longer answer wins both orders
    base = [r["completion"] for r in lines(scores["models_info"]["base"]["completions"])]
    cand = [r["completion"] for r in lines(scores["models_info"]["lora"]["completions"])]
    expect = ["win" if len(c) > len(b) else "loss" if len(c) < len(b) else "tie" for c, b in zip(cand, base, strict=True)]
    m = scores["models"]["lora"]
    assert (m["wins"], m["ties"], m["losses"], m["invalid"]) == (
        expect.count("win"), expect.count("tie"), expect.count("loss"), 0)
    assert m["win_rate"] == pytest.approx((expect.count("win") + 0.5 * expect.count("tie")) / 6)
    assert m["mean_length"] == pytest.approx(sum(map(len, cand)) / 6)
    judged = lines(out / "judgments" / "lora.jsonl")
    assert [j["outcome"] for j in judged] == expect
    # validity: preferred is longer in 5 of 6 labelled pairs → 10 of 12 judgments agree
    assert scores["judge_agreement"] == pytest.approx(10 / 12)
    assert scores["judge_validity"]["position_consistency"] == 1.0
    assert scores["judge_usage"]["succeeded"] == 25 and again["judge_usage"]["cache_hits"] == 25
    assert again["models"] == scores["models"]


def test_user_errors_exit_2_with_one_line(zoo, tmp_path, capsys) -> None:
    test = write_pairs(tmp_path / "test.jsonl", QUESTIONS)
    base = zoo["models"]["tiny-llama"]
    code, _, err = run_cli(["evaluate", "--test", str(test), "--base", base, "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert err.startswith("preftune evaluate: error: nothing to score the completions with")
    assert "--judge MODEL@BASE_URL" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["evaluate", "--test", str(test), "--base", base, "--evaluator", "nope.mod:f",
                            "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "evaluator 'nope.mod:f': module not found (nope)" in err
    code, _, err = run_cli(["evaluate", "--test", str(test), "--base", base, "--candidate", f"x={tmp_path}",
                            "--evaluator", "preftune.judges.builtin:answer_quality", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "not a LoRA adapter folder" in err
    assert not (tmp_path / "o" / "scores.json").exists()


def endpoint_world(req: StubRequest) -> Reply:
    """One server playing three models: 'base' and 'cand' answer prompts, 'judge' judges (and
    garbles its reply whenever the candidate's answer mentions 'bees')."""
    model = req.body["model"]
    if model == "base":
        return Reply(text="Short.")
    if model == "cand":
        return Reply(text=f"A longer answer about: {req.last_user}")
    if "bees" in {m.group(1): m.group(3) for m in BLOCK.finditer(req.last_user)}["A"]:
        return Reply(text="Hmm. [[A>B]] or maybe [[B>A]]")
    return length_judge(req)


def test_run_evaluation_with_endpoints_prompts_only(tmp_path) -> None:
    """Endpoint models, a prompts-only test set (no validity possible), the user's rubric, and
    invalid judge replies that are counted and reported, never turned into ties."""
    from preftune.endpoint import Endpoint
    from preftune.tasks.evaluate import run_evaluation

    test = tmp_path / "prompts.jsonl"
    test.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in QUESTIONS))
    with StubServer(endpoint_world) as srv:
        cfg = EvalConfig(test_data=test, base_model=f"base@{srv.base_url}",
                         candidates={"cand": f"cand@{srv.base_url}"}, out_dir=tmp_path / "eval",
                         rubric="Prefer the more thorough answer.", judge=Endpoint.parse(f"judge@{srv.base_url}"),
                         bootstrap_resamples=1000)
        seen: list[tuple[int, int]] = []
        scores = run_evaluation(cfg, on_progress=lambda done, total: seen.append((done, total)))
        n_requests = len(srv.requests)
        # progress as it happens: 12 completions (one chunk per model), then each of 6 comparisons
        assert seen == [(6, 18), (12, 18)] + [(12 + k, 18) for k in range(1, 7)]
        assert n_requests == 6 + 6 + 6 * 2  # base and cand completions, then 6 comparisons × 2 orders
        assert run_evaluation(cfg)["models"] == scores["models"]
        # completions and valid verdicts cached; the one reply without a verdict is not final: asked again
        assert len(srv.requests) == n_requests + 1
    m = scores["models"]["cand"]
    # "What do bees make?": the candidate's answer quotes it → garbled verdict in the order where the
    # candidate is A → that comparison is invalid; the other 5: the longer candidate wins both orders
    assert (m["n"], m["wins"], m["ties"], m["losses"], m["invalid"]) == (6, 5, 0, 0, 1)
    assert m["win_rate"] == 1.0 and m["lc_win_rate"] == 1.0
    assert m["ci_low"] == 1.0 and m["ci_high"] == 1.0
    assert m["position_a_preferred"] == 5 and m["position_b_preferred"] == 6  # 5 + 6 valid orders
    assert scores["clear_winner"] == "cand"
    assert scores["judge_agreement"] is None and scores["judge_validity"] is None
    assert "cand: 1 of 6 comparisons invalid (unparseable judge reply or failed request)" in scores["warnings"]
    assert "judge validity not measured: the test data has no preference labels" in scores["warnings"]
    assert scores["rubric"] == {"source": "user", "text": "Prefer the more thorough answer.",
                                "path": str(tmp_path / "eval" / "rubric.md")}
    judged = {j["key"]: j for j in lines(tmp_path / "eval" / "judgments" / "cand.jsonl")}
    bad = [j for j in judged.values() if j["outcome"] == "invalid"]
    assert len(bad) == 1 and bad[0]["verdict_candidate_first"] == "invalid"
    assert bad[0]["verdict_baseline_first"] == "B>A"
