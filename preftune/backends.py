"""The generation backends of a run's local models, behind one interface: which server answers a
model folder, and the command line that starts it (``preftune.server`` starts, reuses and stops it).

Three backends:

* ``preftune``: ``python -m preftune.batchserve`` (preftune/batching.py), continuous batching over a
  padded KV cache, CPU-tuned. The default on CPU for a model whose KV cache is plain full
  attention. SmolLM2-135M on 2 CPU cores, pair generation (bench_pairs --local): 337-350 tokens/s
  at concurrency 32 against 42 at 1 (8.1-8.3x); transformers 5.23's own
  ``--continuous-batching`` 5.1-5.5x in the same runs. The zoo's tiny models batch too (2,837
  tokens/s at concurrency 16 against 233 one at a time), on one thread.
* ``transformers``: ``transformers serve`` through ``python -m preftune.hfserve`` (its app built
  in-process, with a bearer-key check and without the model-loading routes). The fallback: a model
  with sliding-window or hybrid layers, and deployments on CPU. ``--continuous-batching`` from
  ``BATCHING_MIN_PARAMS`` up; below, a tiny model is ~3x slower with it on CPU.
* ``vllm``: ``vllm serve`` (paged attention, a memory budget, LoRA adapters served unmerged), its
  app behind ``preftune.gate.VllmGate`` (the key on every route, not /v1 alone). The default when
  CUDA is present and vLLM is installed (``pip install 'preftune[vllm]'``). Phase 5 answers every
  candidate of one base with one vLLM server, the adapters loaded as LoRA modules (``--enable-lora
  --lora-modules NAME=PATH ... --max-lora-rank R``). Not run in this project's CI (no GPU): its
  selection and command line are tested (tests/test_backends.py), its gate in tests/test_gate.py.

``PREFTUNE_LOCAL_SERVER`` (``preftune``, ``transformers`` or ``vllm``) overrides the choice;
``choose_backend`` is the one rule, a pure function of the facts so it is tested on any machine.

Every server gets a bearer key (preftune/keys.py) through its environment, never its argv.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from preftune.errors import UserError
from preftune.keys import SERVER_KEY_ENV

BACKENDS = ("preftune", "transformers", "vllm")
INSTALL_VLLM = "pip install 'preftune[vllm]'"

BATCHING_MIN_PARAMS = 20_000_000  # continuous batching from here up (module docstring)
BATCHED_CONCURRENCY = 32  # requests in flight to a continuously batching server (what it batches)
SERIAL_CONCURRENCY = 2  # to a one-at-a-time server: one computing, one queued behind it
CB_CONTEXT_TOKENS = 1024  # KV-cache room per request in flight (prompt + answer) a batching server reserves
VLLM_CONCURRENCY = 64  # requests in flight to a vLLM server (it schedules them by its own memory budget)
# vLLM accepts only these --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks); its default, 16,
# refuses a rank-32 adapter.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def choose_backend(*, cuda: bool, vllm_installed: bool, setting: str | None, plain_cache: bool) -> str:
    """The backend for one model folder, from the facts: a CUDA device, vLLM importable, the
    ``PREFTUNE_LOCAL_SERVER`` setting (None or "" for automatic), the model's KV cache plain."""
    setting = (setting or "").strip().lower() or None
    if setting is not None and setting not in BACKENDS:
        raise UserError(f"PREFTUNE_LOCAL_SERVER must be one of {', '.join(BACKENDS)}, not {setting!r}")
    if setting == "vllm":
        if not vllm_installed:
            raise UserError(f"PREFTUNE_LOCAL_SERVER=vllm but vLLM is not installed: {INSTALL_VLLM}")
        if not cuda:
            raise UserError("PREFTUNE_LOCAL_SERVER=vllm needs a CUDA GPU, and this machine has none")
        return "vllm"
    if setting == "transformers":
        return "transformers"
    if setting is None and cuda and vllm_installed:
        return "vllm"
    # preftune's server pads and joins rows' caches: a sliding-window or hybrid cache goes elsewhere.
    return "preftune" if plain_cache else "transformers"


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def has_plain_cache(model_dir: str) -> bool:
    from transformers import AutoConfig

    from preftune.batching import plain_cache

    try:
        return plain_cache(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    except (OSError, ValueError):
        return False


def local_backend(model_dir: str | None = None) -> str:
    """The backend this machine gives ``model_dir`` (None: the run's setting alone, checked)."""
    setting = os.environ.get("PREFTUNE_LOCAL_SERVER")
    return choose_backend(cuda=cuda_available(), vllm_installed=vllm_installed(), setting=setting,
                          plain_cache=has_plain_cache(model_dir) if model_dir else True)


def check_local_backend() -> None:
    """Before a run asks for approval: a ``PREFTUNE_LOCAL_SERVER`` this machine cannot honour is one
    line (a user error), not a failure after money was spent."""
    if os.environ.get("PREFTUNE_LOCAL_SERVER"):
        local_backend()


# -- command lines ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """How to start one server: its argv (``{port}`` is filled in at launch), the environment
    variable its key goes in, the ``model`` requests name (None: the folder), the requests in flight
    that suit it, and whether it batches (a one-at-a-time server gets passive OpenMP threads)."""

    backend: str
    argv: list[str]
    key_env: str = SERVER_KEY_ENV
    served_model: str | None = None
    concurrency: int | None = None
    batching: bool = True


def launch_for(backend: str, model_dir: str, device: str = "cpu", *,
               adapters: dict[str, str] | None = None) -> Launch:
    """The command line of ``backend`` serving ``model_dir`` (+ LoRA ``adapters``, vLLM only)."""
    if backend == "vllm":
        return Launch("vllm", vllm_command(model_dir, adapters or {}), key_env="VLLM_API_KEY",
                      concurrency=VLLM_CONCURRENCY)
    if adapters:
        raise ValueError(f"the {backend} backend serves one model folder: merge adapters first")
    if backend == "preftune":
        return Launch("preftune", batchserve_command(model_dir, device), concurrency=BATCHED_CONCURRENCY)
    batching = continuous_batching(model_dir)
    return Launch("transformers", transformers_command(model_dir, device, batching), batching=batching,
                  concurrency=BATCHED_CONCURRENCY if batching else SERIAL_CONCURRENCY)


def continuous_batching(model_dir: str) -> bool:
    """Whether this model is big enough to gain from batching on many threads (by its parameter
    count): ``transformers serve --continuous-batching`` from here up, and preftune's server gives
    a smaller one a single thread."""
    from preftune.cost import model_params

    try:
        return model_params(model_dir) >= BATCHING_MIN_PARAMS
    except UserError:
        return False


def kv_cache_fraction(model_dir: str, device: str = "cpu") -> float:
    """The share of memory a continuously batching server may give its paged KV cache: room for
    BATCHED_CONCURRENCY requests of CB_CONTEXT_TOKENS each (+25 %), between 2 % and 50 %.

    Left to its default, transformers 5.23 sizes the cache from the machine's memory: one
    SmolLM2-135M server on CPU held 14.3 GB resident on a 24 GB machine (3.0 GB at 0.1), so the
    two generators of a pair phase could not both run."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    layers = cfg.num_hidden_layers
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * layers * heads * head_dim * (4 if device == "cpu" else 2)  # keys + values
    need = 1.25 * BATCHED_CONCURRENCY * CB_CONTEXT_TOKENS * per_token
    if device == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
    return round(min(0.5, max(0.02, need / total)), 4)


def transformers_command(model_dir: str, device: str = "cpu", batching: bool = False) -> list[str]:
    """`transformers serve` through preftune.hfserve (this interpreter): the same server with a
    bearer-key check and no model-loading routes."""
    if importlib.util.find_spec("transformers.cli.serve") is None:
        raise UserError("transformers' command line is not installed in this environment: "
                        "install transformers[serving]")
    return [sys.executable, "-m", "preftune.hfserve", model_dir, "--port", "{port}", "--host", "127.0.0.1",
            "--device", device,
            *(["--continuous-batching", "--cb-max-memory-percent", str(kv_cache_fraction(model_dir, device))]
              if batching else [])]


def batchserve_command(model_dir: str, device: str = "cpu") -> list[str]:
    """A run's own server for ``model_dir``: preftune's continuous batching (preftune/batchserve.py)."""
    # A tiny model's step is Python overhead, not matmuls: one thread does it as fast, and leaves the
    # other cores to the real model it is usually paired with (the weak side of a pair phase).
    small = device == "cpu" and not continuous_batching(model_dir)
    return [sys.executable, "-m", "preftune.batchserve", model_dir, "--port", "{port}", "--host", "127.0.0.1",
            "--device", device, "--rows", str(BATCHED_CONCURRENCY), *(["--threads", "1"] if small else [])]


def lora_rank(adapter_dir: str | Path) -> int:
    """The largest rank of a PEFT LoRA adapter (``r``, or its per-module ``rank_pattern``)."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text())
        return max([int(cfg["r"]), *(int(r) for r in (cfg.get("rank_pattern") or {}).values())])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"not a readable LoRA adapter config ({type(err).__name__})", path=path) from None


def vllm_max_lora_rank(ranks: list[int]) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds every rank."""
    need = max(ranks, default=1)
    for allowed in VLLM_LORA_RANKS:
        if allowed >= need:
            return allowed
    raise UserError(f"LoRA rank {need} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]})")


def vllm_command(base: str, adapters: dict[str, str]) -> list[str]:
    """``vllm serve BASE`` on loopback, with ``adapters`` (served name -> folder) as LoRA modules.

    The key is not here: vLLM reads ``VLLM_API_KEY`` from its environment (the argv of a process is
    world-readable). vLLM itself checks it on the /v1 routes only (its security guide): /tokenize,
    /metrics, /invocations (which generates), /sleep, ... would answer any local user. So the app
    gets preftune.gate.VllmGate, which reads the same variable: the key on every route but /health,
    and the routes that load adapters or reconfigure the server closed to everyone."""
    cmd = [sys.executable, "-c", "from vllm.entrypoints.cli.main import main; main()", "serve", base,
           "--host", "127.0.0.1", "--port", "{port}", "--middleware", "preftune.gate.VllmGate"]
    if not adapters:
        return cmd
    modules = [f"{name}={path}" for name, path in adapters.items()]
    rank = vllm_max_lora_rank([lora_rank(p) for p in adapters.values()])
    # --max-loras: every adapter may be in one batch (all candidates answered side by side).
    return cmd + ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(rank),
                  "--lora-modules", *modules]
