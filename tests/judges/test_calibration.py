"""The judge measured against the labels before it is trusted (issue #22 item 3), through phase 5
with a scripted judge on a real local HTTP server (tests/stub_server.py)."""

from __future__ import annotations

import json
import re

from preftune.endpoint import Endpoint
from preftune.flows.questions import judge_caution
from preftune.judges import stats
from preftune.reports.build import write_report
from preftune.tasks.evaluate import EvalConfig, run_evaluation
from preftune.tasks.evaluate_candidates import _empty, _merge, select_merged
from preftune.workspace import Workspace
from tests.stub_server import Reply, StubRequest, StubServer
from tests.test_evaluate import BLOCK

PAIRS = 200
TAG = re.compile(r"answer #(\d+)")


def _pairs(path, n: int = PAIRS):
    """Pair i: the preferred answer is the longer one when i is even (the length baseline is 50%)."""
    with open(path, "w") as fh:
        for i in range(n):
            good, bad = f"Preferred answer #{i}.", f"Other answer #{i}."
            good, bad = (good + " With the reasons.", bad) if i % 2 == 0 else (good, bad + " With padding, padding.")
            fh.write(json.dumps({"input": {"messages": [{"role": "user", "content": f"Question {i}?"}]},
                                 "preferred_output": [{"role": "assistant", "content": good}],
                                 "non_preferred_output": [{"role": "assistant", "content": bad}]}) + "\n")
    return path


def world(req: StubRequest) -> Reply:
    """'base' answers prompts; 'judge' sides with the label on pairs i % 5 != 0 (80%), in both orders."""
    if req.body["model"] == "base":
        return Reply(text="An answer.")
    r = {m.group(1): m.group(3) for m in BLOCK.finditer(req.last_user)}
    i = int(TAG.search(r["A"]).group(1))
    preferred_is_a = r["A"].startswith("Preferred")
    pick_a = preferred_is_a if i % 5 else not preferred_is_a
    return Reply(text=f"Final verdict: [[{'A>B' if pick_a else 'B>A'}]]")


def test_agreement_with_human_labels_holds_the_scripted_80_percent(tmp_path):
    test = _pairs(tmp_path / "test.jsonl")
    with StubServer(world) as srv:
        cfg = EvalConfig(test_data=test, base_model=f"base@{srv.base_url}", out_dir=tmp_path / "eval",
                         rubric="Prefer the labelled answer.", judge=Endpoint.parse(f"judge@{srv.base_url}"),
                         validity_pairs=PAIRS, bootstrap_resamples=1000)
        scores = run_evaluation(cfg)
    cal = scores["judge_validity"]
    assert cal["labels"] == "human" and cal["pairs"] == PAIRS and cal["judgments_valid"] == 2 * PAIRS
    assert cal["agreement"] == 0.8
    assert cal["agreement_ci_low"] < 0.8 < cal["agreement_ci_high"]
    assert 0.72 < cal["agreement_ci_low"] and cal["agreement_ci_high"] < 0.88  # 200 pairs: about ±5.5 points
    assert cal["length_baseline"] == 0.5 and cal["above_length_baseline"]
    assert cal["position_consistency"] == 1.0
    assert not any("length baseline" in w for w in scores["warnings"])

    # the report: the section and line issue #22 fixes, and nothing at the promotion gate
    ws = Workspace(tmp_path / "ws").ensure()
    ws.scores.parent.mkdir(parents=True, exist_ok=True)
    merged = _empty("rubric")  # the flow's eval/scores.json, as tasks/evaluate_candidates.py merges it
    _merge(merged, "base", scores)
    ws.scores.write_text(json.dumps(select_merged(merged)))
    write_report(ws)
    report = ws.report.read_text()
    section = report[report.index("\n## Judge calibration\n"):]
    assert re.search(r"^Agreement with human labels: 80\.0% \(95% CI 7\d\.\d%–8\d\.\d%\)", section, re.M)
    assert '"The longer answer wins" on the same pairs: 50.0% (the judge\'s CI is above it).' in section
    assert judge_caution(scores) == ""


def test_a_judge_that_only_reads_length_is_named_at_the_gate(tmp_path):
    """Generated pairs whose preferred answer is longer in 90% of them, and a judge that picks the longer
    answer: its agreement equals the baseline, so it is not above it — and the labels are not human."""
    ab = [2 if i % 10 else -2 for i in range(100)]  # prefers position A (the preferred) on 90 pairs
    ba = [-p for p in ab]
    longer = [1.0 if i % 10 else 0.0 for i in range(100)]
    cal = stats.judge_validity(ab, ba, longer, seed=0) | {"labels": "strong-vs-weak"}
    assert cal["agreement"] == cal["length_baseline"] == 0.9 and not cal["above_length_baseline"]
    text = judge_caution({"judge": "judge@http://127.0.0.1:9", "judge_validity": cal})
    assert "**The judge `judge@http://127.0.0.1:9` is not above the length baseline:**" in text
    assert "with the strong-vs-weak labels on 90% of judgments" in text and "human" not in text


