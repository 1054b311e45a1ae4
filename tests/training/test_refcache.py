"""Reference log-probs: computed once per (model, tokenizer, data, max_length, template), shared."""

from __future__ import annotations

import shutil

import torch

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
