"""Parity with TRL 1.16 ``DPOTrainer`` on the real model (SmolLM2-135M-Instruct, 49,152-token vocabulary).

Both sides score the same 8 short public pairs with the same non-trivial LoRA weights (r 8 on all
linear layers, every B matrix seeded random, so the policy differs from the reference): our
per-sequence policy and reference log-probs (``SequenceLogps``) and our DPO (sigmoid), IPO, hinge
and length-normalised DPO losses must equal what TRL computes through its own code path — its
dataset tokenisation (``_prepare_dataset``), its collator, its fused-LM-head forward as
``_compute_loss`` calls it, its ``compute_ref_log_probs`` and ``_compute_loss`` itself — within
1e-4, in float32.

Where the tokenisation differs on purpose, the test pins it instead of hiding it:
- TRL renders prompt + completion through the chat template, so its completion is
  ``content <|im_end|> "\\n"``: the template's newline after the end-of-turn token is trained on.
  Ours is ``content <|im_end|>``: exactly ONE EOS and nothing after it (the model never has to
  predict a token after it stopped). The comparison runs on TRL's own examples with that trailing
  newline dropped, so both sides score identical token ids.
- The prompt: both render the messages through the chat template with the generation prompt,
  including SmolLM2's default system prompt when the record has none; the ids must be equal.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from preftune.tasks.training.data import collate, completion_ids, load_pair_records, tokenize_pairs
from preftune.tasks.training.logps import SequenceLogps, batch_logps
from preftune.tasks.training.losses import LossSettings, LossType, SeqLogps, preference_loss
from preftune.tasks.training.modeling import reference_mode
from tests.conftest import PUBLIC_DATASETS

trl = pytest.importorskip("trl", reason="TRL (the dev extra) is the peer this test compares with")

BETA, MAX_LENGTH, N_PAIRS, LORA_R = 0.1, 128, 8, 8
TOL = {"rtol": 0.0, "atol": 1e-4}
# Summed log-probs (|value| up to ~100 nats over ~40 tokens) differ in float32 round-off only: the
# two sides run different attention kernels (TRL passes an attention mask, ours runs the causal
# path without one) and sum in different orders — ~4e-6 relative. 1e-5 relative on top of 1e-4
# absolute still fails on any real difference (one token more or less moves a sum by nats).
LOGPS_TOL = {"rtol": 1e-5, "atol": 1e-4}
# (our loss settings, TRL's loss_type)
LOSSES = [
    (dict(loss_type=LossType.DPO), "sigmoid"),
    (dict(loss_type=LossType.IPO), "ipo"),
    (dict(loss_type=LossType.HINGE), "hinge"),
    (dict(loss_type=LossType.DPO, normalize_by_length=True), "sigmoid_norm"),
]


def _short_records(n: int) -> list[dict]:
    """The n shortest single-turn public pairs (by characters), so every row fits in MAX_LENGTH."""
    records = load_pair_records(PUBLIC_DATASETS / "public_pairs.jsonl")

    def size(r: dict) -> int:
        return sum(len(m["content"]) for m in r["input"]["messages"] + r["preferred_output"]
                   + r["non_preferred_output"])

    return sorted(records, key=size)[:n]


@pytest.fixture(scope="module")
def setup(real_model, tmp_path_factory):
    import peft
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    path = real_model["path"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lora = peft.LoraConfig(r=LORA_R, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                           task_type="CAUSAL_LM")
    records = _short_records(N_PAIRS)
    conv = [{"prompt": r["input"]["messages"], "chosen": r["preferred_output"],
             "rejected": r["non_preferred_output"]} for r in records]
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), beta=BETA, max_length=MAX_LENGTH,
                     per_device_train_batch_size=N_PAIRS, use_cpu=True, bf16=False, report_to="none",
                     gradient_checkpointing=False, dataset_num_proc=None, disable_tqdm=True)
    # The base model and a peft_config, as a LoRA DPO run is set up: TRL wraps it, uses the base
    # model (adapter disabled) as its reference, and patches the base model's forward with its fused
    # LM head (which our SequenceLogps never calls: it runs the decoder body and the head itself).
    # (A ready PeftModel would make TRL copy the adapter as its reference: policy == reference.)
    trainer = DPOTrainer(model=lm, args=args, train_dataset=Dataset.from_list(conv), processing_class=tokenizer,
                         peft_config=lora)
    model = trainer.model
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():  # B = 0 at init would make policy == reference; small seeded values instead
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    model.eval()
    ours = tokenize_pairs(records, tokenizer, MAX_LENGTH)
    return {"trainer": trainer, "model": model, "tokenizer": tokenizer, "records": records, "ours": ours}


def _trl_inputs(setup) -> dict:
    """TRL's tokenised examples, trailing template newline dropped (see the module docstring), collated by TRL."""
    trainer, nl = setup["trainer"], setup["tokenizer"]("\n", add_special_tokens=False)["input_ids"]
    examples = []
    for ex in trainer.train_dataset:
        examples.append({"prompt_ids": ex["prompt_ids"], "chosen_ids": ex["chosen_ids"][: -len(nl)],
                         "rejected_ids": ex["rejected_ids"][: -len(nl)]})
    return trainer.data_collator(examples)