def test_position_consistency_pools_every_base():
    """Two base models: 10 comparisons judged consistently under one, 0 of 30 under the other. The run's
    figure is 10 / 40, not the last base's 0 (what the merge kept before)."""
    merged = _empty("rubric")
    _merge(merged, "/m/a", {"mode": "rubric", "models": {}, "position_consistency": 1.0, "position_pairs": 10})
    _merge(merged, "/m/b", {"mode": "rubric", "models": {}, "position_consistency": 0.0, "position_pairs": 30})
    assert merged["position_consistency"] == 0.25


EVALUATOR = '''
import re


def score(messages, completion):
    """Sides with the label on pairs i % 5 != 0 (80%): one answer at a time, by its text."""
    i = int(re.search(r"answer #(\\d+)", completion).group(1)) if "answer #" in completion else 1
    preferred = completion.startswith("Preferred")
    return 1.0 if preferred == bool(i % 5) else 0.0
'''


def test_a_python_evaluator_is_held_to_the_labels_as_a_judge_is(tmp_path, monkeypatch):
    """The run's scorer is a Python evaluator: it scores both answers of each labelled pair before any
    candidate, and the report's Judge calibration gives its agreement (80% scripted) beside the length
    baseline, with no position consistency (it sees one answer at a time)."""
    test = _pairs(tmp_path / "test.jsonl")
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "labelled.py").write_text(EVALUATOR)
    monkeypatch.setenv("PREFTUNE_EVALUATOR_DIRS", str(tmp_path / "evals"))
    evaluator = f"{tmp_path / 'evals' / 'labelled.py'}:score"
    with StubServer(world) as srv:
        cfg = EvalConfig(test_data=test, base_model=f"base@{srv.base_url}", out_dir=tmp_path / "eval",
                         evaluator=evaluator, validity_pairs=PAIRS, bootstrap_resamples=1000,
                         labels="strong-vs-weak")
        scores = run_evaluation(cfg)
    cal = scores["judge_validity"]
    assert cal["scorer"] == "evaluator" and cal["labels"] == "strong-vs-weak"
    assert cal["pairs"] == PAIRS and cal["judgments_valid"] == PAIRS  # one comparison per pair, not two
    assert cal["agreement"] == 0.8 and cal["agreement_ci_low"] < 0.8 < cal["agreement_ci_high"]
    assert cal["length_baseline"] == 0.5 and cal["above_length_baseline"]
    assert cal["position_consistency"] is None
    rows = [json.loads(line) for line in (tmp_path / "eval" / "validity.jsonl").read_text().splitlines()]
    assert len(rows) == PAIRS and rows[1] == {"key": rows[1]["key"], "preferred_score": 1.0,
                                              "non_preferred_score": 0.0, "error": None}
    assert rows[0]["preferred_score"] == 0.0  # pair 0: the scripted disagreement

    ws = Workspace(tmp_path / "ws").ensure()
    ws.scores.parent.mkdir(parents=True, exist_ok=True)
    merged = _empty("evaluator") | {"evaluator": evaluator}
    _merge(merged, "base", scores)
    ws.scores.write_text(json.dumps(select_merged(merged)))
    write_report(ws)
    report = ws.report.read_text()
    section = report[report.index("\n## Judge calibration\n"):]
    assert f"The run's scorer is the Python evaluator `{evaluator}`" in section
    assert re.search(r"^Agreement with strong-vs-weak labels: 80\.0% \(95% CI 7\d\.\d%–8\d\.\d%\), 200 valid pairs "
                     r"scored of 200 held-out generated pairs", section, re.M)
    assert "Position consistency: not applicable" in section
    assert judge_caution(merged) == ""
    # and when it reads only length, the gate names the evaluator, not a judge
    weak = dict(cal, agreement=0.5, agreement_ci_low=0.43, above_length_baseline=False)
    assert f"**The evaluator `{evaluator}` is not above the length baseline:**" in judge_caution(
        {"evaluator": evaluator, "judge_validity": weak})


def test_a_warning_every_base_gives_alike_is_said_once():
    """The calibration pairs and the scorer are the run's: two bases gave the same calibration warning
    twice in the demo's report ("tiny-llama: evaluator not above ...", "tiny-qwen: evaluator not above ...")."""
    merged = _empty("evaluator")
    same = "evaluator not above the length baseline: 74% vs 56%"
    _merge(merged, "/m/a", {"mode": "evaluator", "models": {}, "warnings": [same, "a-dpo: 3 of 27 verdicts cut"]})
    _merge(merged, "/m/b", {"mode": "evaluator", "models": {}, "warnings": [same, "b-dpo: 1 of 27 verdicts cut"]})
    assert merged["warnings"] == [f"a: {same}", "a: a-dpo: 3 of 27 verdicts cut", "b: b-dpo: 1 of 27 verdicts cut"]
