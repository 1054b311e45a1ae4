"""Where a sweep's jobs run on one machine: its CUDA devices, each job's memory need, the waves.

``plan_placement(jobs, devices, ...)`` is the one rule, a pure function of the machine's accelerator
inventory (``inventory()`` reads the real one): a job of ``processes`` = g data-parallel processes
takes g GPUs of its own; at most ``min(max_concurrent_jobs, GPUs // g)`` jobs run at once, each pinned
with ``CUDA_VISIBLE_DEVICES`` to its slot's devices; so n jobs run in ceil(n / slots) waves. A job
whose estimated memory (``job_memory``) exceeds a GPU is refused at plan time, before anything is
spent. Without a CUDA device (a CPU machine) there is no placement and nothing changes.

The estimate (weights + gradients + optimizer + activations, from the model's config.json) is the
usual back-of-the-envelope one, deliberately on the high side; it decides a refusal and is shown in
the plan, it does not reserve anything.

``PREFTUNE_SIMULATED_GPUS`` (e.g. ``2x80GiB``) makes ``inventory()`` answer with that many devices
of that size: for the test suite, which runs a real sweep's placement on a machine without a GPU.
It is not a user setting (a simulated GPU trains on the CPU).
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from preftune.errors import UserError
from preftune.job import Precision, choose_precision

SIMULATED_ENV = "PREFTUNE_SIMULATED_GPUS"  # tests only: "2x80GiB" = two simulated 80 GiB devices
GIB = 1024**3
CUDA_OVERHEAD = int(1.0 * GIB)  # the CUDA context, cuBLAS workspaces, allocator fragmentation
USABLE = 0.95  # of a device's memory a job may plan to use


@dataclass(frozen=True)
class Device:
    """One CUDA device: its index in this process, the id a child's CUDA_VISIBLE_DEVICES names it by
    (the same unless this process itself was pinned), and its memory."""

    index: int
    visible_id: str
    memory_bytes: int
    name: str = ""


def parse_simulated(text: str) -> list[Device]:
    """``"2x80GiB"`` -> two devices of 80 GiB (``PREFTUNE_SIMULATED_GPUS``, tests only)."""
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+(?:\.\d+)?)\s*GiB\s*", text, re.IGNORECASE)
    if not m:
        raise UserError(f"{SIMULATED_ENV}={text!r}: expected COUNTxSIZEGiB, e.g. 2x80GiB")
    return [Device(i, str(i), int(float(m[2]) * GIB), "simulated") for i in range(int(m[1]))]


def inventory() -> list[Device]:
    """This machine's CUDA devices ([] without CUDA). A process already pinned by CUDA_VISIBLE_DEVICES
    hands its children the ids it was given (device 0 here may be GPU 5 of the machine)."""
    simulated = os.environ.get(SIMULATED_ENV)
    if simulated:
        return parse_simulated(simulated)
    import torch

    if not torch.cuda.is_available():
        return []
    pinned = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append(Device(i, pinned[i] if i < len(pinned) else str(i), props.total_memory, props.name))
    return devices


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs of a base model (``model_shape`` reads it from config.json)."""

    params: int
    hidden: int
    layers: int
    intermediate: int
    kv_dim: int
    vocab: int


