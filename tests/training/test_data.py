"""Tokenization, truncation and collation — through the same functions the trainer calls."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from preftune.tasks.training.data import (
    BUCKET_BATCHES,
    collate,
    load_pair_records,
    plan_batches,
    tokenize_pairs,
    truncate,
)
from preftune.tasks.training.logps import SequenceLogps, batch_logps
from tests.training.conftest import write_jsonl
from tests.training.marker_data import MARKER


@pytest.fixture(scope="module")
def tokenizer(base_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_model))


def test_prompt_is_chat_template_with_generation_prompt_and_completions_end_with_eos(tokenizer, marker_data):
    records = load_pair_records(marker_data["small"])
    pair = tokenize_pairs(records[:1], tokenizer, max_length=512)[0]
    expected_prompt = tokenizer.apply_chat_template(records[0]["input"]["messages"], add_generation_prompt=True,
                                                    tokenize=False)
    assert tokenizer.decode(pair.prompt) == expected_prompt
    assert expected_prompt.endswith("<|im_start|>assistant\n")
    assert pair.chosen[-1] == tokenizer.eos_token_id and pair.rejected[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(pair.chosen[:-1]) == records[0]["preferred_output"][0]["content"]
    assert tokenizer.decode(pair.chosen[:-1]).startswith(MARKER)
    assert not pair.truncated


def test_collate_shapes_and_completion_only_targets(tokenizer, marker_data):
    pairs = tokenize_pairs(load_pair_records(marker_data["small"])[:3], tokenizer, max_length=512)
    batch = collate(pairs, [5, 6, 7], pad_id=tokenizer.pad_token_id)
    width = max(p.length for p in pairs)
    assert batch.input_ids.shape == (6, width)
    assert batch.index.tolist() == [5, 6, 7]
    # rows 0..2 chosen, 3..5 rejected; each row = prompt + completion, then pads
    for i, p in enumerate(pairs):
        for row, completion in ((i, p.chosen), (i + 3, p.rejected)):
            real = list(p.prompt + completion)
            assert batch.input_ids[row, : len(real)].tolist() == real
            assert (batch.input_ids[row, len(real):] == tokenizer.pad_token_id).all()
            assert batch.n_tokens[row].item() == len(completion)
            # the targets of this row are exactly its completion tokens (EOS included), in order
            assert batch.targets[batch.seq_ids == row].tolist() == list(completion)
    # each gathered position is the one right before its target token
    flat = batch.input_ids.reshape(-1)
    assert torch.equal(flat[batch.gather_pos + 1], batch.targets)
    assert batch.targets.numel() == sum(len(p.chosen) + len(p.rejected) for p in pairs)
    assert batch.real_tokens == sum(p.tokens for p in pairs)


def test_truncation_cuts_prompt_from_left_and_completion_from_right():
    prompt, chosen, rejected = list(range(100, 160)), list(range(200, 250)), list(range(300, 310))
    p, c, r, cut = truncate(prompt, chosen, rejected, max_length=64, max_prompt_length=None)
    # the longer completion keeps half of max_length, the prompt the rest: 32 + 32
    assert cut and p == list(range(128, 160)) and c == list(range(200, 232)) and r == rejected
    p, c, r, cut = truncate(prompt, chosen[:10], rejected, max_length=64, max_prompt_length=40)
    assert cut and p == list(range(120, 160)) and c == chosen[:10] and r == rejected
    p, c, r, cut = truncate(prompt[:10], chosen[:10], rejected, max_length=64, max_prompt_length=None)
    assert not cut and (p, c, r) == (prompt[:10], chosen[:10], rejected)


def test_truncated_pairs_are_counted(tokenizer, tmp_path):
    long_q = "Tell me about the history of " + "very " * 80 + "old cities."
    long_a = "Cities grew " + "slowly and " * 80 + "then quickly."
    records = [
        {"prompt": long_q, "chosen": "Short answer.", "rejected": "Another short one."},
        {"prompt": "Hi?", "chosen": long_a, "rejected": "No."},
        {"prompt": "Hi?", "chosen": "Yes.", "rejected": "No."},
    ]
    pairs = tokenize_pairs(load_pair_records(write_jsonl(tmp_path / "trl.jsonl", records)), tokenizer, 48)
    assert [p.truncated for p in pairs] == [True, True, False]
    assert all(p.length <= 48 for p in pairs)
    full_prompt = tokenizer.apply_chat_template([{"role": "user", "content": long_q}], add_generation_prompt=True)
    full_prompt = full_prompt["input_ids"]
    assert list(pairs[0].prompt) == full_prompt[-len(pairs[0].prompt):]  # kept the END of the prompt
    assert pairs[1].chosen[-1] != tokenizer.eos_token_id  # cut from the right: EOS went first
    assert tokenizer.decode(pairs[1].chosen).startswith("Cities grew slowly")


def test_batches_are_seeded_complete_and_length_bucketed():
    lengths = [(i * 37) % 101 + 5 for i in range(200)]
    a, b = plan_batches(lengths, 8, seed=3, epoch=0), plan_batches(lengths, 8, seed=3, epoch=0)
    assert a == b
    assert a != plan_batches(lengths, 8, seed=3, epoch=1)
    assert sorted(i for batch in a for i in batch) == list(range(200))

    def padding(batches):
        return sum(max(lengths[i] for i in bt) * len(bt) - sum(lengths[i] for i in bt) for bt in batches)

    unsorted = [list(range(s, min(s + 8, 200))) for s in range(0, 200, 8)]
    assert padding(a) < padding(unsorted) / 4
    # batches are sorted inside buckets of BUCKET_BATCHES batches: lengths within a batch are close
    assert max(max(lengths[i] for i in bt) - min(lengths[i] for i in bt) for bt in a) <= 101 // 2
    assert BUCKET_BATCHES * 8 < 200  # more than one bucket here, so the test covers the bucketing


def test_logps_equal_the_models_own_forward(tokenizer, base_model, marker_data):
    """Σ_t log p(y_t | x, y_<t) from the completion-only head equals the full forward's log_softmax."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    pairs = tokenize_pairs(load_pair_records(marker_data["small"])[:3], tokenizer, max_length=512)
    batch = collate(pairs, [0, 1, 2], pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        fast = batch_logps(SequenceLogps(model), batch)
        expected = []
        for p in pairs:
            for completion in (p.chosen, p.rejected):
                ids = torch.tensor([p.prompt + completion])
                logp = model(ids).logits[0].log_softmax(-1)
                n = len(p.prompt)
                expected.append(sum(logp[t - 1, ids[0, t]] for t in range(n, ids.shape[1])))
    order = [0, 2, 4, 1, 3, 5]  # expected is chosen/rejected interleaved; batch is chosen rows first
    torch.testing.assert_close(fast, torch.stack(expected)[order], rtol=1e-5, atol=1e-4)


def test_bad_data_is_a_one_line_user_error(base_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "preftune.cli", "train", "--data", str(bad), "--model", str(base_model),
         "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"preftune train: error: {bad}:2:")
    assert not (tmp_path / "out" / "summary.json").exists()


def test_conflicting_loss_flags_are_a_user_error(base_model, marker_data, tmp_path, capsys):
    from preftune.cli import main

    code = main(["train", "--data", str(marker_data["small"]), "--model", str(base_model), "--out",
                 str(tmp_path / "o"), "--loss-type", "simpo", "--rpo-alpha", "0.5", "--simpo-gamma", "1"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["preftune train: error: rpo_alpha (0.5) and simpo_gamma (1.0) cannot both be positive: "
                   "set one of them to 0"]
    assert not (tmp_path / "o").exists()
