"""preftune.records: format detection, per-line validation with exact line numbers, conversion."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest

from preftune.errors import UserError
from preftune.records import (
    MAX_LISTED,
    DatasetError,
    RecordReader,
    iter_records,
    load_pairs,
    load_prompts,
    prompt_hash,
)


def pair(prompt: str = "What is Einstein famous for?", good: str = "Relativity.", bad: str = "Cooking.",
         **extra) -> dict:
    rec = {"input": {"messages": [{"role": "user", "content": prompt}]},
           "preferred_output": [{"role": "assistant", "content": good}],
           "non_preferred_output": [{"role": "assistant", "content": bad}]}
    rec.update(extra)
    return rec


def write(tmp_path: Path, lines: list, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    with open(path, "wb") as fh:
        for line in lines:
            if isinstance(line, bytes):
                fh.write(line + b"\n")
            elif isinstance(line, str):
                fh.write(line.encode("utf-8") + b"\n")
            else:
                fh.write(json.dumps(line).encode("utf-8") + b"\n")
    return path


def good_pairs(n: int = 3) -> list[dict]:
    return [pair(f"question {i}?", f"good answer {i}", f"bad answer {i}") for i in range(n)]


def errors_of(path: Path, loader=load_pairs) -> list[tuple[int | None, str]]:
    with pytest.raises(DatasetError) as info:
        loader(path)
    return info.value.errors


# ---------------------------------------------------------------- formats


def test_shared_openai_pairs(public_datasets):
    reader = RecordReader(public_datasets / "public_pairs.jsonl")
    records = [rec for _, rec in reader]
    assert reader.format == "openai"
    assert len(records) == 300
    assert reader.sha256 == "3e4fd39920af3918262b18c56b8d760d544fa2d6659edd08341a493032333538"
    first = json.loads((public_datasets / "public_pairs.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert records[0] == first  # canonical format passes through unchanged


def test_shared_trl_string_format(public_datasets):
    path = public_datasets / "trl_format_sample.jsonl"
    records = load_pairs(path)
    assert len(records) == 150
    src = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert records[0] == {"input": {"messages": [{"role": "user", "content": src["prompt"]}]},
                          "preferred_output": [{"role": "assistant", "content": src["chosen"]}],
                          "non_preferred_output": [{"role": "assistant", "content": src["rejected"]}]}


def test_shared_prompts_format(public_datasets):
    reader = RecordReader(public_datasets / "mtbench_prompts.jsonl")
    records = [rec for _, rec in reader]
    assert reader.format == "prompts" and len(records) == 80
    assert records[0]["messages"][0]["role"] == "user"
    assert records[0]["messages"][0]["content"].startswith("Compose an engaging travel blog post")
    assert load_prompts(public_datasets / "mtbench_prompts.jsonl") == records


def test_trl_message_lists_and_implicit_prompt(tmp_path):
    sys_msg = {"role": "system", "content": "Be brief."}
    explicit = {"prompt": [sys_msg, {"role": "user", "content": "Q1"}],
                "chosen": [{"role": "assistant", "content": "good"}],
                "rejected": [{"role": "assistant", "content": "bad"}]}
    implicit = {"chosen": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "good2"}],
                "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "bad2"}]}
    mixed = {"prompt": "Q3", "chosen": "good3", "rejected": [{"role": "assistant", "content": "bad3"}]}
    path = write(tmp_path, [explicit, implicit, mixed])
    reader = RecordReader(path)
    records = [rec for _, rec in reader]
    assert reader.format == "trl"
    assert records[0]["input"]["messages"] == [sys_msg, {"role": "user", "content": "Q1"}]
    assert records[1] == {"input": {"messages": [{"role": "user", "content": "Q2"}]},
                          "preferred_output": [{"role": "assistant", "content": "good2"}],
                          "non_preferred_output": [{"role": "assistant", "content": "bad2"}]}
    assert records[2]["input"]["messages"] == [{"role": "user", "content": "Q3"}]
    assert records[2]["non_preferred_output"] == [{"role": "assistant", "content": "bad3"}]


def test_tools_kept_and_line_numbers_yielded(tmp_path):
    tools = [{"type": "function", "function": {"name": "add"}}]
    rec = pair()
    rec["input"]["tools"] = tools
    path = write(tmp_path, [rec, "", pair("b"), pair("c")])
    out = list(iter_records(path))
    assert [line for line, _ in out] == [1, 3, 4]
    assert out[0][1]["input"]["tools"] == tools


def test_bom_and_blank_lines_accepted(tmp_path):
    lines = [json.dumps(r) for r in good_pairs(3)]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + lines[0].encode() + b"\n\n   \n" + lines[1].encode() + b"\r\n\n"
                     + lines[2].encode())  # last line without a newline, CRLF in the middle
    out = list(iter_records(path))
    assert [line for line, _ in out] == [1, 4, 6]
    assert out[0][1] == good_pairs(3)[0]
    assert RecordReader(path).sha256 is None  # only known after reading
    reader = RecordReader(path)
    list(reader)
    assert reader.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_extra_fields_ignored(tmp_path):
    recs = [pair(f"q{i}", id=i, score=0.5) for i in range(3)]
    assert load_pairs(write(tmp_path, recs)) == [pair(f"q{i}") for i in range(3)]


# ---------------------------------------------------------------- each class of bad input


BAD_CASES = [
    ("{not json", "invalid JSON: Expecting property name enclosed in double quotes (column 2)"),
    ("[1, 2]", "expected a JSON object, got a list"),
    (json.dumps({k: v for k, v in pair().items() if k != "non_preferred_output"}),
     'missing field "non_preferred_output"'),
    (json.dumps({"input": pair()["input"], "prefered_output": pair()["preferred_output"],
                 "non_preferred_output": pair()["non_preferred_output"]}),
     'unknown field "prefered_output" (did you mean "preferred_output"?)'),
    (json.dumps(pair() | {"input": {"mesages": [{"role": "user", "content": "x"}]}}),
     'unknown field "input.mesages" (did you mean "input.messages"?)'),
    (json.dumps(pair() | {"input": "hello"}), '"input" must be an object, got a string'),
    (json.dumps(pair() | {"preferred_output": {"role": "assistant", "content": "x"}}),
     '"preferred_output" must be a list of messages, got an object'),
    (json.dumps(pair() | {"input": {"messages": [{"role": "robot", "content": "x"}]}}),
     '"input.messages[0].role" is "robot"; expected "system", "user" or "assistant"'),
    (json.dumps(pair() | {"input": {"messages": [{"role": "user", "content": "  "}]}}),
     '"input.messages[0].content" is empty'),
    (json.dumps(pair() | {"input": {"messages": [{"role": "user", "content": ["x"]}]}}),
     '"input.messages[0].content" must be a string, got a list'),
    (json.dumps(pair() | {"input": {"messages": [{"role": "user"}]}}),
     'missing field "input.messages[0].content"'),
    (json.dumps(pair() | {"preferred_output": [{"role": "assistant", "content": "a"}] * 2}),
     '"preferred_output" must hold exactly one assistant message, got 2 messages'),
    (json.dumps(pair() | {"non_preferred_output": [{"role": "user", "content": "a"}]}),
     '"non_preferred_output[0].role" is "user"; the output must be an assistant message'),
    (json.dumps(pair(good="same", bad="same")), "preferred and non-preferred outputs are identical"),
    (json.dumps(pair() | {"input": {"messages": [{"role": "user", "content": "q"},
                                                   {"role": "assistant", "content": "a"}]}}),
     '"input.messages" ends with an assistant turn; the outputs must be the last assistant message'),
    (json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}),
     "record is in TRL prompt/chosen/rejected format, but this file is OpenAI/Fireworks pairs (from line 1);"
     " one file must be one format"),
    (b'{"input": {"messages": [{"role": "user", "content": "caf\xe9"}]}}', "invalid UTF-8 at byte 57 of the line"),
]


@pytest.mark.parametrize("bad,message", BAD_CASES, ids=[m[:40] for _, m in BAD_CASES])
def test_each_bad_line_reported_with_its_line(tmp_path, bad, message):
    good = [json.dumps(r) for r in good_pairs(4)]
    path = write(tmp_path, [good[0], "", good[1], bad, good[2], good[3]])
    errors = errors_of(path)
    assert errors == [(4, message)]


def test_trl_bad_lines(tmp_path):
    lines = [{"prompt": "q1", "chosen": "a", "rejected": "b"},
             {"prompt": "q2", "chosen": "a", "rejected": "a"},
             {"prompt": "q3", "chosen": "", "rejected": "b"},
             {"prompt": "q4", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
             {"promt": "q5", "chosen": "a", "rejected": "b"},
             {"prompt": "q6", "chosen": 3, "rejected": "b"},
             {"prompt": "q7", "chosen": "a", "rejected": "b"},
             {"prompt": "q8", "chosen": "a", "rejected": "b"}]
    errors = errors_of(write(tmp_path, lines))
    assert errors == [(2, "preferred and non-preferred outputs are identical"),
                      (3, '"chosen" is empty'),
                      (4, '"chosen" must end with an assistant message, got user'),
                      (5, 'unknown field "promt" (did you mean "prompt"?)'),
                      (6, '"chosen" must be a string or a list of messages, got a number')]


def test_prompts_bad_lines(tmp_path):
    user = {"role": "user", "content": "hello"}
    lines = [{"messages": [user]}, {"messages": [user, {"role": "assistant", "content": "hi"}]},
             {"messages": []}, {"messages": [{"role": "system", "content": "sys"}]},
             {"messages": [user]}, {"messages": [user]}]
    errors = errors_of(write(tmp_path, lines), load_prompts)
    assert errors == [
        (2, '"messages" ends with an assistant turn; the outputs must be the last assistant message'),
        (3, '"messages" is an empty list'),
        (4, '"messages" ends with a system turn; it must end with a user turn')]


def test_error_listing_caps_at_twenty(tmp_path):
    lines = [json.dumps(r) for r in good_pairs(3)] + ["{oops"] * 25
    with pytest.raises(DatasetError) as info:
        load_pairs(write(tmp_path, lines))
    err = info.value
    assert err.total == 25 and len(err.errors) == MAX_LISTED
    assert [line for line, _ in err.errors] == list(range(4, 24))
    assert str(err) == f"{tmp_path / 'data.jsonl'}:4: invalid JSON: Expecting property name enclosed in " \
                       "double quotes (column 2)"
    shown = err.lines()
    assert len(shown) == 21 and shown[-1] == "... and 5 more problems (25 in all)"
    assert isinstance(err, UserError) and err.line == 4
    again = pickle.loads(pickle.dumps(err))
    assert (again.errors, again.total, str(again)) == (err.errors, err.total, str(err))


def test_too_few_examples(tmp_path):
    path = write(tmp_path, [json.dumps(r) for r in good_pairs(2)] + [""])
    with pytest.raises(DatasetError) as info:
        list(RecordReader(path))  # the intake rule (what `inspect` applies)
    assert info.value.errors == [(None, "2 valid examples; at least 3 are needed")]
    assert str(info.value) == f"{path}: 2 valid examples; at least 3 are needed"
    with pytest.raises(DatasetError):
        load_pairs(path, min_examples=3)
    # Files the pipeline wrote itself (a small test split) load whatever their size.
    assert load_pairs(path) == good_pairs(2)
    assert list(iter_records(write(tmp_path, [], "empty.jsonl"))) == []


def test_too_many_examples(tmp_path):
    path = write(tmp_path, [json.dumps(r) for r in good_pairs(6)])
    reader = RecordReader(path, max_examples=4)
    with pytest.raises(DatasetError) as info:
        list(reader)
    assert info.value.errors == [(None, "more than 4 examples (the limit)")]


def test_wrong_kind_for_loader(public_datasets):
    with pytest.raises(UserError) as info:
        load_prompts(public_datasets / "public_pairs.jsonl")
    assert str(info.value).endswith(
        "public_pairs.jsonl:1: expected a prompts dataset, but this file is OpenAI/Fireworks pairs (line 1)")


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="dataset file not found"):
        load_pairs(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- prompt hash


def test_prompt_hash_is_stable_and_canonical():
    msgs = [{"role": "user", "content": "What is Einstein famous for?"}]
    # Fixed value: the split and caches depend on it staying the same on every machine.
    expected = hashlib.sha256(
        b'{"messages":[{"content":"What is Einstein famous for?","role":"user"}],"tools":[]}').hexdigest()
    assert prompt_hash(msgs) == expected
    assert prompt_hash([{"content": msgs[0]["content"], "role": "user", "name": "x"}]) == expected
    assert prompt_hash(msgs, tools=[{"type": "function"}]) != expected
    assert prompt_hash([{"role": "user", "content": "What is Einstein famous for"}]) != expected


def test_public_samples_are_the_documented_files(public_datasets):
    """The bundled samples are byte for byte what SOURCES.md records (no silent edits)."""
    import hashlib
    import re

    table = dict(re.findall(r"\| `([\w.]+\.jsonl)` \| \d+ \| `([0-9a-f]{64})` \|",
                            (public_datasets / "SOURCES.md").read_text(encoding="utf-8")))
    assert set(table) == {"public_pairs.jsonl", "mtbench_prompts.jsonl", "trl_format_sample.jsonl"}
    for name, digest in table.items():
        assert hashlib.sha256((public_datasets / name).read_bytes()).hexdigest() == digest, name
