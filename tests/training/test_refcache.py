"""Reference log-probs: computed once per (model, tokenizer, data, max_length, template), shared."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from preftune.files import file_sha256
from preftune.tasks.training import run_training
from preftune.tasks.training.data import load_pair_records, tokenize_pairs
from preftune.tasks.training.logps import SequenceLogps
from preftune.tasks.training.loop import dataset_logps
from preftune.tasks.training.refcache import reference_key


def test_second_job_of_a_base_model_hits_and_a_new_max_length_misses(small_cfg, tmp_path):
    cache = tmp_path / "rc"
    first = run_training(small_cfg(out=tmp_path / "b01", beta=0.1, ref_cache=cache))
    assert first["ref_cache"] == "miss"
    files = sorted(p.name for p in cache.glob("*.pt"))
    assert len(files) == 1

    second = run_training(small_cfg(out=tmp_path / "b05", beta=0.5, loss_type="ipo", ref_cache=cache))
    assert second["ref_cache"] == "hit"
    assert sorted(p.name for p in cache.glob("*.pt")) == files  # nothing new written

    longer = run_training(small_cfg(out=tmp_path / "ml", max_length=128, ref_cache=cache))
    assert longer["ref_cache"] == "miss"
    assert len(list(cache.glob("*.pt"))) == 2

    simpo = run_training(small_cfg(out=tmp_path / "simpo", loss_type="simpo", beta=2.0, ref_cache=cache))
    assert simpo["ref_cache"] == "skipped"
    assert len(list(cache.glob("*.pt"))) == 2


def test_cached_values_are_the_base_models_log_probs(small_cfg, tmp_path, base_model, marker_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = small_cfg(ref_cache=tmp_path / "rc")
    run_training(cfg)
    (stored,) = list((tmp_path / "rc").glob("*.pt"))
    blob = torch.load(stored, weights_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    pairs = tokenize_pairs(load_pair_records(marker_data["small"]), tokenizer, cfg.max_length)
    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    chosen, rejected = dataset_logps(SequenceLogps(model), pairs, 5, tokenizer.pad_token_id, "cpu")
    torch.testing.assert_close(blob["chosen"], chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(blob["rejected"], rejected, rtol=1e-5, atol=1e-4)
    assert blob["chosen"].shape == (16,) and (blob["chosen"] < 0).all() and (blob["rejected"] < 0).all()


def test_key_changes_with_exactly_its_inputs(tmp_path, base_model, marker_data):
    model = tmp_path / "model"
    shutil.copytree(base_model, model)
    data = marker_data["small"]

    def key(**kw):
        args = dict(model_dir=model, chat_template="T", data=data, max_length=96, max_prompt_length=None,
                    precision="fp32") | kw
        return reference_key(tmp_path / "rc", **args)[0]

    base = key()
    assert key() == base
    assert key(max_length=97) != base
    assert key(max_prompt_length=40) != base
    assert key(chat_template="U") != base
    assert key(data=marker_data["eval"]) != base
    copied = tmp_path / "copy.jsonl"
    shutil.copy(data, copied)
    assert key(data=copied) == base  # content, not the path
    (model / "tokenizer_config.json").write_text((model / "tokenizer_config.json").read_text() + " ")
    assert key() != base
    retok = key()
    weights = model / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    assert key() != retok


def test_a_cache_with_wrong_values_is_recomputed_with_one_log_line(small_cfg, tmp_path, caplog):
    """Valid tensors, wrong values (each log-prob 5 nats off, far past the fp32 tolerance of
    0.05 + 1e-3·|value|): the first use recomputes 3 pairs, sees the disagreement, says so once and
    computes the cache again whole — the job trains on the base's real log-probs."""
    cache = tmp_path / "rc"
    run_training(small_cfg(out=tmp_path / "first", ref_cache=cache))
    (stored,) = list(cache.glob("*.pt"))
    real = torch.load(stored, weights_only=True)
    doctored = {**real, "chosen": real["chosen"] + 5.0, "rejected": real["rejected"] - 5.0}
    torch.save(doctored, stored)
    stored.with_suffix(".sha256").write_text(json.dumps([file_sha256(stored)]))  # re-hashed: the sample is left
    with caplog.at_level("WARNING", logger="preftune.refcache"):
        again = run_training(small_cfg(out=tmp_path / "second", ref_cache=cache))
    assert again["ref_cache"] == "miss"
    lines = [r.getMessage() for r in caplog.records if r.name == "preftune.refcache"]
    assert len(lines) == 1 and "disagrees with 3 pairs recomputed (max difference" in lines[0]
    healed = torch.load(stored, weights_only=True)
    torch.testing.assert_close(healed["chosen"], real["chosen"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(healed["rejected"], real["rejected"], rtol=1e-5, atol=1e-4)
    third = run_training(small_cfg(out=tmp_path / "third", ref_cache=cache))
    assert third["ref_cache"] == "hit"  # the healed cache passes the check


def test_a_cache_edited_off_the_checked_pairs_is_refused_by_its_digest(small_cfg, tmp_path, caplog):
    """A few values edited (not the first, middle or last pair, which a fixed sample checked): the
    bytes no longer match the digest written with the cache, so it is computed again, said once."""
    cache = tmp_path / "rc"
    run_training(small_cfg(out=tmp_path / "first", ref_cache=cache))
    (stored,) = list(cache.glob("*.pt"))
    real = torch.load(stored, weights_only=True)
    n = len(real["chosen"])
    edited = real["chosen"].clone()
    edited[[1, 2, n - 2]] += 5.0
    torch.save({**real, "chosen": edited}, stored)
    with caplog.at_level("WARNING", logger="preftune.refcache"):
        again = run_training(small_cfg(out=tmp_path / "second", ref_cache=cache))
    assert again["ref_cache"] == "miss"
    lines = [r.getMessage() for r in caplog.records if r.name == "preftune.refcache"]
    assert lines == [f"reference cache {stored.name} changed since it was written: computing it again"], lines
    torch.testing.assert_close(torch.load(stored, weights_only=True)["chosen"], real["chosen"], rtol=1e-5, atol=1e-4)


def test_a_truncated_cache_file_is_a_miss(small_cfg, tmp_path):
    cache = tmp_path / "rc"
    run_training(small_cfg(out=tmp_path / "first", ref_cache=cache))
    (stored,) = list(cache.glob("*.pt"))
    good = torch.load(stored, weights_only=True)
    stored.write_bytes(stored.read_bytes()[: stored.stat().st_size // 2])
    again = run_training(small_cfg(out=tmp_path / "second", ref_cache=cache))
    assert again["ref_cache"] == "miss"
    torch.testing.assert_close(torch.load(stored, weights_only=True)["chosen"], good["chosen"], rtol=1e-5, atol=1e-4)


def test_disagreement_tolerance_by_hand():
    """fp32: |stored − fresh| may reach 0.05 + 1e-3·|fresh|: at fresh −100 that is 0.15 nats."""
    from preftune.tasks.training.refcache import check_indices, disagreement

    assert check_indices(2) == [0, 1] and check_indices(1) == [0] and check_indices(0) == []
    drawn = [check_indices(100) for _ in range(20)]
    assert all(len(set(d)) == 3 and d == sorted(d) and 0 <= d[0] and d[-1] < 100 for d in drawn)
    assert len({tuple(d) for d in drawn}) > 1  # not a fixed set an edit could avoid
    stored = {"chosen": torch.tensor([-100.0, -50.0]), "rejected": torch.tensor([-80.0, -40.0])}
    fresh = (torch.tensor([-100.14, -50.0]), torch.tensor([-80.0, -40.0]))
    assert disagreement(stored, [0, 1], fresh, "fp32") is None
    off = (torch.tensor([-100.2, -50.0]), torch.tensor([-80.0, -40.0]))
    assert disagreement(stored, [0, 1], off, "fp32") == pytest.approx(0.2, abs=1e-4)
    assert disagreement(stored, [0, 1], off, "bf16") is None  # bf16: 1.0 + 2e-2·|value|
    nan = {"chosen": torch.tensor([float("nan"), -50.0]), "rejected": stored["rejected"]}
    assert disagreement(nan, [0, 1], fresh, "fp32") == float("inf")
