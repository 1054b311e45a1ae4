"""Phase 6: put the chosen model behind an OpenAI-compatible endpoint and prove it answers.

The server is started by the run's launcher (preftune/backends.py, preftune/server.py): vLLM when
CUDA is present and vLLM is installed (the adapter served as a LoRA module, unmerged, with
``--max-lora-rank`` from its rank), else ``transformers serve`` through preftune/hfserve.py, to which
a LoRA adapter is first merged into its base (``merge_and_unload``) into ``deploy/model/``. Either
way it listens on 127.0.0.1 only, requires a bearer key made for it — written 0600 to
``deploy/api_key``, read by the client snippet from there or from ``$PREFTUNE_DEPLOY_KEY`` — and
offers callers no route that loads another model. The server is detached — it outlives the
command — and recorded in ``deploy/endpoint.json``; ``stop_deployment`` ends it. A server that fails
its health check or smoke request is stopped before the error (with its last log lines) is raised:
nothing is left running.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from preftune.backends import choose_backend, cuda_available, launch_for, vllm_installed
from preftune.client import ChatClient, ChatError
from preftune.errors import UserError
from preftune.files import atomic_dir, read_json, tree_fingerprint, write_json_atomic
from preftune.hf import load_tokenizer, model_fingerprint
from preftune.server import ServerError, ServerHandle, device_name, free_port, serve_local, stop_server
from preftune.spec import RunSpec
from preftune.tasks.sweep import trained_weights
from preftune.workspace import Workspace

SMOKE_PROMPT = [{"role": "user", "content": "Say hello in one short sentence."}]
LORA_NAME = "preftune"  # the served model name of a vLLM LoRA module
KEY_FILE = "api_key"  # in deploy/: the deployed server's bearer key, mode 0600
KEY_ENV = "PREFTUNE_DEPLOY_KEY"  # or the client snippet reads the key from this variable


def merge_adapter(base: str | Path, adapter: str | Path, out_dir: str | Path) -> Path:
    """Merge a LoRA adapter into its base and save model + tokenizer; reused when inputs are unchanged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    stamp = {"base": str(Path(base).resolve()), "adapter": str(Path(adapter).resolve()),
             "base_fingerprint": model_fingerprint(base),
             "adapter_fingerprint": tree_fingerprint(adapter, content=False)}
    marker = out_dir / "preftune_merge.json"
    if marker.exists() and read_json(marker) == stamp and (out_dir / "config.json").exists():
        return out_dir
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError("not a LoRA adapter folder (no adapter_config.json)", path=adapter)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", local_files_only=True)
    merged = PeftModel.from_pretrained(model, str(adapter), local_files_only=True).merge_and_unload()
    # The adapter folder carries the tokenizer when training changed it (added pad token, template).
    tok_src = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else base
    tokenizer = load_tokenizer(tok_src)
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "preftune_merge.json", stamp)
    return out_dir


def _use_vllm(engine: str) -> bool:
    """``auto``: vLLM when CUDA is present and vLLM is installed; ``vllm`` asked for on a machine
    that cannot run it is one line saying what is missing."""
    if engine == "transformers":
        return False
    cuda, installed = cuda_available(), vllm_installed()
    setting = "vllm" if engine == "vllm" else None
    return choose_backend(cuda=cuda, vllm_installed=installed, setting=setting, plain_cache=True) == "vllm"


def _smoke(handle: ServerHandle) -> dict[str, Any]:
    client = ChatClient(handle.endpoint(), concurrency=1, max_retries=2, timeout=120.0)
    result = client.chat_sync(SMOKE_PROMPT, max_tokens=16, temperature=0.0)
    return {"prompt": SMOKE_PROMPT[-1]["content"], "reply": result.text, "finish_reason": result.finish_reason,
            "completion_tokens": result.completion_tokens}


def snippet(base_url: str, model: str, key_file: Path) -> str:
    """A client of the deployment; the key is read when it runs (from $PREFTUNE_DEPLOY_KEY or the
    0600 file), never written into the snippet."""
    return (
        "import os\nfrom pathlib import Path\n\nfrom openai import OpenAI\n\n"
        f"# The server's key: ${KEY_ENV}, else the file preftune deploy wrote (readable by you alone).\n"
        f'key = os.environ.get("{KEY_ENV}") or Path({str(key_file)!r}).read_text().strip()\n'
        f'client = OpenAI(base_url="{base_url}", api_key=key)\n'
        "reply = client.chat.completions.create(\n"
        f"    model={model!r},\n"
        '    messages=[{"role": "user", "content": "Hello! What can you do?"}],\n'
        "    max_tokens=128,\n"
        ")\n"
        "print(reply.choices[0].message.content)\n"
    )


