"""Evidence that training learns on the real model, SmolLM2-135M-Instruct, and keeps it fluent.

The marker pairs of tests/training/conftest.py (the preferred answer is the corpus answer opening
with MARKER, the non-preferred one the same answer without it) on the real model, LoRA DPO:
greedy held-out answers open with the marker in ≥ 90% of cases (the base model: ≤ 10%), and the
model's perplexity on the held-out corpus answers (the preferred answers with the marker removed)
stays within +20% of the base model's — it learned the marker, not to forget English.

The loss is DPO with a small RPO term, as on the tiny model (tests/training/test_learns.py): the
non-preferred answer is the preferred one's own text minus the marker, and the NLL term keeps that
text likely while DPO moves the opening.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from preftune.job import TrainConfig
from preftune.tasks.generate import generate_with, load_causal_lm
from preftune.tasks.training import run_training
from tests.training.conftest import MARKER, corpus_chats, marker_pair, write_jsonl


@torch.inference_mode()
def perplexity(model, tokenizer, chats: list[list[dict]]) -> float:
    """exp(mean NLL per answer token) of each chat's last (assistant) message after its prompt,
    the answer ending with EOS — exactly the tokens the trainer scores."""
    nll, count = 0.0, 0
    for chat in chats:
        prompt = tokenizer.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        answer = tokenizer(chat[-1]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([list(prompt) + answer])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):], reduction="sum").item()
        count += len(answer)
    return math.exp(nll / count)


def marker_rate(texts: list[str]) -> float:
    return sum(t.startswith(MARKER) for t in texts) / len(texts)


def test_lora_dpo_learns_the_marker_and_stays_fluent(real_model, tmp_path):
    model_dir = Path(real_model["path"])
    train = corpus_chats("train")[::6][:48]
    held = corpus_chats("heldout")[:20]
    data = write_jsonl(tmp_path / "train.jsonl", [marker_pair(c) for c in train])
    prompts = [c[:-1] for c in held]

    model, tokenizer = load_causal_lm(model_dir, device="cpu")
    base_answers = generate_with(model, tokenizer, prompts, max_new_tokens=4, batch_size=10)
    base_ppl = perplexity(model, tokenizer, held)
    del model

    cfg = TrainConfig(data=data, model=model_dir, out=tmp_path / "job", ref_cache=tmp_path / "rc", beta=0.1,
                      rpo_alpha=0.2, lr=1e-3, epochs=1, batch_size=4, max_length=96, num_threads=2)
    summary = run_training(cfg)
    model, tokenizer = load_causal_lm(model_dir, summary["adapter_dir"], device="cpu")
    tuned_answers = generate_with(model, tokenizer, prompts, max_new_tokens=4, batch_size=10)
    tuned_ppl = perplexity(model, tokenizer, held)

    figures = {"base_marker": marker_rate(base_answers), "tuned_marker": marker_rate(tuned_answers),
               "base_ppl": round(base_ppl, 3), "tuned_ppl": round(tuned_ppl, 3)}
    print(figures)
    assert figures["base_marker"] <= 0.10, (figures, base_answers)
    assert figures["tuned_marker"] >= 0.90, (figures, tuned_answers)
    assert tuned_ppl <= 1.20 * base_ppl, figures


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
