"""Python evaluators run out of process: failures of user code are recorded per item, not fatal."""

from __future__ import annotations

import textwrap

import psutil
import pytest

from preftune.errors import UserError
from preftune.judges.builtin import answer_quality
from preftune.judges.evaluators import EvalItem, check_value, parse_evaluator_id, run_evaluator

USER_CODE = textwrap.dedent('''
    import math, os, sys, time

    def score(messages, completion):
        """Behaviour chosen by the completion text."""
        if completion == "raise":
            raise ValueError("boom")
        if completion == "hang":
            with open(os.environ["HANG_PID_FILE"], "w") as fh:  # the test checks this process was killed
                fh.write(str(os.getpid()))
            time.sleep(600)
        if completion == "big":
            return 1.5
        if completion == "negative":
            return -0.1
        if completion == "nan":
            return math.nan
        if completion == "text":
            return "0.5"
        if completion == "bool":
            return True
        if completion == "nodict":
            return {"reason": "forgot the score"}
        if completion == "exit":
            os._exit(3)
        if completion == "numpy":
            import numpy
            return numpy.float32(0.75)
        if completion == "reason":
            return {"score": 0.25, "reason": "a quarter"}
        return len(completion) / 10
''')

CONV = [{"role": "user", "content": "hi"}]


@pytest.fixture
def user_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_EVALUATOR_DIRS", str(tmp_path))  # the owner's folder of evaluators
    path = tmp_path / "my_eval.py"
    path.write_text(USER_CODE)
    return path


def test_failures_are_recorded_and_the_run_goes_on(user_file, tmp_path, monkeypatch) -> None:
    texts = ["abcde", "raise", "hang", "big", "negative", "nan", "text", "bool", "nodict", "exit",
             "reason", "ab", "numpy"]
    items = [EvalItem(f"k{i}", CONV, t) for i, t in enumerate(texts)]
    pid_file = tmp_path / "hang.pid"
    monkeypatch.setenv("HANG_PID_FILE", str(pid_file))
    monkeypatch.setenv("PREFTUNE_PASS_ENV", "HANG_PID_FILE")  # a worker inherits only allow-listed names
    results = run_evaluator(f"{user_file}:score", items, timeout=1.5, workers=2)
    by = {texts[int(r["key"][1:])]: r for r in results}
    assert [r["key"] for r in results] == [it.key for it in items]
    assert by["abcde"] == {"key": "k0", "score": 0.5, "reason": None, "error": None}
    assert by["ab"]["score"] == 0.2
    assert by["numpy"]["score"] == 0.75 and by["numpy"]["error"] is None  # numpy scalars are numbers
    assert by["reason"]["score"] == 0.25 and by["reason"]["reason"] == "a quarter"
    assert by["raise"]["score"] is None and by["raise"]["error"] == "raised ValueError: boom"
    assert by["hang"]["score"] is None and by["hang"]["error"] == "timed out after 1.5 s"
    assert by["big"]["error"] == "returned 1.5, outside [0, 1]"
    assert by["negative"]["error"] == "returned -0.1, outside [0, 1]"
    assert by["nan"]["error"] == "returned nan, outside [0, 1]"
    assert by["text"]["error"] == "returned str, expected a number in [0, 1]"
    assert by["bool"]["error"] == "returned bool, expected a number in [0, 1]"
    assert by["nodict"]["error"] == "returned a dict without 'score'"
    assert by["exit"]["score"] is None and "evaluator process died (exit code 3)" == by["exit"]["error"]
    # the hung item was killed, not waited out (it sleeps 600 s): its worker is gone when the run returns
    hung = int(pid_file.read_text())
    assert not psutil.pid_exists(hung) or psutil.Process(hung).status() == psutil.STATUS_ZOMBIE


def test_module_id_and_bad_ids(user_file, monkeypatch) -> None:
    monkeypatch.chdir(user_file.parent)  # package.module ids import from the current directory
    ok = run_evaluator("my_eval:score", [EvalItem("a", CONV, "abc")], timeout=10)
    assert ok[0]["score"] == pytest.approx(0.3)
    with pytest.raises(UserError, match=r"evaluator 'no_such_mod\.x:score': module not found \(no_such_mod\)"):
        run_evaluator("no_such_mod.x:score", [EvalItem("a", CONV, "abc")])
    with pytest.raises(UserError, match=r"evaluator 'my_eval:nope': 'my_eval' has no function 'nope'"):
        run_evaluator("my_eval:nope", [])
    with pytest.raises(UserError, match="no such file"):
        parse_evaluator_id("missing/file.py:score")
    with pytest.raises(UserError, match="expected package.module:function"):
        parse_evaluator_id("preftune.judges.builtin")
    with pytest.raises(UserError, match="not a module name"):
        parse_evaluator_id("bad module:score")


def test_check_value() -> None:
    assert check_value(0) == (0.0, None, None)
    assert check_value(1) == (1.0, None, None)
    assert check_value({"score": 0.5, "reason": 7}) == (0.5, "7", None)
    assert check_value(None)[2] == "returned NoneType, expected a number in [0, 1]"


def test_builtin_answer_quality() -> None:
    """Hand-checked components for a clean, on-topic answer and for degenerate ones."""
    q = [{"role": "user", "content": "How do plants make food from sunlight?"}]
    good = ("Plants make food through photosynthesis: leaves capture sunlight, and chlorophyll "
            "uses that energy to turn water and carbon dioxide into sugar and oxygen.")
    r = answer_quality(q, good)
    # content words of the question: plants, make→stop, food, sunlight → [plants, food, sunlight]
    # all three appear → on_topic 1; 26 words → length 1; ends with '.' → clean_stop 1
    assert "on_topic=1.00" in r["reason"] and "length=1.00" in r["reason"] and "clean_stop=1.00" in r["reason"]
    assert r["score"] == pytest.approx(1.0, abs=1e-6)
    assert answer_quality(q, "   ") == {"score": 0.0, "reason": "empty completion"}
    loop = answer_quality(q, "the the the the the the the the the the the the the the the")
    assert loop["score"] < 0.5 and "no_loops=0.08" in loop["reason"]  # 1 distinct of 13 trigrams
    cut = answer_quality(q, "Plants use sunlight to make food, and the process is called")
    assert "clean_stop=0.30" in cut["reason"] and cut["score"] < r["score"]
    off_topic = answer_quality(q, "I like trains and the colour blue very much indeed.")
    assert "on_topic=0.00" in off_topic["reason"]
    assert answer_quality(q, good) == r  # deterministic