def model_shape(folder: str | Path) -> ModelShape:
    """The shape of the model in ``folder``: its parameter count (built on the meta device, no weights
    read) and the sizes the activations scale with."""
    from transformers import AutoConfig

    from preftune.cost import model_params

    params = model_params(str(folder))  # a folder or a cached id; a one-line UserError otherwise
    cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True).to_dict()
    cfg = cfg.get("text_config") or cfg  # a multimodal wrapper: the language model's sizes
    hidden = int(cfg["hidden_size"])
    heads = int(cfg.get("num_attention_heads") or 1)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    return ModelShape(params=params, hidden=hidden, layers=int(cfg["num_hidden_layers"]),
                      intermediate=int(cfg.get("intermediate_size") or 4 * hidden),
                      kv_dim=int(cfg.get("num_key_value_heads") or heads) * head_dim, vocab=int(cfg["vocab_size"]))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one process of a job needs on its GPU, by part."""

    weights: int
    optimizer: int  # trainable weights' gradients + AdamW's two moments (+ float32 master copy if any)
    activations: int
    overhead: int = CUDA_OVERHEAD

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations + self.overhead

    def describe(self) -> str:
        return (f"~{self.total / GIB:.1f} GiB (weights {self.weights / GIB:.1f} + optimizer {self.optimizer / GIB:.1f}"
                f" + activations {self.activations / GIB:.1f} + CUDA {self.overhead / GIB:.1f})")


def lora_params(shape: ModelShape, rank: int) -> int:
    """Adapter parameters of LoRA rank ``rank`` on every linear layer (q, k, v, o, gate, up, down):
    r x (in + out) each."""
    h, kv, i = shape.hidden, shape.kv_dim, shape.intermediate
    per_layer = (h + h) * 2 + (h + kv) * 2 + (h + i) * 3
    return shape.layers * rank * per_layer


def job_memory(shape: ModelShape, precision: Precision, *, full: bool, lora_r: int, batch_size: int,
               max_length: int, gradient_checkpointing: bool) -> MemoryEstimate:
    """One process's GPU memory for a job (pure). Trainable parameters cost 16 bytes each in AdamW
    (float32 weight-gradient, two moments, and for full fine-tuning the float32 weight itself, counted
    in ``weights``); activations follow Korthikanti et al. (2022) with a fused attention kernel: ~34 x
    hidden bytes per token per layer in bf16 (2 x hidden with gradient checkpointing, plus one layer's
    full set), over the micro-batch's 2 x batch_size rows of max_length tokens; the LM head is scored
    in vocabulary chunks (tasks/training/logps.py), so one (tokens x 4096) float32 chunk is added."""
    trainable = shape.params if full else lora_params(shape, lora_r)
    weights = int(shape.params * precision.weight_bytes) + (0 if full else trainable * 4)
    optimizer = trainable * 12  # float32 gradient + exp_avg + exp_avg_sq
    tokens = 2 * batch_size * max_length
    per_token_layer = 2 * shape.hidden if gradient_checkpointing else 34 * shape.hidden
    act_bytes = 2 if precision.mixed == "bf16" else 4
    activations = tokens * per_token_layer * shape.layers * act_bytes // 2
    if gradient_checkpointing:
        activations += tokens * 34 * shape.hidden * act_bytes // 2
    activations += tokens * min(shape.vocab, 4096) * 4
    return MemoryEstimate(weights=weights, optimizer=optimizer, activations=activations)


@dataclass
class Placement:
    """The sweep's layout on this machine's GPUs: ``slots`` (each a tuple of CUDA_VISIBLE_DEVICES ids,
    one job at a time), the planned device(s) and wave of each job, and each base model's estimate."""

    gpus_per_job: int
    slots: list[tuple[str, ...]]
    assignments: list[dict] = field(default_factory=list)
    memory: dict[str, dict] = field(default_factory=dict)
    devices: list[dict] = field(default_factory=list)

    @property
    def concurrent(self) -> int:
        return len(self.slots)

    @property
    def waves(self) -> int:
        return max((a["wave"] for a in self.assignments), default=-1) + 1

    def to_json(self) -> dict:
        return {"gpus_per_job": self.gpus_per_job, "concurrent": self.concurrent, "waves": self.waves,
                "slots": [",".join(s) for s in self.slots], "assignments": self.assignments,
                "memory": self.memory, "devices": self.devices}

    @classmethod
    def from_json(cls, data: dict) -> Placement:
        return cls(gpus_per_job=data["gpus_per_job"], slots=[tuple(s.split(",")) for s in data["slots"]],
                   assignments=data["assignments"], memory=data["memory"], devices=data["devices"])


