"""Data-parallel training: `preftune train` on 2 processes (torchrun, gloo on CPU) against 1 process.

Process r of W takes batches r, r+W, … of the epoch's plan, so 2 processes with batch_size 2 and
grad_accum 1 see, at every optimizer step, the same 4 pairs as 1 process with batch_size 2 and
grad_accum 2; DDP averages the two processes' gradients (each the mean over its micro-batch),
which is the 1-process mean of the two micro-batch means. Same global batch → same losses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from preftune.job import TrainConfig, train_command
from preftune.tasks.training import run_training
from tests.training.conftest import write_jsonl
from tests.training.marker_data import corpus_chats, marker_pair

LAUNCH_TIMEOUT_S = 600  # only guards against a hang: a loaded 2-core machine is slow


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def job_file(root: Path, name: str, base_model: Path, data: Path, **fields) -> Path:
    """Write a job file (as the sweep does) for 2 epochs of 20 pairs, batch 2, checkpoint every 3 steps."""
    cfg = TrainConfig(data=data, model=base_model, out=root / name, ref_cache=root / "refcache", batch_size=2,
                      max_length=96, epochs=2, save_every=3, num_threads=1, **fields)
    path = root / f"{name}.json"
    path.write_text(cfg.model_dump_json())
    return path


def env_one_thread() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ddp_job(base_model, tmp_path_factory) -> dict:
    """One uninterrupted 2-process job: {"root", "data", "summary", "stdout", "out"}."""
    root = tmp_path_factory.mktemp("ddp")
    data = write_jsonl(root / "pairs.jsonl", [marker_pair(c) for c in corpus_chats("train")[::3][:20]])
    config = job_file(root, "two", base_model, data, processes=2)
    done = subprocess.run(train_command(config), capture_output=True, text=True, env=env_one_thread(),
                          timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "data": data, "stdout": done.stdout, "summary": json.loads(done.stdout),
            "out": root / "two"}


def test_two_processes_give_the_losses_of_one_with_the_same_global_batch(ddp_job, base_model):
    two = ddp_job["summary"]
    assert two["processes"] == 2 and two["steps"] == 10  # 20 pairs / (2 per batch × 2 processes) × 2 epochs
    assert two["samples"] == 40 and two["ref_cache"] == "miss"
    rows = read_metrics(ddp_job["out"])
    assert [r["step"] for r in rows] == list(range(1, 11))  # one writer: no line from the second process

    one_cfg = TrainConfig.load(job_file(ddp_job["root"], "one", base_model, ddp_job["data"], grad_accum=2))
    one = run_training(one_cfg)
    assert one["processes"] == 1 and one["steps"] == 10 and one["samples"] == 40
    assert one["ref_cache"] == "hit"  # the 2-process job's main process wrote the shared cache
    one_rows = read_metrics(one_cfg.out)
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # LoRA starts at the reference: log 2
    assert one_rows[4]["loss"] < one_rows[0]["loss"] - 0.01  # it trains: the comparison is not of constants
    for key in ("loss", "rewards/margins", "rewards/accuracies", "grad_norm", "lr"):
        torch.testing.assert_close(torch.tensor([r[key] for r in rows]), torch.tensor([r[key] for r in one_rows]),
                                   rtol=0, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
    assert two["train_tokens"] == one["train_tokens"]
    assert two["train_loss"] == pytest.approx(one["train_loss"], abs=1e-4)


def test_two_process_job_resumes_after_a_kill(ddp_job, base_model):
    """Kill -9 the job's launcher after its first checkpoint: its two trainers die with it (torchrun
    starts them in sessions of their own); the re-run resumes at the checkpoint and ends with the
    losses and adapter weights of the uninterrupted 2-process job."""
    import psutil
    from safetensors.torch import load_file

    root = ddp_job["root"]
    config = job_file(root, "killed", base_model, ddp_job["data"], processes=2)
    out = root / "killed"
    proc = subprocess.Popen(train_command(config), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env_one_thread(), start_new_session=True)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not (out / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    trainers = psutil.Process(proc.pid).children(recursive=True)
    assert len(trainers) == 2
    os.kill(proc.pid, signal.SIGKILL)  # torchrun only
    proc.wait()
    _, alive = psutil.wait_procs(trainers, timeout=60)
    assert alive == []
    assert not (out / "summary.json").exists()
    ckpt_step = torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"]
    assert ckpt_step in (3, 6, 9)

    done = subprocess.run(train_command(config), capture_output=True, text=True, env=env_one_thread(),
                          timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # one summary: only the first process prints
    assert summary["resumed_from_step"] == ckpt_step and summary["steps"] == 10 and summary["processes"] == 2
    resumed, straight = read_metrics(out), read_metrics(ddp_job["out"])
    assert [r["step"] for r in resumed] == list(range(1, 11))  # no step lost or repeated
    torch.testing.assert_close(torch.tensor([r["loss"] for r in resumed]),
                               torch.tensor([r["loss"] for r in straight]), rtol=1e-6, atol=1e-7)
    assert not (out / "checkpoint.pt").exists()
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    expected = load_file(ddp_job["out"] / "adapter" / "adapter_model.safetensors")
    assert weights.keys() == expected.keys() and any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    for key, value in expected.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-7)


def test_a_job_for_two_processes_refuses_to_run_on_one(base_model, tmp_path):
    """run_training in-process on a 2-process job file: one clear error, nothing trained."""
    from preftune.errors import UserError

    data = write_jsonl(tmp_path / "pairs.jsonl", [marker_pair(c) for c in corpus_chats("train")[:4]])
    cfg = TrainConfig.load(job_file(tmp_path, "job", base_model, data, processes=2))
    with pytest.raises(UserError, match=r"for 2 process\(es\) but runs on 1"):
        run_training(cfg)
    assert not (cfg.out / "metrics.jsonl").exists()
