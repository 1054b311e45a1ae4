"""Placing a sweep's jobs on a machine's GPUs (preftune/placement.py), on simulated inventories: the
slots, the waves, the memory estimate and its refusal, processes > 1 under torchrun, a work-pool
worker's device claims, and a real sweep of `preftune train` processes pinned to simulated GPUs."""

from __future__ import annotations

import threading
import time

import pytest

from preftune.errors import UserError
from preftune.job import TrainConfig, choose_precision, train_command
from preftune.placement import (
    GIB,
    SIMULATED_ENV,
    Device,
    ModelShape,
    claim_devices,
    inventory,
    job_memory,
    lora_params,
    parse_simulated,
    plan_for,
    plan_placement,
)
from preftune.spec import RunSpec
from preftune.tasks.plan import build_plan, job_grid, plan_markdown
from preftune.tasks.sweep import local_launcher, run_sweep, sweep_rows, write_job_config
from preftune.workspace import Workspace


def _gpus(n: int, gib: float = 80.0) -> list[Device]:
    return [Device(i, str(i), int(gib * GIB)) for i in range(n)]


def _jobs(n: int, model: str = "/m/base") -> list[dict]:
    return [{"id": f"j{i}", "base_model": model} for i in range(n)]


def test_placement_four_jobs_on_two_gpus_run_in_two_waves():
    p = plan_placement(_jobs(4), _gpus(2), max_concurrent=6, processes=1)
    assert p.slots == [("0",), ("1",)] and p.concurrent == 2 and p.waves == 2
    assert [(a["job"], a["devices"], a["wave"]) for a in p.assignments] == [
        ("j0", "0", 0), ("j1", "1", 0), ("j2", "0", 1), ("j3", "1", 1)]


def test_placement_cap_is_the_smaller_of_max_concurrent_and_gpus():
    """min(max_concurrent_jobs, GPUs // gpus_per_job): 8 GPUs, cap 6 -> 6 at once; cap 6, 3 GPUs -> 3."""
    assert plan_placement(_jobs(13), _gpus(8), max_concurrent=6, processes=1).concurrent == 6
    assert plan_placement(_jobs(13), _gpus(8), max_concurrent=6, processes=1).waves == 3  # ceil(13 / 6)
    assert plan_placement(_jobs(7), _gpus(3), max_concurrent=6, processes=1).waves == 3  # ceil(7 / 3)


def test_placement_a_job_of_several_processes_gets_that_many_gpus_under_torchrun(tmp_path):
    """processes = 3 on 8 GPUs: 8 // 3 = 2 slots of 3 devices (the last two GPUs idle), 5 jobs in 3
    waves; the job's command is torchrun with one process per GPU."""
    p = plan_placement(_jobs(5), _gpus(8), max_concurrent=6, processes=3)
    assert p.slots == [("0", "1", "2"), ("3", "4", "5")] and p.waves == 3
    assert p.assignments[1]["devices"] == "3,4,5"
    cmd = train_command(tmp_path / "job.json", processes=3)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", "-m"]
    assert train_command(tmp_path / "job.json")[1:3] == ["-m", "preftune.cli"]  # one process: no torchrun
    with pytest.raises(UserError, match="processes: 4 GPUs per job, but this machine has 2 GPU"):
        plan_placement(_jobs(1), _gpus(2), max_concurrent=6, processes=4)


def test_placement_without_a_gpu_changes_nothing():
    assert plan_placement(_jobs(4), [], max_concurrent=6, processes=1) is None


SHAPE = ModelShape(params=1000, hidden=10, layers=2, intermediate=20, kv_dim=10, vocab=50)


def test_placement_memory_estimate_by_hand():
    """LoRA r=2 on every linear: per layer (10+10)*2 (q, o) + (10+10)*2 (k, v) + (10+20)*3 (gate, up,
    down) = 170, x r=2 x 2 layers = 680 adapter parameters.
    bf16 base: weights 1000 x 2 + 680 x 4 = 4720; optimizer 680 x 12 = 8160; activations: 2 rows x
    batch 1 x 16 tokens = 32 tokens x 34 x 10 x 2 layers (bf16) = 21,760, + the head chunk 32 x 50 x 4 =
    6,400 -> 28,160. Full fine-tuning (float32 weights): 4000 + 12,000 + the same activations.
    With gradient checkpointing: 32 x 2 x 10 x 2 layers + one layer 32 x 340 + 6,400 = 18,560."""
    bf16 = choose_precision("cuda", full=False)
    assert lora_params(SHAPE, 2) == 680
    est = job_memory(SHAPE, bf16, full=False, lora_r=2, batch_size=1, max_length=16, gradient_checkpointing=False)
    assert (est.weights, est.optimizer, est.activations) == (4720, 8160, 28160)
    assert est.total == 4720 + 8160 + 28160 + GIB
    full = job_memory(SHAPE, choose_precision("cuda", full=True), full=True, lora_r=2, batch_size=1,
                      max_length=16, gradient_checkpointing=False)
    assert (full.weights, full.optimizer, full.activations) == (4000, 12000, 28160)
    ckpt = job_memory(SHAPE, bf16, full=False, lora_r=2, batch_size=1, max_length=16, gradient_checkpointing=True)
    assert ckpt.activations == 18560
    nf4 = job_memory(SHAPE, choose_precision("cuda", False, "4bit"), full=False, lora_r=2, batch_size=1,
                     max_length=16, gradient_checkpointing=False)
    assert nf4.weights == 550 + 680 * 4


