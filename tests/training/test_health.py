"""Training health (tasks/training/health.py): hand-worked rows, then real jobs on the zoo model —
plain DPO at a high learning rate displaces the chosen answers, the same job with an RPO term does
not, and a job whose loss explodes stops as `diverged` while its sweep's other job finishes."""

from __future__ import annotations

import json
import math

import pytest

from preftune.tasks.sweep import run_job_processes, run_sweep, with_health
from preftune.tasks.training import run_training
from preftune.tasks.training.health import (
    DISPLACEMENT,
    DIVERGED,
    SATURATED,
    assess,
    divergence,
    flag_names,
    metrics_rows,
)
from preftune.workspace import Workspace


def row(step: int, loss: float = 0.6, chosen: float = -50.0, ref_chosen: float | None = -50.0,
        margin: float = 0.1, acc: float = 0.6, kl: float = 0.01, grad_norm: float = 1.0) -> dict:
    r = {"step": step, "loss": loss, "logps/chosen": chosen, "rewards/margins": margin,
         "rewards/accuracies": acc, "grad_norm": grad_norm, "kl/ref": kl}
    if ref_chosen is not None:
        r["logps/ref_chosen"] = ref_chosen
    return r


def names(health: dict) -> list[str]:
    return [f["name"] for f in health["flags"]]


def test_divergence_rule_by_hand():
    """First loss 0.69: the explode line is max(5, 10 × 0.69) = 6.9; a NaN or inf loss or gradient
    norm is divergence whatever the first loss."""
    assert divergence(row(1, loss=0.69), None) is None
    assert divergence(row(5, loss=6.8), 0.69) is None
    assert divergence(row(5, loss=7.0), 0.69) == "loss 7 exploded (first logged loss 0.69)"
    assert divergence(row(5, loss=4.9), 0.1) is None  # 10 × 0.1 = 1, but the floor is 5
    assert divergence(row(3, loss=math.nan), 0.69) == "loss is nan"
    assert divergence(row(3, grad_norm=math.inf), 0.69) == "gradient norm is inf"
    health = assess([row(1, loss=0.69), row(2, loss=0.5), row(3, loss=math.nan)])
    assert names(health) == [DIVERGED] and health["flags"][0]["step"] == 3
    assert "learning rate" in health["flags"][0]["remedy"]


def test_displacement_by_hand():
    """Chosen log-ratio (policy − reference) per row: 0, −0.5, −2, −3, −4 while the margin climbs from
    0.0 to 0.8: the first row down more than 1 nat with the margin above its start is step 3; the last
    row is still down (4 nats), so it is flagged. A remedy names the RPO term."""
    ratios, margins = [0.0, -0.5, -2.0, -3.0, -4.0], [0.0, 0.2, 0.4, 0.6, 0.8]
    rows = [row(i + 1, chosen=-50 + r, margin=m) for i, (r, m) in enumerate(zip(ratios, margins, strict=True))]
    health = assess(rows, total_steps=100)
    assert names(health) == [DISPLACEMENT]
    flag = health["flags"][0]
    assert flag["step"] == 3 and "down 2.00 nats" in flag["detail"] and "last row: down 4.00" in flag["detail"]
    assert "rpo_alpha" in flag["remedy"]
    # the chosen answers rising with the margin: healthy; a dip that recovered by the end: not flagged
    assert assess([row(i + 1, chosen=-50 + i, margin=0.2 * i) for i in range(5)], 100)["flags"] == []
    dip = [0.0, -2.0, -3.0, -0.5, 0.5]
    assert assess([row(i + 1, chosen=-50 + r, margin=0.2 * i) for i, r in enumerate(dip)], 100)["flags"] == []
    # falling chosen answers with a falling margin is not displacement (the model got worse at both)
    assert assess([row(i + 1, chosen=-50 - 2 * i, margin=-0.2 * i) for i in range(5)], 100)["flags"] == []


def test_displacement_without_a_reference_uses_the_chosen_log_prob():
    """SimPO/ORPO log no reference: the drop is against the mean of the first fifth of the rows
    (here row 1: −50), so step 3 (−52.5) is the first more than 1 nat down."""
    chosen = [-50.0, -50.8, -52.5, -53.0, -54.0]
    rows = [row(i + 1, chosen=c, ref_chosen=None, margin=0.1 * i) for i, c in enumerate(chosen)]
    health = assess(rows, 100)
    assert names(health) == [DISPLACEMENT] and health["flags"][0]["step"] == 3
    assert "chosen log-prob down 2.50 nats" in health["flags"][0]["detail"]


