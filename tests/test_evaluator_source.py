"""Where an evaluator may come from (#21 item 3): a run started from the UI or the API runs as the
server's owner, and a second local user started one whose evaluator was their own Python file. Now
only preftune's own evaluators and the owner's folders (PREFTUNE_EVALUATOR_DIRS) are accepted there;
the owner's command line may still name any file."""

from __future__ import annotations

import json

import pytest

from preftune.errors import UserError

HOSTILE = '''
import pathlib
pathlib.Path(__file__).with_name("ran-as-owner").write_text("pwned")
def score(messages, completion):
    return 1.0
'''


@pytest.fixture
def stranger(tmp_path, monkeypatch):
    """Another user's evaluator, in a folder the owner did not list; importing it leaves a mark."""
    folder = tmp_path / "someone-else"
    folder.mkdir()
    (folder / "theirs.py").write_text(HOSTILE)
    monkeypatch.delenv("PREFTUNE_EVALUATOR_DIRS", raising=False)
    return folder


def test_a_form_answer_naming_a_strangers_file_is_refused_without_running_it(stranger):
    """The UI's evaluator question checks an answer by importing it (flows/questions.py): before, the
    file ran as the owner right there."""
    from preftune.flows.approvals import EvaluatorChoice, EvaluatorKind
    from preftune.flows.questions import _evaluator_problem

    for evaluator in (f"{stranger / 'theirs.py'}:score", f"{stranger}/theirs.py:score"):
        problem = _evaluator_problem(EvaluatorChoice(decision=EvaluatorKind.evaluator, evaluator=evaluator))
        assert problem is not None and "PREFTUNE_EVALUATOR_DIRS" in problem and "\n" not in problem
    assert not (stranger / "ran-as-owner").exists()


def test_a_form_spec_naming_a_strangers_file_is_refused_before_the_plan(stranger, tmp_path):
    """A RunSpec from the UI form with that evaluator ends at the run's first question, before any
    spend (not in phase 5, after pairs and training)."""
    from preftune.flows.questions import resolve_evaluator
    from preftune.spec import RunSpec
    from preftune.workspace import Workspace

    spec = RunSpec(dataset="pairs.jsonl", evaluator=f"{stranger / 'theirs.py'}:score")
    with pytest.raises(UserError, match="PREFTUNE_EVALUATOR_DIRS"):
        resolve_evaluator(spec, Workspace(tmp_path / "ws"))
    assert not (stranger / "ran-as-owner").exists()


def test_a_module_id_is_located_without_importing_it(stranger, monkeypatch):
    from preftune.judges.evaluators import EvalItem, run_evaluator

    monkeypatch.chdir(stranger)  # `theirs:score` imports from the serve loop's working folder
    with pytest.raises(UserError, match="neither in preftune nor in a folder listed in PREFTUNE_EVALUATOR_DIRS"):
        run_evaluator("theirs:score", [EvalItem("k", [{"role": "user", "content": "q"}], "a")])
    assert not (stranger / "ran-as-owner").exists()
    with pytest.raises(UserError, match=r"module not found \(no_such_pkg\)"):  # unknown stays "not found"
        run_evaluator("no_such_pkg.mod:f", [])


def test_a_module_that_is_not_there_is_refused_before_the_plan(tmp_path):
    """Before: a module id nothing finds passed the source check and failed in phase 5, after the
    sweep had trained (the hostile pass's 3h)."""
    from preftune.flows.questions import resolve_evaluator
    from preftune.spec import RunSpec
    from preftune.workspace import Workspace

    spec = RunSpec(dataset="pairs.jsonl", evaluator="no_such_pkg.mod:score")
    with pytest.raises(UserError, match=r"^evaluator 'no_such_pkg.mod:score': module not found \(no_such_pkg\)$"):
        resolve_evaluator(spec, Workspace(tmp_path / "ws"))


def test_preftune_and_the_owners_folders_are_accepted(stranger, monkeypatch):
    from preftune.judges.evaluators import EvalItem, run_evaluator

    item = [EvalItem("k", [{"role": "user", "content": "What is 2+2?"}], "Four, because 2+2=4.")]
    assert run_evaluator("preftune.judges.builtin:answer_quality", item)[0]["error"] is None
    monkeypatch.setenv("PREFTUNE_EVALUATOR_DIRS", f"/nonexistent{__import__('os').pathsep}{stranger}")
    assert run_evaluator(f"{stranger / 'theirs.py'}:score", item)[0]["score"] == 1.0


def test_the_owners_command_line_may_name_any_file(zoo, stranger, tmp_path, capsys):
    """`preftune evaluate --evaluator FILE:FN`: the owner typed it, so it runs where it lies."""
    from preftune.cli import main
    from tests.test_evaluate import QUESTIONS, write_pairs

    test = write_pairs(tmp_path / "test.jsonl", QUESTIONS[:2])
    code = main(["evaluate", "--test", str(test), "--base", zoo["models"]["tiny-llama"], "--evaluator",
                 f"{stranger / 'theirs.py'}:score", "--out", str(tmp_path / "eval"), "--max-new-tokens", "4", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert json.loads(out.out)["mode"] == "evaluator" and (stranger / "ran-as-owner").exists()
