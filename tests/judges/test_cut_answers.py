"""Answers that end (issue #23 item 3) and what changed, measured and side by side (#22 item 5, #23
item 7): phase 5 with endpoint models on a real local HTTP server (tests/stub_server.py) whose
candidate runs into the token limit on some prompts, then the report rendered from its files."""

from __future__ import annotations

import json
import re

from preftune.endpoint import Endpoint
from preftune.hf import load_tokenizer
from preftune.reports.build import comparison_markdown, write_report
from preftune.reports.measures import distinct2, measure
from preftune.tasks.evaluate import EvalConfig, load_test, run_evaluation
from preftune.tasks.evaluate_candidates import _empty, _merge, select_merged
from preftune.tasks.evaluate_checks import EVAL_TOKENS_BOUNDS, fitted_token_limit, token_limit_for
from preftune.workspace import Workspace
from tests.stub_server import Reply, StubRequest, StubServer
from tests.test_evaluate import BLOCK, QUESTIONS, write_pairs
from tests.test_report import _check_layout

LOOP = "the answer goes on and on and on and on and on <b>&"
TOLD: list[tuple[set, set]] = []  # per judge request: (the sides it was told were cut, the cut sides)


def world(req: StubRequest) -> Reply:
    """'base' answers briefly; 'cand' loops until the token limit on the first three questions;
    'judge' prefers the longer answer and says why, and checks it is told which answers were cut."""
    model = req.body["model"]
    if model == "base":
        return Reply(text="A short answer.")
    if model == "cand":
        if QUESTIONS.index(req.last_user) < 3:
            return Reply(text=f"{req.last_user} " + LOOP, finish_reason="length")
        return Reply(text=f"A complete answer to {req.last_user}")
    r = {m.group(1): m.group(3) for m in BLOCK.finditer(req.last_user)}
    TOLD.append(({side for side in "AB" if f"(Response {side} stopped at the token limit" in req.last_user},
                 {side for side in "AB" if LOOP in r[side]}))
    verdict = "A>B" if len(r["A"]) > len(r["B"]) else "B>A"
    return Reply(text=f"The longer one explains more.\nFinal verdict: [[{verdict}]]")


def test_cut_answers_are_counted_marked_and_shown_side_by_side(tmp_path):
    test = write_pairs(tmp_path / "test.jsonl", QUESTIONS)
    ws = Workspace(tmp_path / "ws").ensure()
    with StubServer(world) as srv:
        cfg = EvalConfig(test_data=test, base_model=f"base@{srv.base_url}", candidates={"cand": f"cand@{srv.base_url}"},
                         out_dir=ws.eval_dir / "stub-base", rubric="Prefer the better answer.",
                         judge=Endpoint.parse(f"judge@{srv.base_url}"), max_new_tokens=20, bootstrap_resamples=1000)
        TOLD.clear()
        scores = run_evaluation(cfg)
    # the judge is told which answer stopped at the limit (after its fence, where no answer can forge it):
    # in both orders of the 3 cut comparisons, and never of an answer that ended
    assert all(told == cut for told, cut in TOLD) and sum(bool(cut) for _, cut in TOLD) == 6, TOLD
    m = scores["models"]["cand"]
    assert len(scores["models_info"]["cand"]["cut"]) == 3 and scores["models_info"]["base"]["cut"] == []
    assert (m["cut_answers"], m["baseline_cut_answers"], m["cut_verdicts"]) == (3, 0, 3)
    assert "cand: 3 of 6 verdicts compare an answer cut at the token limit (20 new tokens; 3 of its answers cut, " \
           "0 of the base's)" in scores["warnings"]
    merged = _empty("rubric")
    _merge(merged, "stub-base", scores)
    ws.scores.write_text(json.dumps(select_merged(merged)))
    # the UI's comparison question names a judge no better than "the longer answer wins" (5 of 6 pairs here)
    question = comparison_markdown(json.loads(ws.scores.read_text()), "cand")
    assert ('**Judge calibration:** agreement with human labels 83.3% (95% CI 50.0%–100.0%); "the longer answer '
            'wins" 83.3%: ⚠ the judge is not above the length baseline.') in question
    write_report(ws)
    report = ws.report.read_text()
    assert "Answers cut at that limit (they did not end), per candidate — its own / its base's / verdicts that " \
           "compare a cut answer: `cand` 3 / 0 / 3 ⚠." in report
    _check_layout(report)
    section = report[report.index("\n## What changed\n"):]
    # measured: longer answers (flagged), 3 of 6 cut (flagged: +50 points); distinct-2 rises (the base says
    # the same 3 bigrams 6 times: 3 / 18 = 0.17), which is not a flag
    row = next(line for line in section.splitlines() if line.startswith("| `cand` |"))
    assert re.fullmatch(r"\| `cand` \| 15 → \d+ ⚠ \| 0% → 50% ⚠ \| 0\.17 → 0\.\d\d \| 0% → 0% \|", row), row
    # side by side: one two-column HTML table per prompt, escaped, the cut answer marked, the judge's reason
    blocks = section.split("\n### Prompt ")[1:]
    assert len(blocks) == 5
    cut_blocks = [b for b in blocks if "(an answer was cut at the token limit)" in b.splitlines()[0]]
    assert len(cut_blocks) == 3
    for block in cut_blocks:
        assert '<colgroup><col width="50%"><col width="50%"></colgroup>' in block
        assert "on and on &lt;b&gt;&amp;<br><strong>⚠ cut at the token limit (20 new tokens)" in block
        assert "<b>&" not in block
        assert "> The longer one explains more." in block
        assert "⚠ This verdict compares an answer cut at the token limit" in block


