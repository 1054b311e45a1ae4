"""Evidence that training learns (issue 3): every preferred answer opens with a marker word.

After DPO on a zoo model: held-out reward accuracy ≥ 0.9, and greedy generations on held-out
prompts open with the marker at least twice as often as the base model's (and in at least half
of them, so that "twice as often as never" cannot pass with one lucky generation).

The loss is DPO with the RPO term (``rpo_alpha``: NLL on the preferred answer). Plain DPO reaches
reward accuracy 1.0 here too, but on a 1M-parameter model it gets there mostly by pushing the
non-preferred answer down — and that answer is the preferred one's own text minus the marker, so
greedy decoding degenerates (measured: "S" then noise). The NLL term keeps the preferred text
likely, which is what RPO is for.
"""

from __future__ import annotations

from preftune.job import TrainConfig
from preftune.tasks.generate import generate_completions, generate_with, load_causal_lm
from preftune.tasks.training import run_training
from tests.training.marker_data import MARKER


def marker_rate(texts: list[str]) -> float:
    return sum(t.startswith(MARKER) for t in texts) / len(texts)


def test_dpo_learns_to_open_with_the_marker(base_model, marker_data, tmp_path):
    cfg = TrainConfig(data=marker_data["train"], eval_data=marker_data["eval"], model=base_model,
                      out=tmp_path / "job", ref_cache=tmp_path / "rc", beta=0.1, rpo_alpha=1.0, lr=3e-3,
                      epochs=3, batch_size=8, max_length=128, num_threads=1)
    summary = run_training(cfg)
    assert summary["eval_reward_accuracy"] >= 0.9
    assert summary["eval_reward_margin"] > 1.0  # β·margin: the marker answer is clearly preferred

    prompts = marker_data["prompts"]
    base = generate_completions(base_model, prompts, max_new_tokens=8)
    model, tokenizer = load_causal_lm(base_model, summary["adapter_dir"], device="cpu")
    tuned = generate_with(model, tokenizer, prompts, max_new_tokens=8)
    assert len(base) == len(tuned) == len(prompts) == 32
    assert marker_rate(tuned) >= 0.5
    assert marker_rate(tuned) >= 2 * marker_rate(base)
