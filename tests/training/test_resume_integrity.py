"""A job folder is verified on resume, never trusted (issue 21, items 2 and 4): a checkpoint that
would run code, a torn or edited checkpoint, summary.json or metrics.jsonl. Each is built by hand,
then the recovery is asserted: one log line and the job trains (again), never a traceback."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from preftune.files import SEAL, content_digest, file_sha256, write_json_atomic
from preftune.tasks.training import run_training
from preftune.tasks.training.checkpoint import CHECKPOINT, DIGESTS, peek_checkpoint


class _Marker:
    """Unpickling this calls ``open(path, "w")``: loading it with weights_only=False creates the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _crafted_checkpoint(out: Path, config_hash: str, marker: Path) -> None:
    """A checkpoint.pt whose pickle runs code, with its sha256 recorded as preftune records it (a
    hostile user rewrites both files)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"config_hash": config_hash, "state": {"step": 3}, "weights": {}, "optimizer": _Marker(marker),
                "scheduler": {}, "rng": {}}, out / CHECKPOINT)
    write_json_atomic(out / DIGESTS, [file_sha256(out / CHECKPOINT)])


def test_a_checkpoint_that_runs_code_is_refused_and_the_job_trains_from_scratch(small_cfg, tmp_path):
    """Before: torch.load(weights_only=False) ran the pickle's code (the marker file appeared)."""
    cfg = small_cfg(out=tmp_path / "job")
    marker = tmp_path / "pwned"
    _crafted_checkpoint(cfg.out, cfg.config_hash(), marker)
    job = tmp_path / "job.json"
    job.write_text(cfg.model_dump_json())
    proc = subprocess.run([sys.executable, "-m", "preftune.cli", "train", "--config", str(job), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if CHECKPOINT in x]
    assert lines == [f"{cfg.out / CHECKPOINT}: not loadable as plain tensors (UnpicklingError); "
                     "the job trains from step 0"]
    summary = json.loads(proc.stdout)
    assert summary["resumed_from_step"] == 0 and summary["steps"] == 4


def test_torn_and_edited_checkpoints_are_absent(small_cfg, tmp_path, caplog):
    """A checkpoint cut short or changed by a byte no longer matches its sha256: peek says None
    (one log line), so the job restarts instead of failing on every re-run."""
    from preftune.tasks.training.checkpoint import save_checkpoint
    from preftune.tasks.training.loop import TrainState

    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(lin.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    out = tmp_path / "ckpt"
    save_checkpoint(out, "h", lin, opt, sched, TrainState(step=5))
    assert peek_checkpoint(out)["state"]["step"] == 5
    save_checkpoint(out, "h", lin, opt, sched, TrainState(step=10))
    assert len(json.loads((out / DIGESTS).read_text())) == 2  # [new, previous]: a crash between renames holds
    good = (out / CHECKPOINT).read_bytes()
    for bad, problem in ((good[: len(good) // 2], "does not match its recorded sha256 (torn or edited)"),
                         (good[:-1] + bytes([good[-1] ^ 1]), "does not match its recorded sha256 (torn or edited)")):
        (out / CHECKPOINT).write_bytes(bad)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="preftune"):
            assert peek_checkpoint(out) is None
        assert [r.getMessage() for r in caplog.records] == [
            f"{out / CHECKPOINT}: {problem}; the job trains from step 0"]


def _reseal(path: Path, **changes) -> None:
    record = json.loads(path.read_text()) | changes
    record[SEAL] = content_digest(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("attack", ["truncated", "edited", "foreign_adapter", "adapter_swapped"])
def test_a_summary_that_does_not_verify_makes_the_job_run_again(small_cfg, tmp_path, caplog, attack):
    """Before: a truncated summary.json was a JSONDecodeError on every re-run; an edited one (accuracy
    1.0, another folder's adapter) was believed and the job skipped."""
    from preftune.tasks.sweep import trained_weights
    from preftune.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    cfg = small_cfg(out=ws.job_dir("j1"))
    first = run_training(cfg)
    path = cfg.out / "summary.json"
    foreign = tmp_path / "elsewhere" / "adapter"
    if attack == "truncated":
        path.write_text(path.read_text()[:40])
    elif attack == "edited":
        path.write_text(path.read_text().replace(f'"steps": {first["steps"]}', '"steps": 999'))
    elif attack == "foreign_adapter":  # the attacker even recomputes the content hash
        foreign.mkdir(parents=True)
        _reseal(path, adapter_dir=str(foreign), eval_reward_accuracy=1.0)
    else:  # the adapter's weights replaced behind a summary that still verifies
        (cfg.out / "adapter" / "adapter_model.safetensors").write_bytes(b"not the trained weights")
    with caplog.at_level(logging.WARNING, logger="preftune"):
        again = run_training(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "preftune"]
    assert len(lines) == 1 and lines[0].startswith(f"{path}: ") and lines[0].endswith("; the job runs again")
    assert again["steps"] == first["steps"] == 4 and again["eval_reward_accuracy"] == first["eval_reward_accuracy"]
    assert again["wall_seconds"] != first["wall_seconds"]  # trained again, not the old file
    assert trained_weights(ws, "j1") == str(cfg.out / "adapter")
    assert not foreign.exists() or not any(foreign.iterdir())


def test_a_summary_that_names_a_foreign_adapter_is_not_evaluated(small_cfg, tmp_path):
    """Phases 5 and 6 read the weights through the verified summary: a foreign folder is refused."""
    from preftune.errors import UserError
    from preftune.tasks.sweep import trained_weights
    from preftune.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    cfg = small_cfg(out=ws.job_dir("j1"))
    run_training(cfg)
    _reseal(cfg.out / "summary.json", adapter_dir=str(tmp_path))
    with pytest.raises(UserError, match="re-run to train the job again"):
        trained_weights(ws, "j1")


def test_a_torn_metrics_line_is_dropped_on_resume_and_in_the_report(tmp_path):
    """Before: json.loads of the torn last line raised on every re-run (and in the report's figures)."""
    from preftune.reports.figures import read_metrics
    from preftune.tasks.training.job import _metrics_upto

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.69}\n{"step": 2, "loss": 0.6}\n{"step": 3, "loss": 0.5}\n{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    _metrics_upto(tmp_path, 2)
    assert path.read_text() == '{"step": 1, "loss": 0.69}\n{"step": 2, "loss": 0.6}\n'