def test_placement_refuses_a_job_bigger_than_the_gpu_at_plan_time():
    """An 8B-shaped model at batch 8 x 1024 tokens without checkpointing needs ~85 GiB: refused on
    80 GiB GPUs with one line naming the model and the way out; fits on 141 GiB; with gradient
    checkpointing it fits on 80 GiB."""
    llama8b = ModelShape(params=8_030_000_000, hidden=4096, layers=32, intermediate=14336, kv_dim=1024, vocab=128256)
    bf16 = choose_precision("cuda", full=False)
    est = job_memory(llama8b, bf16, full=False, lora_r=16, batch_size=8, max_length=1024, gradient_checkpointing=False)
    assert 80 * GIB < est.total < 90 * GIB
    with pytest.raises(UserError) as err:
        plan_placement(_jobs(2, "/models/llama-8b"), _gpus(8, 80), max_concurrent=6, processes=1,
                       memory={"/models/llama-8b": est})
    line = str(err.value)
    assert "\n" not in line and line.startswith("base model llama-8b: one job needs ~")
    assert "largest GPU here (80 GiB)" in line and "gradient_checkpointing" in line and "4bit" in line
    assert plan_placement(_jobs(2), _gpus(2, 141), max_concurrent=6, processes=1, memory={"m": est}).concurrent == 2
    small = job_memory(llama8b, bf16, full=False, lora_r=16, batch_size=8, max_length=1024, gradient_checkpointing=True)
    assert plan_placement(_jobs(2), _gpus(2, 80), max_concurrent=6, processes=1, memory={"m": small}).concurrent == 2
    # a mixed machine: only the GPUs big enough become slots
    mixed = [Device(0, "0", 24 * GIB), Device(1, "1", 141 * GIB)]
    assert plan_placement(_jobs(2), mixed, max_concurrent=6, processes=1, memory={"m": est}).slots == [("1",)]


def test_placement_simulated_inventory_and_its_bad_value(monkeypatch):
    assert [(d.visible_id, d.memory_bytes) for d in parse_simulated("2x80GiB")] == [("0", 80 * GIB), ("1", 80 * GIB)]
    monkeypatch.setenv(SIMULATED_ENV, "3x24GiB")
    assert [d.visible_id for d in inventory()] == ["0", "1", "2"]
    with pytest.raises(UserError, match="expected COUNTxSIZEGiB"):
        parse_simulated("two GPUs")


def test_placement_four_bit_needs_lora_and_a_gpu(zoo):
    """quantize='4bit': refused with full fine-tuning when the config is built; refused at plan time on a
    machine without a GPU."""
    with pytest.raises(ValueError, match="quantize '4bit' needs LoRA"):
        RunSpec(dataset="d.jsonl", full=True, quantize="4bit")
    spec = RunSpec(dataset="d.jsonl", quantize="4bit")
    with pytest.raises(UserError, match="quantize '4bit' needs a CUDA GPU with bfloat16.*no CUDA GPU"):
        plan_for(spec, job_grid(spec, [zoo["models"]["tiny-llama"]]), [])
    assert plan_for(RunSpec(dataset="d.jsonl"), [], []) is None


def test_placement_work_pool_worker_claims_its_own_devices(tmp_path):
    """A worker's jobs run in processes of their own: each claims free devices through lock files; a third
    claim on a 2-GPU worker waits until one is released."""
    devices = _gpus(2)
    got: list[str] = []
    with claim_devices(devices, 1, tmp_path) as a, claim_devices(devices, 1, tmp_path) as b:
        assert {a, b} == {"0", "1"}

        def third():
            with claim_devices(devices, 1, tmp_path, poll_s=0.05) as c:
                got.append(c)

        t = threading.Thread(target=third)
        t.start()
        time.sleep(0.5)
        assert got == []  # both taken: it waits
    t.join(timeout=30)
    assert got and got[0] in {"0", "1"}
    with claim_devices(devices, 2, tmp_path) as both:
        assert both == "0,1"


