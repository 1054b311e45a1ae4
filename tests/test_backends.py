"""The generation backends (preftune/backends.py): the one selection rule as a table, the vLLM
command line phase 5 and deploy would run (vLLM itself needs a CUDA GPU: not run here), the key
handed over in the environment, and PREFTUNE_LOCAL_SERVER=vllm without vLLM refused before a run
asks anything."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from preftune.backends import (
    INSTALL_VLLM,
    choose_backend,
    launch_for,
    local_backend,
    vllm_command,
    vllm_max_lora_rank,
)
from preftune.errors import UserError
from preftune.keys import read_key_file

# (CUDA, vLLM installed, PREFTUNE_LOCAL_SERVER, plain KV cache) -> backend, or the one-line error.
TABLE = [
    ((False, False, None, True), "preftune"),  # CPU: preftune's batching server
    ((False, False, None, False), "transformers"),  # a sliding-window / hybrid cache cannot be batched there
    ((False, True, None, True), "preftune"),  # vLLM installed but no GPU
    ((True, False, None, True), "preftune"),  # a GPU without vLLM
    ((True, True, None, True), "vllm"),  # a GPU and vLLM: the default
    ((True, True, None, False), "vllm"),  # vLLM serves any cache
    ((True, True, "", True), "vllm"),
    ((True, True, "transformers", True), "transformers"),
    ((True, True, "preftune", True), "preftune"),
    ((False, False, "transformers", True), "transformers"),
    ((True, True, "VLLM", True), "vllm"),
    ((False, False, "vllm", True), f"PREFTUNE_LOCAL_SERVER=vllm but vLLM is not installed: {INSTALL_VLLM}"),
    ((True, False, "vllm", True), f"PREFTUNE_LOCAL_SERVER=vllm but vLLM is not installed: {INSTALL_VLLM}"),
    ((False, True, "vllm", True), "PREFTUNE_LOCAL_SERVER=vllm needs a CUDA GPU, and this machine has none"),
    ((True, True, "tgi", True), "PREFTUNE_LOCAL_SERVER must be one of preftune, transformers, vllm, not 'tgi'"),
]


@pytest.mark.parametrize("facts, expected", TABLE)
def test_backend_selection_table(facts, expected):
    cuda, installed, setting, plain = facts
    if expected in ("preftune", "transformers", "vllm"):
        assert choose_backend(cuda=cuda, vllm_installed=installed, setting=setting, plain_cache=plain) == expected
    else:
        with pytest.raises(UserError) as info:
            choose_backend(cuda=cuda, vllm_installed=installed, setting=setting, plain_cache=plain)
        assert str(info.value) == expected


def test_this_machine_picks_by_the_models_cache(zoo, tmp_path, monkeypatch):
    monkeypatch.delenv("PREFTUNE_LOCAL_SERVER", raising=False)
    assert local_backend(zoo["models"]["tiny-llama"]) == "preftune"  # a plain full-attention cache, no GPU here
    config = json.loads((Path(zoo["models"]["tiny-llama"]) / "config.json").read_text())
    (tmp_path / "sliding").mkdir()
    (tmp_path / "sliding" / "config.json").write_text(json.dumps(
        {**config, "model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 4}))
    assert local_backend(str(tmp_path / "sliding")) == "transformers"
    monkeypatch.setenv("PREFTUNE_LOCAL_SERVER", "transformers")
    assert local_backend(zoo["models"]["tiny-llama"]) == "transformers"


def adapter(path: Path, r: int, rank_pattern: dict | None = None) -> str:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "rank_pattern": rank_pattern or {}}))
    return str(path)


def test_vllm_command_serves_every_adapter_with_a_rank_that_fits(tmp_path):
    """vLLM's default --max-lora-rank is 16 and it takes only 1, 8, 16, 32, 64, 128, 256, 320, 512:
    ranks 8 and 32 (and a module at 24) need 32."""
    adapters = {"job-a": adapter(tmp_path / "a", 8), "job-b": adapter(tmp_path / "b", 16, {"q_proj": 24}),
                "job-c": adapter(tmp_path / "c", 32)}
    launch = launch_for("vllm", "/models/base", adapters=adapters)
    argv = launch.argv
    assert argv[:5] == [sys.executable, "-c", "from vllm.entrypoints.cli.main import main; main()", "serve",
                        "/models/base"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "{port}"
    assert "--enable-lora" in argv and argv[argv.index("--max-lora-rank") + 1] == "32"
    assert argv[argv.index("--max-loras") + 1] == "3"  # every candidate in one batch
    start = argv.index("--lora-modules") + 1
    assert argv[start:] == [f"job-a={tmp_path / 'a'}", f"job-b={tmp_path / 'b'}", f"job-c={tmp_path / 'c'}"]
    # The key goes in VLLM_API_KEY (vLLM reads it there), never on the world-readable command line.
    assert launch.key_env == "VLLM_API_KEY" and not any("api-key" in a for a in argv)
    assert [vllm_max_lora_rank([r]) for r in (1, 2, 8, 9, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(UserError, match="LoRA rank 600 is above the largest vLLM serves"):
        vllm_max_lora_rank([600])
    assert "--enable-lora" not in vllm_command("/models/base", {})  # the base alone


def test_a_server_gets_its_key_in_the_environment_named_by_its_backend(tmp_path, monkeypatch):
    """What ``serve_local`` hands a vLLM launch: VLLM_API_KEY in its environment, absent from its
    argv and log; and none of vLLM's switches that open model-loading routes, even when set here."""
    from preftune.server import ServerError, serve_local

    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")

    dump = tmp_path / "seen.json"
    stand_in = [sys.executable, "-c", "import json, os, sys; json.dump({'env': dict(os.environ), 'argv': sys.argv},"
                f" open({str(dump)!r}, 'w'))"]
    launch = dataclasses.replace(launch_for("vllm", "/models/base"), argv=stand_in)
    key_file = tmp_path / "keys" / "server.key"
    with pytest.raises(ServerError):  # the stand-in exits at once: what it saw is the point
        serve_local(tmp_path / "m", tmp_path / "logs", launch=launch, key_file=key_file, timeout=10)
    seen = json.loads(dump.read_text())
    assert not key_file.exists()  # a server that failed to start leaves no key behind
    key = seen["env"]["VLLM_API_KEY"]
    assert len(key) >= 32 and key not in json.dumps(seen["argv"])
    assert not {"VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_SERVER_DEV_MODE"} & seen["env"].keys()
    assert key not in next((tmp_path / "logs").glob("server-*.log")).read_text()


