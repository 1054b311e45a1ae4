"""Phase 1 (tasks.inspect and `preftune inspect`): split, dedupe, token counts, workspace files, CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from preftune.errors import UserError
from preftune.records import DatasetError, prompt_hash
from preftune.tasks.inspect import TEST_PERCENT, inspect_dataset, is_test, split_bucket

# The CLI of the interpreter running the tests, whatever its environment (no .venv path assumed).
PREFTUNE = [sys.executable, "-m", "preftune.cli"]


def pair(prompt: str, good: str, bad: str, system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return {"input": {"messages": msgs}, "preferred_output": [{"role": "assistant", "content": good}],
            "non_preferred_output": [{"role": "assistant", "content": bad}]}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def hashes(records: list[dict]) -> set[str]:
    return {prompt_hash(r.get("input", r)["messages"], r.get("input", r).get("tools")) for r in records}


def synthetic_pairs(n: int) -> list[dict]:
    return [pair(f"Tell me about topic {i}.", f"Topic {i} is interesting because of fact {i}.", f"No idea {i}.")
            for i in range(n)]


# ---------------------------------------------------------------- split


def test_known_split_assignment():
    """The bucket is the first 16 hex digits of sha256(canonical prompt JSON) mod 100; < 20 is test."""
    msgs = [{"role": "user", "content": "What is Einstein famous for?"}]
    digest = hashlib.sha256(b'{"messages":[{"content":"What is Einstein famous for?","role":"user"}],'
                            b'"tools":[]}').hexdigest()
    assert split_bucket(prompt_hash(msgs)) == int(digest[:16], 16) % 100
    assert is_test(prompt_hash(msgs)) == (int(digest[:16], 16) % 100 < 20)
    assert TEST_PERCENT == 20


def test_split_is_stable_disjoint_and_keyed_by_prompt(tmp_path):
    records = synthetic_pairs(200)
    # Same prompt, different answers: must stay on one side.
    records += [pair("Tell me about topic 7.", f"Another good answer {k}.", f"Another bad answer {k}.")
                for k in range(5)]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    a = inspect_dataset(data, workspace=tmp_path / "a")
    b = inspect_dataset(data, workspace=tmp_path / "b")
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / "data" / name).read_bytes() == (tmp_path / "b" / "data" / name).read_bytes()
    train = read_jsonl(tmp_path / "a" / "data" / "train.jsonl")
    test = read_jsonl(tmp_path / "a" / "data" / "test.jsonl")
    assert hashes(train).isdisjoint(hashes(test))
    expected_test = [r for r in records if is_test(prompt_hash(r["input"]["messages"]))]
    assert test == expected_test  # canonical records, in source order
    assert a["test_examples"] == len(expected_test) and a["train_examples"] == 205 - len(expected_test)
    assert 0.1 < len(expected_test) / 205 < 0.3  # 80/20 by hash, roughly
    assert a == b | {"workspace": a["workspace"], "files": a["files"]}


def test_tiny_dataset_gets_a_test_example(tmp_path):
    # Three prompts that all hash to the train side: the one nearest the test side moves over.
    prompts = [f"question {i}" for i in range(100)]
    train_side = [p for p in prompts if not is_test(prompt_hash([{"role": "user", "content": p}]))][:3]
    data = write_jsonl(tmp_path / "tiny.jsonl", [pair(p, "good", "bad") for p in train_side])
    report = inspect_dataset(data, workspace=tmp_path / "ws")
    nearest = min(train_side, key=lambda p: (split_bucket(prompt_hash([{"role": "user", "content": p}])),
                                             prompt_hash([{"role": "user", "content": p}])))
    test = read_jsonl(tmp_path / "ws" / "data" / "test.jsonl")
    assert [r["input"]["messages"][0]["content"] for r in test] == [nearest]
    assert (report["train_examples"], report["test_examples"]) == (2, 1)


def test_given_test_file_removes_overlapping_prompts(tmp_path):
    records = synthetic_pairs(10)
    data = write_jsonl(tmp_path / "train.jsonl", records)
    held = write_jsonl(tmp_path / "held.jsonl", [records[2], records[5],
                                                 pair("A new question?", "yes", "no")])
    report = inspect_dataset(data, test_path=held, workspace=tmp_path / "ws")
    assert report["split"]["method"] == "test_file"
    assert report["split"]["test_sha256"] == sha(held)
    assert (report["train_examples"], report["test_examples"]) == (8, 3)
    # records[2] and records[5] are exact copies of test records: counted as duplicates, not kept.
    assert report["duplicates"] == 2
    train = read_jsonl(tmp_path / "ws" / "data" / "train.jsonl")
    assert train == [r for i, r in enumerate(records) if i not in (2, 5)]
    # a different answer to a test prompt is dropped as overlap
    records2 = records + [pair("Tell me about topic 5.", "A fresh answer.", "A fresh bad answer.")]
    report2 = inspect_dataset(write_jsonl(tmp_path / "t2.jsonl", records2), test_path=held,
                              workspace=tmp_path / "ws2")
    assert report2["split"]["overlap_removed"] == 1 and report2["train_examples"] == 8


def test_test_file_must_match_kind(tmp_path, public_datasets):
    with pytest.raises(UserError, match="expected a pairs dataset, but this file is prompts-only"):
        inspect_dataset(public_datasets / "public_pairs.jsonl", test_path=public_datasets / "mtbench_prompts.jsonl",
                        workspace=tmp_path / "ws")


# ---------------------------------------------------------------- dedupe, stats, files


def test_dedupe_turns_roles_and_source_untouched(tmp_path):
    recs = synthetic_pairs(6)
    recs[3] = pair("Multi?", "yes", "no", system="Be brief.")
    reordered = json.dumps({"non_preferred_output": recs[0]["non_preferred_output"],
                            "preferred_output": recs[0]["preferred_output"], "input": recs[0]["input"]})
    data = write_jsonl(tmp_path / "d.jsonl", recs + [recs[1], reordered, recs[3]])
    before = sha(data)
    report = inspect_dataset(data, workspace=tmp_path / "ws")
    assert sha(data) == before == report["sha256"]
    assert report["examples"] == 9 and report["duplicates"] == 3 and report["unique_examples"] == 6
    assert report["train_examples"] + report["test_examples"] == 6
    assert report["turns"] == {"mean": round(7 / 6, 3), "max": 2, "histogram": {"1": 5, "2": 1}}
    assert report["roles"] == {"system": 1, "user": 6, "assistant": 0}
    assert report["with_system"] == 1 and report["with_tools"] == 0
    assert report["chars"]["preferred"]["max"] == max(len(r["preferred_output"][0]["content"]) for r in recs)
    assert report["preferred_longer_share"] == 1.0
    assert report["diagnostics"]["warnings"][0].startswith(
        "length shortcut: the preferred answer is longer in 100% of pairs (characters)")
    saved = json.loads((tmp_path / "ws" / "inspection.json").read_text())
    assert saved["sha256"] == before and saved["duplicates"] == 3


def test_rerun_resumes_without_rewriting(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_pairs(5))
    first = inspect_dataset(data, workspace=tmp_path / "ws")
    stamp = (tmp_path / "ws" / "inspection.json").stat().st_mtime_ns
    assert inspect_dataset(data, workspace=tmp_path / "ws") == first
    assert (tmp_path / "ws" / "inspection.json").stat().st_mtime_ns == stamp
    write_jsonl(data, synthetic_pairs(6))  # changed input: inspected again
    assert inspect_dataset(data, workspace=tmp_path / "ws")["examples"] == 6


def test_bad_data_writes_nothing(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_pairs(4) + ["{oops"])
    with pytest.raises(DatasetError) as info:
        inspect_dataset(data, workspace=tmp_path / "ws")
    assert info.value.errors == [(5, "invalid JSON: Expecting property name enclosed in double quotes (column 2)")]
    assert not (tmp_path / "ws").exists()


def test_shared_formats(tmp_path, public_datasets):
    expect = {"public_pairs.jsonl": ("pairs", "openai", 300), "trl_format_sample.jsonl": ("pairs", "trl", 150),
              "mtbench_prompts.jsonl": ("prompts", "prompts", 80)}
    for name, (fmt, source_format, n) in expect.items():
        report = inspect_dataset(public_datasets / name, workspace=tmp_path / name)
        assert (report["format"], report["source_format"], report["examples"]) == (fmt, source_format, n)
        assert report["duplicates"] == 0 and report["train_examples"] + report["test_examples"] == n
        assert report["sha256"] == sha(public_datasets / name)
        test = read_jsonl(tmp_path / name / "data" / "test.jsonl")
        assert len(test) == report["test_examples"] and all(is_test(h) for h in hashes(test))
        if fmt == "prompts":
            assert set(test[0]) == {"messages"} and "preferred_longer_share" not in report
        else:
            assert set(test[0]) == {"input", "preferred_output", "non_preferred_output"}


# ---------------------------------------------------------------- token counts


def test_token_counts_match_the_chat_template(tmp_path, zoo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo["tokenizer"])
    recs = synthetic_pairs(7) + [pair("Why is the sky blue?", "Because of Rayleigh scattering of sunlight.",
                                      "Paint.", system="Answer like a physicist.")]
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    report = inspect_dataset(data, models=[zoo["tokenizer"]], max_length=40, workspace=tmp_path / "ws")

    def n(msgs, gen):
        return len(tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=False))

    def tail(prompt_msgs, answer):
        """Tokens of what the template adds after the prompt (completion tokenized on its own)."""
        head = tok.apply_chat_template(prompt_msgs, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(prompt_msgs + answer, tokenize=False)
        assert full.startswith(head)
        return len(tok(full[len(head):], add_special_tokens=False)["input_ids"])

    prompt = [n(r["input"]["messages"], True) for r in recs]
    good = [tail(r["input"]["messages"], r["preferred_output"]) for r in recs]
    bad = [tail(r["input"]["messages"], r["non_preferred_output"]) for r in recs]
    # With this ChatML template, splitting at the prompt boundary changes no token: the same as
    # tokenizing the whole conversation and subtracting the prompt.
    assert good == [n(r["input"]["messages"] + r["preferred_output"], False) - p for r, p in zip(recs, prompt, strict=True)]
    stats = report["token_stats"][zoo["tokenizer"]]
    for field, values in (("prompt", prompt), ("preferred", good), ("non_preferred", bad)):
        assert stats[field]["max"] == max(values)
        assert stats[field]["mean"] == round(sum(values) / len(values), 2)
        assert stats[field]["p50"] == sorted(values)[3] / 2 + sorted(values)[4] / 2
    assert stats["preferred_longer_share"] == round(sum(g > b for g, b in zip(good, bad, strict=True)) / 8, 4)
    over = sum(p + max(g, b) > 40 for p, g, b in zip(prompt, good, bad, strict=True))
    assert report["truncated"] == {zoo["tokenizer"]: over}
    assert 0 < over < 8  # the threshold actually splits this data


def test_prompts_token_counts_and_missing_model(tmp_path, zoo, public_datasets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo["models"]["tiny-qwen"])
    path = public_datasets / "mtbench_prompts.jsonl"
    report = inspect_dataset(path, models=[zoo["models"]["tiny-qwen"]], workspace=tmp_path / "ws")
    lengths = [len(tok.apply_chat_template(json.loads(line)["messages"], add_generation_prompt=True,
                                           return_dict=False)) for line in path.read_text().splitlines()]
    stats = report["token_stats"][zoo["models"]["tiny-qwen"]]
    assert set(stats) == {"prompt"}
    assert stats["prompt"]["max"] == max(lengths) and stats["prompt"]["mean"] == round(sum(lengths) / 80, 2)
    with pytest.raises(UserError, match='model "no-such-org/no-such-model" is neither a local folder'):
        inspect_dataset(path, models=["no-such-org/no-such-model"], workspace=tmp_path / "ws2")


# ---------------------------------------------------------------- CLI


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*PREFTUNE, "inspect", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_bad_input_exit_2_without_traceback(tmp_path):
    lines = [json.dumps(r) for r in synthetic_pairs(3)] + ['{"input": 1}'] + ["[]"] * 24
    data = write_jsonl(tmp_path / "bad.jsonl", lines)
    res = cli(str(data), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    err = res.stderr.splitlines()
    assert err[0] == f'preftune inspect: error: {data}:4: missing field "preferred_output"'
    assert err[1] == f"{data}:5: expected a JSON object, got a list"
    assert len(err) == 21 and err[-1] == "... and 5 more problems (25 in all)"
    res = cli(str(data), "--json", cwd=tmp_path)
    out = json.loads(res.stdout)
    assert res.returncode == 2 and out["total_errors"] == 25 and len(out["errors"]) == 20
    assert out["errors"][0] == {"line": 4, "message": 'missing field "preferred_output"'}
    few = write_jsonl(tmp_path / "few.jsonl", synthetic_pairs(2))
    res = cli(str(few), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr == f"preftune inspect: error: {few}: 2 valid examples; at least 3 are needed\n"
    assert not (tmp_path / "workspaces").exists()


def test_cli_json_report_and_default_workspace(tmp_path, public_datasets):
    src = public_datasets / "public_pairs.jsonl"
    before = sha(src)
    res = cli(str(src), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for key in ("format", "source_format", "examples", "duplicates", "train_examples", "test_examples",
                "token_stats", "truncated", "sha256"):
        assert key in out
    assert out["sha256"] == before == sha(src)
    ws = tmp_path / "workspaces" / "public_pairs"
    assert out["workspace"] == str(ws)
    assert len(read_jsonl(ws / "data" / "train.jsonl")) == out["train_examples"]
    assert json.loads((ws / "inspection.json").read_text())["examples"] == 300
    text = cli(str(src), cwd=tmp_path)  # resumed run, readable table
    assert text.returncode == 0
    assert "examples  300   duplicates removed 0" in text.stdout
    assert f"wrote {ws}/inspection.json" in text.stdout
