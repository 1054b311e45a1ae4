"""Held-out reward accuracy and margins on public human preferences, before and after a short
LoRA DPO run on the real model (SmolLM2-135M-Instruct).

    PREFTUNE_CACHE=... .venv/bin/python bench/bench_real_hh.py            # 96 train / 40 held-out pairs
    .venv/bin/python bench/bench_real_hh.py --quick                       # 32 train / 16 held-out

Data: the bundled Anthropic HH-RLHF harmless-base sample (tests/data/public/public_pairs.jsonl
lines 129–300, 172 human-labelled pairs; see its SOURCES.md): the first --train pairs train, the
last --heldout pairs are held out. Training: LoRA r=8 on all linear layers, DPO beta 0.1, 1 epoch,
batch 4, lr 5e-4, max_length 192, 2 CPU threads.

Figures, on the held-out pairs:
* log-prob margin: mean over pairs of log p(chosen) − log p(rejected) (summed over completion tokens,
  each completion ending with EOS), and its accuracy (share of pairs with margin > 0), for the base
  model and for the tuned one;
* DPO implicit reward margin β·[(log π − log π_ref)(chosen) − (…)(rejected)] and its accuracy: 0 and
  0 for the base by definition (π = π_ref); the trainer's held-out eval for the tuned model.

Target: the tuned model's held-out log-prob accuracy is not below the base's (human preferences on
harmlessness are hard for a 135M model in 100 pairs; what must hold is that DPO moves the held-out
margin the right way: tuned mean margin > base mean margin).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from targets import Target, print_targets, verdict  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data" / "public" / "public_pairs.jsonl"
FIRST, LAST = 129, 300  # the HH-RLHF lines (1-based, inclusive)
MARGIN_GAIN = "held-out log-prob margin, tuned - base"
TARGETS = [Target(MARGIN_GAIN, ">=", 0.0, "nats", note="DPO moves held-out preferences the right way")]


@torch.inference_mode()
def logp_margins(model, tokenizer, pairs: list[dict], max_length: int) -> list[float]:
    """log p(chosen) − log p(rejected) per pair, each capped to max_length tokens like the trainer."""
    out = []
    for p in pairs:
        prompt = list(tokenizer.apply_chat_template(p["input"]["messages"], add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)["input_ids"])
        prompt = prompt[-(max_length // 2):]
        sides = []
        for key in ("preferred_output", "non_preferred_output"):
            ans = tokenizer(p[key][-1]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ans = ans[:max_length - len(prompt)]
            ids = torch.tensor([prompt + ans])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            sides.append(-torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):], reduction="sum").item())
        out.append(sides[0] - sides[1])
    return out


def _stats(margins: list[float]) -> dict:
    return {"mean_margin": round(sum(margins) / len(margins), 4),
            "accuracy": round(sum(m > 0 for m in margins) / len(margins), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=96)
    ap.add_argument("--heldout", type=int, default=40)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 32 train / 16 held-out pairs")
    args = ap.parse_args()
    if args.quick:
        args.train, args.heldout = 32, 16
    torch.set_num_threads(2)
    from preftune.job import TrainConfig
    from preftune.realmodel import build_real_model
    from preftune.tasks.generate import load_causal_lm
    from preftune.tasks.training import run_training

    print_targets(TARGETS)
    lines = DATA.read_text(encoding="utf-8").splitlines()[FIRST - 1:LAST]
    pairs = [json.loads(x) for x in lines]
    assert args.train + args.heldout <= len(pairs), f"only {len(pairs)} HH-RLHF pairs"
    train, held = pairs[:args.train], pairs[-args.heldout:]
    model_dir = Path(build_real_model()["path"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, recs in (("train", train), ("held", held)):
            (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
        t0 = time.perf_counter()
        model, tok = load_causal_lm(model_dir, device="cpu")
        base = _stats(logp_margins(model, tok, held, args.max_length))
        del model
        cfg = TrainConfig(data=root / "train.jsonl", eval_data=root / "held.jsonl", model=model_dir, out=root / "job",
                          ref_cache=root / "rc", beta=args.beta, lr=5e-4, epochs=1, batch_size=4,
                          max_length=args.max_length, num_threads=2)
        summary = run_training(cfg)
        model, tok = load_causal_lm(model_dir, summary["adapter_dir"], device="cpu")
        tuned = _stats(logp_margins(model, tok, held, args.max_length))
        wall = time.perf_counter() - t0
    figures = {
        "pairs": {"train": len(train), "heldout": len(held)},
        "base": base | {"dpo_reward_margin": 0.0, "dpo_reward_accuracy": 0.0},
        "tuned": tuned | {"dpo_reward_margin": round(summary["eval_reward_margin"], 4),
                          "dpo_reward_accuracy": round(summary["eval_reward_accuracy"], 4),
                          "train_loss": summary.get("train_loss"), "eval_loss": summary.get("eval_loss")},
        "wall_s": round(wall, 1), "load_average": os.getloadavg()[0],
    }
    print(json.dumps(figures, indent=2))
    code, rows = verdict(TARGETS, {MARGIN_GAIN: tuned["mean_margin"] - base["mean_margin"]})
    print(json.dumps({"bench": "real_hh", **figures, "targets": rows}))
    return code


if __name__ == "__main__":
    sys.exit(main())