def test_a_kept_key_file_is_owner_only_and_read_back(tmp_path):
    from preftune.keys import write_key_file

    path = write_key_file(tmp_path / "d" / "k", "s3cret")
    assert oct(path.stat().st_mode & 0o777) == "0o600" and oct(path.parent.stat().st_mode & 0o777) == "0o700"
    assert read_key_file(path) == "s3cret"


GOOD = ('{"input": {"messages": [{"role": "user", "content": "q%d"}]}, '
        '"preferred_output": [{"role": "assistant", "content": "a"}], '
        '"non_preferred_output": [{"role": "assistant", "content": "b"}]}')


def test_vllm_asked_for_without_vllm_stops_the_run_before_approval(tmp_path):
    """No vLLM in this environment (a CPU machine): ``preftune run`` says how to install it in one
    line, exit 2, before a flow run or a workspace exists (so before any approval is asked)."""
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(GOOD % i for i in range(4)) + "\n")
    proc = subprocess.run([sys.executable, "-m", "preftune.cli", "run", "--dataset", str(data), "--yes"],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path,
                          env={**os.environ, "PREFTUNE_LOCAL_SERVER": "vllm"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"preftune run: error: PREFTUNE_LOCAL_SERVER=vllm but vLLM is not installed: {INSTALL_VLLM}"]
    assert not (tmp_path / "workspaces").exists()


def test_phase5_through_a_server_answers_as_in_process(zoo, tmp_path):
    """Phase 5's server path (``answer_with_backend``, what a vLLM LoRA server is asked through)
    gives the in-process completions, greedy: here against preftune's server for the base."""
    from preftune.hf import load_causal_lm
    from preftune.server import serve_local
    from preftune.tasks.generate import answer_with_backend, generate_with

    folder = zoo["models"]["tiny-llama"]
    prompts = [[{"role": "user", "content": f"Question {i}: explain item {i} briefly."}] for i in range(6)]
    cut: list[bool] = []
    expected = generate_with(*load_causal_lm(folder, device="cpu"), prompts, max_new_tokens=12, cut=cut)
    with serve_local(folder, tmp_path / "logs") as handle:  # the same texts, cut (by the limit) the same
        assert answer_with_backend(handle.endpoint(), prompts, max_new_tokens=12) == list(zip(expected, cut, strict=True))


def test_phase5_uses_one_lora_server_only_on_vllm_and_only_for_adapters(zoo, tmp_path):
    import contextlib

    from preftune.tasks.evaluate_candidates import lora_server
    from preftune.workspace import Workspace

    ws = Workspace(tmp_path / "ws").ensure()
    base = zoo["models"]["tiny-llama"]
    adapters = {"job-1": adapter(tmp_path / "a1", 8), "job-2": adapter(tmp_path / "a2", 32)}
    with contextlib.ExitStack() as stack:
        assert lora_server(stack, ws, base, adapters, backend="preftune") == {}  # CPU: in process
        assert lora_server(stack, ws, base, {**adapters, "full": base}, backend="vllm") == {}  # a full model
        assert lora_server(stack, ws, base, {}, backend="vllm") == {}


def test_phase5_in_process_gives_a_small_model_one_thread_and_restores_the_count(zoo):
    """In process (phase 5 on CPU), a tiny model on two OpenMP threads of a loaded machine took
    80.9 s for what one thread did in 1.2 s (tasks/generate.small_model_threads)."""
    import torch

    from preftune.hf import load_causal_lm
    from preftune.tasks.generate import small_model_threads

    model, _ = load_causal_lm(zoo["models"]["tiny-llama"], device="cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with small_model_threads(model):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