def plan_placement(jobs: list[dict], devices: list[Device], *, max_concurrent: int, processes: int,
                   memory: dict[str, MemoryEstimate] | None = None) -> Placement | None:
    """Place ``jobs`` ({"id", "base_model"}) on ``devices``: None without a device (CPU: nothing
    changes). ``memory``: each base model's estimate; a model that fits no slot is refused (UserError,
    one line). Jobs keep their order (one base model's jobs together); job k runs in wave k // slots,
    planned on slot k % slots (the sweep hands a finished job's slot to the next one)."""
    if not devices:
        return None
    if processes > len(devices):
        raise UserError(f"processes: {processes} GPUs per job, but this machine has {len(devices)} GPU(s)")
    groups = [tuple(devices[i:i + processes]) for i in range(0, len(devices) - processes + 1, processes)]
    memory = memory or {}
    need = max((m.total for m in memory.values()), default=0)
    fitting = [g for g in groups if min(d.memory_bytes for d in g) * USABLE >= need]
    if not fitting:
        model, est = max(memory.items(), key=lambda kv: kv[1].total)
        biggest = max(d.memory_bytes for d in devices) / GIB
        raise UserError(f"base model {Path(model).name}: one job needs {est.describe()} per GPU, more than the "
                        f"largest GPU here ({biggest:.0f} GiB): lower batch_size or max_length, turn on "
                        "gradient_checkpointing, or set quantize to '4bit'")
    slots = [tuple(d.visible_id for d in g) for g in fitting][:max(1, max_concurrent)]
    assignments = [{"job": j["id"], "devices": ",".join(slots[k % len(slots)]), "wave": k // len(slots)}
                   for k, j in enumerate(jobs)]
    return Placement(gpus_per_job=processes, slots=slots, assignments=assignments,
                     memory={m: {**asdict(e), "total": e.total, "text": e.describe(), "name": Path(m).name}
                             for m, e in memory.items()},
                     devices=[{"id": d.visible_id, "memory_gib": round(d.memory_bytes / GIB, 1), "name": d.name}
                              for d in devices])


def plan_for(spec, jobs: list[dict], devices: list[Device]) -> Placement | None:
    """``plan_placement`` for a RunSpec's grid: each base model's memory estimated from its config
    with the precision the jobs will train in on a CUDA device. A work pool's jobs are placed by its
    workers (``claim_slot``), not here."""
    if spec.work_pool:
        return None
    if not devices:
        if spec.quantize != "none":  # 4-bit without a GPU: refused before anything is spent
            try:
                choose_precision("cpu", spec.full, spec.quantize)
            except ValueError as err:
                raise UserError(str(err)) from None
        return None
    precision = choose_precision("cuda", spec.full, spec.quantize)
    memory = {}
    for model in sorted({j["base_model"] for j in jobs}):
        memory[model] = job_memory(model_shape(model), precision, full=spec.full, lora_r=spec.lora_r,
                                   batch_size=spec.batch_size, max_length=spec.max_length,
                                   gradient_checkpointing=spec.gradient_checkpointing)
    return plan_placement(jobs, devices, max_concurrent=spec.max_concurrent_jobs, processes=spec.processes,
                          memory=memory)


def waves(n_jobs: int, concurrent: int) -> int:
    """Rounds of at most ``concurrent`` jobs that ``n_jobs`` take."""
    return math.ceil(n_jobs / max(1, concurrent))


@contextmanager
def claim_devices(devices: list[Device], count: int, lock_dir: str | Path | None = None,
                  poll_s: float = 2.0) -> Iterator[str]:
    """Hold ``count`` of ``devices`` no other process of this machine holds, for the block; yields their
    CUDA_VISIBLE_DEVICES. A work pool's worker runs each job in a process of its own, so the devices are
    claimed with one lock file per device (released by the OS if the process dies); waits while all
    are taken, so a worker never runs more jobs than ``len(devices) // count`` at once."""
    if count > len(devices):
        raise UserError(f"processes: {count} GPUs per job, but this worker has {len(devices)} GPU(s)")
    folder = Path(lock_dir or Path(tempfile.gettempdir()) / "preftune-gpus")
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        held: list[tuple[str, int]] = []
        for d in devices:
            fd = os.open(folder / f"gpu-{d.visible_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            held.append((d.visible_id, fd))
            if len(held) == count:
                break
        if len(held) == count:
            try:
                yield ",".join(v for v, _ in held)
            finally:
                for _, fd in held:
                    os.close(fd)  # closing the descriptor releases its lock
            return
        for _, fd in held:
            os.close(fd)
        time.sleep(poll_s)