def test_tokenisation_differs_from_trl_only_by_the_templates_trailing_newline(setup):
    trainer, tokenizer = setup["trainer"], setup["tokenizer"]
    nl = tokenizer("\n", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert len(trainer.train_dataset) == N_PAIRS
    for ex, pair in zip(trainer.train_dataset, setup["ours"], strict=True):
        assert not pair.truncated
        assert tuple(ex["prompt_ids"]) == pair.prompt  # same template, same default system prompt
        assert tokenizer.decode(pair.prompt).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        for trl_ids, our_ids in ((ex["chosen_ids"], pair.chosen), (ex["rejected_ids"], pair.rejected)):
            assert tuple(trl_ids) == our_ids + tuple(nl)  # TRL: ... <|im_end|> "\n"
            assert our_ids[-1] == eos and our_ids.count(eos) == 1  # ours: one EOS, at the end


def test_one_eos_at_the_end_never_two(setup):
    """A completion whose text already ends with the EOS string still ends with ONE EOS token."""
    tokenizer = setup["tokenizer"]
    eos = tokenizer.eos_token_id
    plain = completion_ids(tokenizer, "Paris.")
    assert plain[-1] == eos and plain.count(eos) == 1
    assert completion_ids(tokenizer, "Paris." + tokenizer.eos_token) == plain
    assert completion_ids(tokenizer, "Paris." + tokenizer.eos_token * 2) == plain


def _our_logps(setup) -> tuple[SeqLogps, SeqLogps]:
    pairs = setup["ours"]
    batch = collate(pairs, list(range(len(pairs))), setup["tokenizer"].pad_token_id)
    module = SequenceLogps(setup["model"])
    b = batch.pairs
    with torch.no_grad():
        policy = batch_logps(module, batch)
        with reference_mode(setup["model"]):
            ref = batch_logps(module, batch)
    tokens = batch.n_tokens
    return (SeqLogps(policy[:b], policy[b:], tokens[:b], tokens[b:]),
            SeqLogps(ref[:b], ref[b:], tokens[:b], tokens[b:]))


@pytest.fixture(scope="module")
def both(setup):
    trainer, model = setup["trainer"], setup["model"]
    inputs = _trl_inputs(setup)
    with torch.no_grad():
        # The policy forward exactly as DPOTrainer._compute_loss makes it.
        kwargs = {k: v for k, v in inputs.items() if k != "completion_mask"}
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        logps = model(**kwargs, use_cache=False, labels=labels, fused_lm_head=True).log_probs.sum(dim=1)
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, inputs)
    policy_chosen, policy_rejected = logps.chunk(2)
    return inputs, (policy_chosen, policy_rejected, ref_chosen, ref_rejected), _our_logps(setup)


def test_policy_and_reference_logps_equal_trls(both):
    _, (pc, pr, rc, rr), (policy, ref) = both
    assert (pc - rc).abs().max() > 0.05  # the LoRA weights really move the policy off the reference
    assert_close(policy.chosen, pc, **LOGPS_TOL)
    assert_close(policy.rejected, pr, **LOGPS_TOL)
    assert_close(ref.chosen, rc, **LOGPS_TOL)
    assert_close(ref.rejected, rr, **LOGPS_TOL)


@pytest.mark.parametrize(("ours", "trl_type"), LOSSES, ids=[t for _, t in LOSSES])
def test_losses_equal_trls(setup, both, ours, trl_type):
    trainer = setup["trainer"]
    inputs, _, (policy, ref) = both
    trainer.loss_types, trainer.loss_weights = [trl_type], [1.0]
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer._compute_loss(setup["model"], inputs, return_outputs=False)
    settings = LossSettings(beta=BETA, **ours)
    out = preference_loss(settings, policy, ref)
    assert out.losses.std() > 0  # per-example losses differ: the mean is not trivially matched
    assert_close(out.losses.mean(), trl_loss.float(), **TOL)