def test_placement_sweep_on_two_simulated_gpus(zoo, tmp_path, monkeypatch):
    """The Done-when of issue 24: 4 jobs, a simulated 2-GPU inventory -> the plan says 2 waves of 2; the
    real sweep (`preftune train` child processes, on the CPU) never runs more than 2 jobs at once, and
    every job ran with CUDA_VISIBLE_DEVICES 0 or 1 (read back from what each process saw), never the
    same device as a job running beside it; job.json and the sweep table show the placement."""
    from tests.training.conftest import write_jsonl
    from tests.training.marker_data import corpus_chats, marker_pair

    monkeypatch.setenv(SIMULATED_ENV, "2x80GiB")
    model = zoo["models"]["tiny-llama"]
    data = write_jsonl(tmp_path / "pairs.jsonl", [marker_pair(c) for c in corpus_chats("train")[:8]])
    spec = RunSpec(dataset=str(data), base_models=[model], betas=[0.1, 0.2, 0.3, 0.4], batch_size=4,
                   max_length=64, lora_r=4)
    jobs = [{**j, "train_data": str(data)} for j in job_grid(spec, [model])]
    placement = plan_for(spec, jobs, inventory())
    assert (placement.concurrent, placement.waves, placement.slots) == (2, 2, [("0",), ("1",)])
    assert GIB < placement.memory[model]["total"] < 2 * GIB  # a 3M-parameter model: mostly the CUDA context
    insp = {"format": "pairs", "source_format": "openai", "examples": 10, "duplicates": 0, "train_examples": 8,
            "test_examples": 2, "token_stats": {model: {"prompt": {"mean": 10.0}, "preferred": {"mean": 20.0},
                                                        "non_preferred": {"mean": 30.0}}}}
    plan = build_plan(spec, insp, jobs, "evaluator", "cpu", placement=placement.to_json())
    train = plan["estimate"]["phases"]["training"]
    assert plan["estimate"]["wall_parts"]["training"]["high"] == pytest.approx(train["job_seconds_high"] * 2, abs=0.1)
    assert "2 wave(s) of up to 2 job(s), 1 GPU(s) each" in plan["estimate"]["wall_parts"]["training"]["note"]
    text = plan_markdown(plan)
    assert "2 job(s) at once, 1 GPU(s) each (`CUDA_VISIBLE_DEVICES` `0`, `1`), 2 wave(s)" in text
    assert "`tiny-llama`: ~" in text

    ws = Workspace(tmp_path / "ws")
    inner = local_launcher(spec, ws, threads=1, slots=placement.slots)
    spans: dict[str, tuple[float, float, str]] = {}

    def launch(job: dict) -> dict:
        t0 = time.monotonic()
        summary = inner(job)
        spans[job["id"]] = (t0, time.monotonic(), summary["cuda_visible_devices"])
        return summary

    results = run_sweep(jobs, launch, max_concurrent=placement.concurrent)
    assert [r["status"] for r in results] == ["finished"] * 4, results
    assert {dev for _, _, dev in spans.values()} == {"0", "1"}
    ids = sorted(spans)
    # never more than 2 at once: at each job's start, the jobs running then (itself included)
    assert max(sum(s[0] <= spans[a][0] < s[1] for s in spans.values()) for a in ids) <= 2
    for a in ids:
        beside = [b for b in ids if b != a and spans[b][0] < spans[a][1] and spans[a][0] < spans[b][1]]
        assert all(spans[b][2] != spans[a][2] for b in beside)  # side by side: different GPUs
    for job in jobs:
        assert TrainConfig.load(ws.job_config(job["id"])).devices == spans[job["id"]][2]
    rows = sweep_rows(ws, jobs, {r["job"]["id"]: r for r in results})
    assert sorted(r["device"] for r in rows) == sorted(f"cuda:{d}" for _, _, d in spans.values())


def test_placement_sweep_table_shows_each_jobs_device(tmp_path):
    """The UI's sweep table: a running job's device from its job.json, a finished one's from what its
    process saw; a queued job shows none (a job.json left by an earlier run is not its placement)."""
    spec = RunSpec(dataset="d.jsonl", betas=[0.1, 0.2, 0.3])
    ws = Workspace(tmp_path)
    jobs = [{**j, "train_data": "t.jsonl"} for j in job_grid(spec, ["/models/m"])]
    for job, devices in zip(jobs, ("1", "0", "0"), strict=True):
        write_job_config(spec, ws, job, threads=1, devices=devices)
    status = {jobs[0]["id"]: {"status": "running"},
              jobs[1]["id"]: {"status": "finished", "summary": {"cuda_visible_devices": "2,3", "device": "cuda"}}}
    rows = sweep_rows(ws, jobs, status)
    assert [r["device"] for r in rows] == ["cuda:1", "cuda:2,3", ""]
