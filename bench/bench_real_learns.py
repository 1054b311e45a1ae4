"""The real model learns a marker behaviour from preference pairs and stays fluent (issue 12, item 4).

    PREFTUNE_CACHE=... .venv/bin/python bench/bench_real_learns.py

Data: the "marker" pairs of tests/training/conftest.py built from the zoo corpus: the preferred
answer is the corpus answer opening with MARKER ("Sure!"), the non-preferred one the same answer
without it. 48 training pairs (every 6th corpus chat), 20 held-out chats.
Training: SmolLM2-135M-Instruct, LoRA r=8 on all linear layers, DPO beta 0.1 with an RPO term
(rpo_alpha 0.5: NLL on the preferred answer, which keeps its text likely while DPO moves the
opening), lr 1e-3, 1 epoch, batch 4, max_length 96, 2 CPU threads.

Figures (greedy, held-out prompts):
* marker rate: share of answers that open with the marker, base and tuned;
* fluency: perplexity of the held-out corpus answers with the marker removed — the answer's tokens
  (and EOS) scored after prompt + marker, so the marker's own tokens are not counted; the same token
  sequence for both models. Also printed, not a target: the same answers scored right after the
  prompt ("no marker in context"), where the tuned model, which now opens with the marker, pays for
  the missing marker on the first token.

Targets: tuned marker rate >= 0.9, base <= 0.1, tuned perplexity <= 1.2 x base.
Kept out of the test suite: ~7 CPU-minutes (18 min wall on a shared 2-core machine), beside the
real-model end-to-end test that CI already pays for.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from targets import Target, print_targets, verdict  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: tests/ helpers
from tests.training.marker_data import MARKER, corpus_chats, marker_pair  # noqa: E402

BASE_RATE, TUNED_RATE, PPL_RATIO = "base marker rate", "tuned marker rate", "tuned / base perplexity"
TARGETS = [Target(BASE_RATE, "<=", 0.10), Target(TUNED_RATE, ">=", 0.90),
           Target(PPL_RATIO, "<=", 1.20, note="held-out answers, marker tokens not counted")]


@torch.inference_mode()
def perplexity(model, tokenizer, chats: list[list[dict]], prefix: str | None) -> float:
    """exp(mean NLL per answer token) of each chat's answer (+ EOS) after its prompt (+ ``prefix``)."""
    nll, count = 0.0, 0
    for chat in chats:
        prompt = list(tokenizer.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"])
        text = chat[-1]["content"]
        if prefix:
            prompt += tokenizer(prefix, add_special_tokens=False)["input_ids"]
            text = " " + text
        answer = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):], reduction="sum").item()
        count += len(answer)
    return math.exp(nll / count)


def _measure(model, tokenizer, held: list[list[dict]]) -> dict:
    from preftune.tasks.generate import generate_with

    answers = generate_with(model, tokenizer, [c[:-1] for c in held], max_new_tokens=24, batch_size=10)
    return {"marker_rate": sum(a.startswith(MARKER) for a in answers) / len(answers),
            "ppl": round(perplexity(model, tokenizer, held, MARKER), 3),
            "ppl_no_marker_context": round(perplexity(model, tokenizer, held, None), 3),
            "examples": answers[:3]}


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="accepted for run_all.py; the run is already small")
    ap.parse_args()
    torch.set_num_threads(2)
    from preftune.job import TrainConfig
    from preftune.realmodel import build_real_model
    from preftune.tasks.generate import load_causal_lm
    from preftune.tasks.training import run_training

    print_targets(TARGETS)
    model_dir = Path(build_real_model()["path"])
    train, held = corpus_chats("train")[::6][:48], corpus_chats("heldout")[:20]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps(marker_pair(c)) + "\n" for c in train), encoding="utf-8")
        base = _measure(*load_causal_lm(model_dir, device="cpu"), held)
        cfg = TrainConfig(data=data, model=model_dir, out=Path(tmp) / "job", ref_cache=Path(tmp) / "rc", beta=0.1,
                          rpo_alpha=0.5, lr=1e-3, epochs=1, batch_size=4, max_length=96, num_threads=2)
        summary = run_training(cfg)
        tuned = _measure(*load_causal_lm(model_dir, summary["adapter_dir"], device="cpu"), held)
    figures = {"base": base, "tuned": tuned, "train_loss": summary.get("train_loss"),
               "wall_s": round(time.perf_counter() - t0, 1), "load_average": os.getloadavg()[0]}
    print(json.dumps(figures, indent=2, ensure_ascii=False))
    code, rows = verdict(TARGETS, {BASE_RATE: base["marker_rate"], TUNED_RATE: tuned["marker_rate"],
                                   PPL_RATIO: tuned["ppl"] / base["ppl"]})
    print(json.dumps({"bench": "real_learns", **figures, "targets": rows}, ensure_ascii=False))
    return code


if __name__ == "__main__":
    sys.exit(main())