def test_measures_by_hand():
    """distinct-2 of "a b a b": bigrams (a b), (b a), (a b): 2 unique of 3."""
    assert distinct2(["a b a b"]) == 2 / 3 and distinct2(["one"]) is None
    got = measure(["I'm sorry, I can't.", "Sure: yes."], [False, True])
    assert got["refusals"] == 0.5 and got["cut"] == 0.5 and got["length"] == (19 + 10) / 2


def test_the_token_limit_fits_the_held_out_preferred_answers(zoo, tmp_path):
    assert fitted_token_limit([]) == 64
    assert fitted_token_limit(list(range(1, 101))) == 90  # nearest-rank p90
    assert fitted_token_limit([3] * 10) == EVAL_TOKENS_BOUNDS[0] and fitted_token_limit([9999]) == EVAL_TOKENS_BOUNDS[1]
    test = write_pairs(tmp_path / "test.jsonl", QUESTIONS)
    model = zoo["models"]["tiny-llama"]
    tok = load_tokenizer(model)
    _, labelled = load_test(test, 100)
    lengths = sorted(len(tok(p["preferred"], add_special_tokens=False)["input_ids"]) + 1 for p in labelled)
    limit = token_limit_for(model, labelled)
    assert limit["value"] == max(EVAL_TOKENS_BOUNDS[0], lengths[5])  # 6 answers: the p90 is the 6th
    assert limit["why"].startswith(f"fitted: the p90 of 6 held-out preferred answers' token lengths is {lengths[5]}")


def test_evaluation_prompts_keep_the_datasets_tools(tmp_path):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"input": {"messages": [{"role": "user", "content": "Rain?"}], "tools": tools},
                                "preferred_output": [{"role": "assistant", "content": "Yes."}],
                                "non_preferred_output": [{"role": "assistant", "content": "No."}]}) + "\n")
    (_, messages), = load_test(path, 10)[0]
    assert messages == [{"role": "user", "content": "Rain?"}] and messages.tools == tools


def test_preftune_evaluate_fits_its_token_limit_by_default(zoo, tmp_path, capsys):
    from preftune.cli import main

    test = write_pairs(tmp_path / "test.jsonl", QUESTIONS)
    model = zoo["models"]["tiny-llama"]
    code = main(["evaluate", "--test", str(test), "--base", model, "--evaluator",
                 "preftune.judges.builtin:answer_quality", "--out", str(tmp_path / "eval"), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    scores = json.loads(out.out)
    assert scores["max_new_tokens"] == token_limit_for(model, load_test(test, 200)[1])["value"]
