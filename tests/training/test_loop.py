"""The loop and the job: schedule, determinism, outputs (LoRA and full), finished jobs, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from preftune.tasks.training import run_training
from preftune.tasks.training.loop import lr_lambda

METRIC_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected", "lr", "grad_norm", "tokens/s", "step", "epoch"}


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warms_up_then_decays_to_zero():
    linear = lr_lambda(total_steps=10, warmup_ratio=0.2, kind="linear")
    assert [round(linear(s), 4) for s in range(10)] == [0.3333, 0.6667, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375,
                                                        0.25, 0.125]
    cosine = lr_lambda(total_steps=10, warmup_ratio=0.0, kind="cosine")
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)


def test_lora_job_outputs_and_determinism(small_cfg, tmp_path, marker_data):
    """Same seed → the same losses, step by step; the adapter reloads with PeftModel."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = small_cfg(eval_data=marker_data["small"], out=tmp_path / "a", epochs=2, lr=1e-3)
    summary = run_training(cfg)
    rows = read_metrics(cfg.out)
    assert [r["step"] for r in rows] == list(range(1, 9))  # 16 pairs / 4 per batch × 2 epochs
    assert all(METRIC_KEYS <= set(r) for r in rows)
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # LoRA starts at the reference: log 2
    assert summary["steps"] == 8 and summary["samples"] == 32 and summary["train_pairs"] == 16
    assert summary["ref_cache"] == "miss" and summary["config_hash"] == cfg.config_hash()
    assert summary["eval_pairs"] == 16 and 0.0 <= summary["eval_reward_accuracy"] <= 1.0
    assert summary["train_tokens"] > 0 and summary["peak_rss_mb"] > 0
    assert set(json.loads((cfg.out / "summary.json").read_text())) == set(summary)
    assert not (cfg.out / "checkpoint.pt").exists()

    again = run_training(small_cfg(eval_data=marker_data["small"], out=tmp_path / "b", epochs=2, lr=1e-3))
    assert [r["loss"] for r in read_metrics(tmp_path / "b")] == [r["loss"] for r in rows]
    assert again["eval_loss"] == summary["eval_loss"]

    base = AutoModelForCausalLM.from_pretrained(str(cfg.model))
    tuned = PeftModel.from_pretrained(base, str(cfg.out / "adapter"))
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained: B moved away from its zero init


def test_finished_job_is_not_run_again(small_cfg):
    cfg = small_cfg()
    first = run_training(cfg)
    stamp = (cfg.out / "summary.json").stat().st_mtime_ns, (cfg.out / "metrics.jsonl").stat().st_mtime_ns
    second = run_training(cfg)
    assert second == first
    assert ((cfg.out / "summary.json").stat().st_mtime_ns, (cfg.out / "metrics.jsonl").stat().st_mtime_ns) == stamp


def test_full_finetuning_writes_a_model_folder(small_cfg):
    from transformers import AutoModelForCausalLM

    cfg = small_cfg(full=True, lr=1e-4)
    summary = run_training(cfg)
    folder = cfg.out / "model"
    assert summary["model_dir"] == str(folder) and summary["adapter_dir"] is None
    assert (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()
    tuned = AutoModelForCausalLM.from_pretrained(str(folder))
    base = AutoModelForCausalLM.from_pretrained(str(cfg.model))
    moved = [n for n, p in tuned.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(moved) == len(list(base.parameters()))  # every tensor was trained

    from preftune.tasks.generate import load_causal_lm

    loaded, _ = load_causal_lm(cfg.model, folder, device="cpu")  # a full folder given as "adapter"
    assert all(torch.equal(p, dict(tuned.named_parameters())[n]) for n, p in loaded.named_parameters())


def test_killed_job_resumes_from_its_last_checkpoint(base_model, marker_data, tmp_path):
    """Run the CLI as a subprocess, kill it after its first checkpoint, re-run: it resumes there and
    ends exactly where an uninterrupted job of the same config ends."""
    from preftune.job import TrainConfig

    out = tmp_path / "job"
    args = dict(data=marker_data["small"], model=base_model, ref_cache=tmp_path / "rc", batch_size=1,
                max_length=64, epochs=2, save_every=3, num_threads=1)
    cmd = [sys.executable, "-m", "preftune.cli", "train", "--data", str(args["data"]),
           "--model", str(base_model), "--out", str(out), "--ref-cache", str(args["ref_cache"]),
           "--batch-size", "1", "--max-length", "64", "--epochs", "2", "--save-every", "3",
           "--num-threads", "1", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    ckpt_step = torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"]
    assert ckpt_step % 3 == 0 and 0 < ckpt_step < 32

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["resumed_from_step"] == ckpt_step and summary["steps"] == 32  # 16 pairs × 2 epochs
    resumed = read_metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, 33))  # no step lost or repeated
    assert not (out / "checkpoint.pt").exists()

    straight = run_training(TrainConfig(out=tmp_path / "straight", **args))
    assert straight["resumed_from_step"] == 0
    expected = [r["loss"] for r in read_metrics(tmp_path / "straight")]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in resumed]), torch.tensor(expected),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_pairs_per_forward_leaves_the_gradient_unchanged(small_cfg, monkeypatch, grad_accum):
    """One pair per forward/backward (the default) gives the gradient of one whole-batch forward."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from preftune.hf import load_tokenizer
    from preftune.tasks.training import loop
    from preftune.tasks.training.data import load_pair_records, tokenize_pairs
    from preftune.tasks.training.logps import SequenceLogps
    from preftune.tasks.training.modeling import load_policy, pad_id

    cfg = small_cfg(loss_type="dpo", grad_accum=grad_accum)
    tokenizer = load_tokenizer(cfg.model)
    pairs = tokenize_pairs(load_pair_records(cfg.data), tokenizer, cfg.max_length)
    group = [[0, 3, 5, 7], [2, 9, 11]][:grad_accum]

    def gradients(per_forward: int) -> list[torch.Tensor]:
        monkeypatch.setattr(loop, "PAIRS_PER_FORWARD", {"cpu": per_forward})
        torch.manual_seed(0)
        module = SequenceLogps(load_policy(cfg))
        with torch.no_grad():  # B ≠ 0, so the policy differs from the reference and gradients vary per pair
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.0)
        grads: list[torch.Tensor] = []
        optimizer.register_step_pre_hook(lambda *_: grads.extend(p.grad.clone() for p in params))
        ref = {"chosen": torch.linspace(-40, -10, len(pairs)), "rejected": torch.linspace(-30, -20, len(pairs))}
        ctx = SimpleNamespace(cfg=cfg.model_copy(update={"max_grad_norm": 0.0}), accelerator=Accelerator(),
                              module=module, optimizer=optimizer,
                              scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), params=params,
                              pairs=pairs, ref=ref, settings=cfg, pad_id=pad_id(tokenizer))
        loop.train_step(ctx, group, loop.Window(), loop.TrainState())
        return grads

    whole, one = gradients(4), gradients(1)
    assert len(whole) == len(one) > 0 and any(g.abs().sum() > 0 for g in whole)
    for a, b in zip(one, whole, strict=True):
        # float32 sums in another order: 1e-5 of each tensor's scale (elements near 0 cancel)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
