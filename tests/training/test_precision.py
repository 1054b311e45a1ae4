"""The job's precision (preftune/job.py: choose_precision) as a pure function of (device, method,
quantize); the base loaded in it with float32 adapters; the reference cache keyed by it exactly."""

from __future__ import annotations

import json

import pytest
import torch

from preftune.errors import UserError
from preftune.job import Precision, choose_precision
from preftune.tasks.training import run_training
from preftune.tasks.training.modeling import job_precision, load_policy


def test_precision_by_device_method_and_quantize():
    """CPU: float32, no autocast, whatever the method. CUDA: a LoRA base in bfloat16 (or NF4 when
    quantized), full fine-tuning float32 master weights under bf16 autocast; a GPU without bfloat16:
    float32. Each has its own reference-cache key (the arithmetic the log-probs came from)."""
    assert choose_precision("cpu", full=False) == Precision("float32", "no", "fp32")
    assert choose_precision("cpu", full=True) == Precision("float32", "no", "fp32")
    assert choose_precision("cuda", full=False) == Precision("bfloat16", "bf16", "bf16-base-bf16")
    assert choose_precision("cuda", full=False, quantize="4bit") == Precision("nf4", "bf16", "nf4-base-bf16")
    assert choose_precision("cuda", full=True) == Precision("float32", "bf16", "bf16")
    assert choose_precision("cuda", full=False, bf16_supported=False) == Precision("float32", "no", "fp32")
    keys = {choose_precision(*args).key for args in (("cpu", False), ("cuda", False), ("cuda", True))}
    assert len(keys | {choose_precision("cuda", False, "4bit").key}) == 4
    assert [choose_precision("cuda", False, q).weight_bytes for q in ("none", "4bit")] == [2.0, 0.55]


@pytest.mark.parametrize("device, full, bf16, message", [
    ("cpu", False, True, "quantize '4bit' needs a CUDA GPU with bfloat16 .*this machine has no CUDA GPU"),
    ("cuda", False, False, "needs a CUDA GPU with bfloat16 .*a GPU without bfloat16"),
    ("cuda", True, True, "quantize '4bit' needs LoRA"),
])
def test_precision_four_bit_refusals(device, full, bf16, message):
    with pytest.raises(ValueError, match=message):
        choose_precision(device, full=full, quantize="4bit", bf16_supported=bf16)


def test_precision_four_bit_on_this_cpu_is_one_line(small_cfg):
    with pytest.raises(UserError) as err:
        job_precision(small_cfg(quantize="4bit"))
    assert "\n" not in str(err.value) and "set quantize to 'none'" in str(err.value)
    with pytest.raises(ValueError, match="quantize '4bit' needs LoRA"):
        small_cfg(quantize="4bit", full=True)


def test_precision_bf16_base_keeps_float32_adapters(small_cfg):
    """What a CUDA LoRA job loads, built here on the CPU: every frozen base weight bfloat16, every
    trainable (adapter) weight float32, and a forward and backward run through them."""
    lm = load_policy(small_cfg(lora_r=4), choose_precision("cuda", full=False))
    frozen = {p.dtype for p in lm.parameters() if not p.requires_grad}
    trainable = [p for p in lm.parameters() if p.requires_grad]
    assert frozen == {torch.bfloat16} and trainable and {p.dtype for p in trainable} == {torch.float32}
    out = lm(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    cpu = load_policy(small_cfg(lora_r=4))  # this machine's own choice: float32 everywhere, as before
    assert {p.dtype for p in cpu.parameters()} == {torch.float32}


def test_precision_reference_cache_is_keyed_by_the_dtype_it_was_computed_in(small_cfg, tmp_path):
    """A CPU job stores its reference log-probs under precision 'fp32' (what it computed them in) and
    says so in its summary."""
    summary = run_training(small_cfg(ref_cache=tmp_path / "rc", out=tmp_path / "job"))
    (stored,) = list((tmp_path / "rc").glob("*.pt"))
    fields = json.loads(torch.load(stored, weights_only=True)["fields"])
    assert fields["precision"] == choose_precision("cpu", full=False).key == "fp32"
    assert summary["base_weights"] == "float32" and summary["cuda_visible_devices"] is None
