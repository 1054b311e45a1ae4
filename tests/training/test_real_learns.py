"""Training on the real model, SmolLM2-135M-Instruct (tied embeddings, 49,152-token vocabulary).

That LoRA DPO *learns* on it and stays fluent is measured in bench/bench_real_learns.py (too slow
for the suite: ~7 CPU-minutes, 18 minutes wall on a shared 2-core machine).
"""

from __future__ import annotations

from preftune.tasks.generate import generate_with
from tests.training.conftest import write_jsonl
from tests.training.marker_data import corpus_chats, marker_pair


def test_preftune_train_full_on_the_real_model_keeps_tied_embeddings(real_model, tmp_path):
    """`preftune train --full` on the real model: a full model folder that loads, whose output layer is
    still the input embedding (tied, saved once), and that still answers in English."""
    import json
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from preftune.hf import load_tokenizer

    data = write_jsonl(tmp_path / "pairs.jsonl", [marker_pair(c) for c in corpus_chats("train")[:4]])
    out = subprocess.run([sys.executable, "-m", "preftune.cli", "train", "--full", "--model", real_model["path"],
                          "--data", str(data), "--out", str(tmp_path / "job"), "--batch-size", "2",
                          "--max-length", "64", "--lr", "1e-6", "--num-threads", "2", "--json"],
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["full"] is True and summary["steps"] == 2 and summary["adapter_dir"] is None
    model = AutoModelForCausalLM.from_pretrained(summary["model_dir"])
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    tokenizer = load_tokenizer(summary["model_dir"])
    assert tokenizer.eos_token == "<|im_end|>"
    answer = generate_with(model.eval(), tokenizer, [[{"role": "user", "content": "What is the capital of France?"}]],
                           max_new_tokens=12)[0]
    assert "Paris" in answer, answer