def deploy(model: str | Path, workspace: str | Path, *, adapter: str | Path | None = None, port: int | None = None,
           device: str = "cpu", engine: str = "auto", timeout: float = 300.0) -> dict[str, Any]:
    """Serve ``model`` (+ ``adapter``), health-check, smoke-test; write and return endpoint.json."""
    # ensure() gives the real, absolute path: the server runs in the workspace's logs/ folder, where a
    # relative merged-model path (`--workspace ws`) named nothing (transformers took it for a hub id).
    ws = Workspace(Path(workspace)).ensure()
    if not (Path(model) / "config.json").is_file():
        raise UserError("not a model folder (no config.json)", path=model)
    if engine not in ("auto", "transformers", "vllm"):
        raise UserError(f"unknown engine {engine!r} (auto, transformers or vllm)")
    use_vllm = _use_vllm(engine)
    stop_deployment(ws.root)  # one deployment per workspace: a new one replaces the old
    base = str(Path(model).resolve())
    adapter_path = str(Path(adapter).resolve()) if adapter is not None else None
    key_file = ws.deploy_dir / KEY_FILE
    if use_vllm:  # the adapter as a LoRA module; the server recorded under the adapter's folder
        launch = launch_for("vllm", base, adapters={LORA_NAME: adapter_path} if adapter_path else None)
        launch = dataclasses.replace(launch, served_model=LORA_NAME if adapter_path else base)
        folder = adapter_path or base
    else:
        folder = str(merge_adapter(base, adapter_path, ws.deploy_dir / "model")) if adapter_path else base
        launch = launch_for("transformers", folder, device)
    port = _starting(ws, folder, port)  # recorded first: a deploy killed now leaves a server --stop finds
    handle = serve_local(folder, ws.logs_dir, device=device, port=port, timeout=timeout, detach=True,
                         launch=launch, key_file=key_file)
    try:
        smoke = _smoke(handle)
    except (ChatError, UserError) as err:
        tail = handle.tail()
        handle.stop()
        raise ServerError(f"deployed server failed its smoke request: {err}; last log lines "
                          f"({handle.log_path}):\n{tail}") from None
    info = {"base_url": handle.base_url, "model": handle.model, "pid": handle.pid, "port": handle.port,
            "started_at": handle.started_at, "engine": "vllm" if use_vllm else "transformers",
            "base_model": base, "adapter": adapter_path, "served_folder": handle.model_dir,
            "log": str(handle.log_path), "smoke": smoke, "snippet": str(ws.deploy_dir / "client_snippet.py"),
            "api_key_file": str(key_file), "api_key_env": KEY_ENV,
            "deployed_at": datetime.now(UTC).isoformat(timespec="seconds")}
    ws.deploy_dir.mkdir(parents=True, exist_ok=True)
    (ws.deploy_dir / "client_snippet.py").write_text(snippet(handle.base_url, handle.model, key_file))
    write_json_atomic(ws.endpoint, info)
    (ws.deploy_dir / STARTING).unlink(missing_ok=True)
    return info


# The server a deploy is starting, recorded before it is launched: a deploy killed (kill -9) before
# endpoint.json exists leaves a detached server that `deploy --stop` and the next deploy find here.
STARTING = "starting.json"


def _starting(ws: Workspace, folder: str, port: int | None) -> int:
    """Choose the server's port now and record (folder, port) in deploy/starting.json."""
    port = port or free_port()
    write_json_atomic(ws.deploy_dir / STARTING, {"served_folder": folder, "port": port,
                                                 "started_at": datetime.now(UTC).isoformat(timespec="seconds")})
    return port


def _stop_starting(ws: Workspace) -> int | None:
    """Stop the server a killed deploy was starting (matched by its folder and port on its command
    line, so nothing else is signalled); returns its pid, or None when none runs."""
    path = ws.deploy_dir / STARTING
    try:
        record = read_json(path)
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        return None
    found = None
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if str(record.get("port")) in cmd and stop_server(record["served_folder"], pid=proc.info["pid"]):
            found = proc.info["pid"]
    path.unlink(missing_ok=True)
    return found


def stop_deployment(workspace: str | Path) -> dict[str, Any]:
    """Stop the workspace's deployed server (if any) and mark endpoint.json stopped; also the server
    a killed deploy was starting (deploy/starting.json)."""
    ws = Workspace(Path(workspace))
    leftover = _stop_starting(ws)
    result = _stop_endpoint(ws.endpoint)
    if leftover is not None and not result["stopped"]:
        return {"stopped": True, "pid": leftover, "base_url": None}
    return result


def _stop_endpoint(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"stopped": False, "reason": "no deployment in this workspace"}
    info = read_json(path)
    if info.get("stopped_at"):
        return {"stopped": False, "reason": "already stopped", "pid": info.get("pid")}
    stopped = stop_server(info["served_folder"], pid=info.get("pid"))
    if not stopped:  # the pid is gone or now belongs to another program: touch nothing
        return {"stopped": False, "pid": info.get("pid"), "base_url": info.get("base_url"),
                "reason": f"pid {info.get('pid')} is not the server deployed from this workspace "
                          "(it exited); nothing was signalled"}
    (path.parent / KEY_FILE).unlink(missing_ok=True)  # a stopped server's key opens nothing
    info["stopped_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    write_json_atomic(path, info)
    return {"stopped": stopped, "pid": info.get("pid"), "base_url": info.get("base_url")}


def deploy_phase(spec: RunSpec, ws: Workspace, chosen: str, jobs: dict[str, dict]) -> dict:
    """Phase 6 of the flow: serve `chosen` ("base" or a job id) from the run's workspace."""
    if chosen == "base":
        base, adapter = next(iter(jobs.values()))["base_model"], None
    elif spec.full:  # a full model folder stands alone
        base, adapter = trained_weights(ws, chosen), None
    else:
        base, adapter = jobs[chosen]["base_model"], trained_weights(ws, chosen)
    return deploy(base, ws.root, adapter=adapter, port=spec.deploy_port, device=device_name())