def test_saturation_early_only_and_kl():
    """Accuracy ≥ 0.99 on 3 rows in a row starting at step 2 of 40 (within the first 25% = 10 steps):
    saturated at step 2. The same run of rows starting at step 20 is not early. KL: last and max."""
    accs = [0.5, 1.0, 1.0, 1.0, 0.75]
    rows = [row(i + 1, acc=a, kl=0.01 * (i + 1), chosen=-50 + i) for i, a in enumerate(accs)]
    health = assess(rows, total_steps=40)
    assert names(health) == [SATURATED] and health["flags"][0]["step"] == 2
    assert health["kl"] == {"last": 0.05, "max": 0.05} and health["rows"] == 5
    late = [row(20 + i, acc=a, chosen=-50 + i) for i, a in enumerate(accs)]
    assert assess(late, total_steps=40)["flags"] == []
    assert flag_names(health) == "accuracy saturated (step 2)" and flag_names(None) == ""
    assert assess([]) == {"flags": [], "kl": None, "rows": 0}


def test_metrics_rows_skip_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": NaN}\n{"step": 3, "lo')
    rows = metrics_rows(path)
    assert [r["step"] for r in rows] == [1, 2] and math.isnan(rows[1]["loss"])
    assert metrics_rows(tmp_path / "none.jsonl") == []


# ---------------------------------------------------------------- real jobs on the zoo model

# Plain DPO at lr 5e-3 for 3 epochs of the 16 marker pairs (12 steps, seed 0): the chosen log-ratio
# ends ~280 nats down while the margin climbs; with rpo_alpha 1.0 it ends ~27 nats *up* (measured).
HIGH_LR = dict(lr=5e-3, epochs=3, log_every=1)


def test_high_lr_dpo_is_flagged_and_the_rpo_term_keeps_the_chosen_answers_up(small_cfg, tmp_path):
    plain = run_training(small_cfg(out=tmp_path / "dpo", **HIGH_LR))
    rpo = run_training(small_cfg(out=tmp_path / "rpo", rpo_alpha=1.0, **HIGH_LR))
    assert DISPLACEMENT in names(plain["health"]), plain["health"]
    assert DISPLACEMENT not in names(rpo["health"]), rpo["health"]
    rows = metrics_rows(tmp_path / "dpo" / "metrics.jsonl")
    assert {"logps/ref_chosen", "logps/ref_rejected", "kl/ref"} <= set(rows[0])
    assert rows[0]["kl/ref"] == pytest.approx(0.0, abs=1e-6)  # step 1 is computed with the base's weights
    assert rows[-1]["logps/chosen"] - rows[-1]["logps/ref_chosen"] < -10  # the fall itself, not a flag only
    assert plain["health"]["kl"]["last"] > rpo["health"]["kl"]["last"] > 0


def test_an_exploding_job_stops_diverged_and_its_sweep_partner_finishes(small_cfg, tmp_path):
    """Full fine-tuning at lr 1.0 without clipping explodes within a few steps (measured: step 6);
    it is stopped there as `diverged`, the other job of the same sweep (real child processes)
    finishes, and the sweep's records carry each job's health."""
    ws = Workspace(tmp_path / "ws")
    configs = {
        "wild": small_cfg(out=ws.job_dir("wild"), full=True, lr=1.0, max_grad_norm=0.0, warmup_ratio=0.0,
                          epochs=4, log_every=1, ref_cache=ws.refcache),
        "calm": small_cfg(out=ws.job_dir("calm"), ref_cache=ws.refcache, epochs=1),
    }
    for cfg in configs.values():
        cfg.out.mkdir(parents=True)
        (cfg.out / "job.json").write_text(cfg.model_dump_json())
    jobs = [{"id": k, "base_model": str(c.model), "beta": 0.1} for k, c in configs.items()]
    results = with_health(ws, run_sweep(jobs, lambda job: run_job_processes(ws.job_dir(job["id"]) / "job.json"),
                                        max_concurrent=2))
    by_id = {r["job"]["id"]: r for r in results}
    assert by_id["calm"]["status"] == "finished" and by_id["calm"]["summary"]["steps"] == 4
    assert by_id["wild"]["status"] == "failed" and f"{DIVERGED} at step" in by_id["wild"]["error"]
    assert names(by_id["wild"]["health"]) == [DIVERGED]
    assert not (ws.job_dir("wild") / "summary.json").exists()
    last = json.loads((ws.job_dir("wild") / "metrics.jsonl").read_text().splitlines()[-1])
    assert by_id["wild"]["health"]["flags"][0]["step"] == last["step"]  # it stopped at the row that diverged
