"""Phase 6: merge a real LoRA adapter, serve it with transformers serve, call it, stop it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from preftune.cli import main
from preftune.cli.deploy import default_workspace
from preftune.server import healthy
from preftune.tasks.deploy import merge_adapter

PROMPT = "Tell me about the sea."


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFTUNE_CACHE", str(tmp_path_factory.mktemp("deploy-cache")))
        yield


@pytest.fixture(scope="module")
def adapter(zoo, tmp_path_factory) -> Path:
    """A random (non-zero) LoRA adapter on tiny-llama, saved the way training saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(zoo["models"]["tiny-llama"])
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    out = tmp_path_factory.mktemp("run") / "jobs" / "job-1" / "adapter"
    model.save_pretrained(out)
    return out


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def test_merge_equals_base_plus_adapter(zoo, adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = zoo["models"]["tiny-llama"]
    merged_dir = merge_adapter(base_dir, adapter, tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(merged_dir)
    assert tok.chat_template  # the tokenizer (with its chat template) travels with the merged model
    merged = _logits(AutoModelForCausalLM.from_pretrained(merged_dir), tok)
    with_adapter = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter), tok)
    base = _logits(AutoModelForCausalLM.from_pretrained(base_dir), tok)
    torch.testing.assert_close(merged, with_adapter, rtol=1e-4, atol=1e-5)
    assert (merged - base).abs().max().item() > 1e-3  # the adapter really changed the model
    stamp = (merged_dir / "model.safetensors").stat().st_mtime_ns
    assert merge_adapter(base_dir, adapter, tmp_path / "merged") == merged_dir  # unchanged inputs: reused
    assert (merged_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_default_workspace_is_the_adapters_run(adapter):
    assert default_workspace(str(adapter)) == adapter.parent.parent.parent
    assert default_workspace(None) == Path.cwd() / "workspaces" / "deploy"


def _servers_for(path: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if path in " ".join(p.info["cmdline"] or [])
            and "serve" in (p.info["cmdline"] or [])]


def test_deploy_answers_through_openai_and_stop_leaves_nothing(zoo, adapter, tmp_path, capsys):
    import openai

    ws = tmp_path / "ws"
    code = main(["deploy", "--model", zoo["models"]["tiny-llama"], "--adapter", str(adapter), "--workspace",
                 str(ws), "--json"])
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert json.loads((ws / "deploy" / "endpoint.json").read_text()) == info
    assert info["engine"] == "transformers" and info["model"] == str((ws / "deploy" / "model").resolve())
    assert info["base_url"] == f"http://127.0.0.1:{info['port']}/v1"
    assert info["smoke"]["completion_tokens"] > 0 and info["smoke"]["finish_reason"] in ("stop", "length")
    assert psutil.pid_exists(info["pid"]) and healthy(info["port"])

    # A key made for this server: 0600 in deploy/, nowhere in what is printed, written or logged.
    key_file = Path(info["api_key_file"])
    assert key_file == ws / "deploy" / "api_key" and oct(key_file.stat().st_mode & 0o777) == "0o600"
    key = key_file.read_text()
    assert len(key) >= 32
    for path in (ws / "deploy" / "endpoint.json", Path(info["snippet"]), Path(info["log"])):
        assert key not in path.read_text(), path
    with pytest.raises(openai.AuthenticationError):  # another local user, without the key
        openai.OpenAI(base_url=info["base_url"], api_key="guess", max_retries=0).chat.completions.create(
            model=info["model"], messages=[{"role": "user", "content": PROMPT}], max_tokens=5)
    reply = openai.OpenAI(base_url=info["base_url"], api_key=key).chat.completions.create(
        model=info["model"], messages=[{"role": "user", "content": PROMPT}], max_tokens=5)
    assert isinstance(reply.choices[0].message.content, str)
    assert 0 < reply.usage.completion_tokens <= 5
    snippet = subprocess.run([sys.executable, info["snippet"]], capture_output=True, text=True, timeout=120)
    assert snippet.returncode == 0, snippet.stderr

    assert main(["deploy", "--stop", "--workspace", str(ws)]) == 0
    assert f"stopped server pid {info['pid']}" in capsys.readouterr().out
    assert not psutil.pid_exists(info["pid"]) or psutil.Process(info["pid"]).status() == psutil.STATUS_ZOMBIE
    assert not healthy(info["port"]) and _servers_for(info["model"]) == []
    assert json.loads((ws / "deploy" / "endpoint.json").read_text())["stopped_at"]
    assert not key_file.exists()
    assert main(["deploy", "--stop", "--workspace", str(ws)]) == 0
    assert "nothing to stop" in capsys.readouterr().out


def test_failing_health_check_reports_log_lines_and_leaves_nothing(zoo, tmp_path, capsys):
    broken = tmp_path / "broken-model"
    shutil.copytree(zoo["models"]["tiny-llama"], broken)
    (broken / "model.safetensors").write_bytes(b"this is not a safetensors file")
    code = main(["deploy", "--model", str(broken), "--workspace", str(tmp_path / "ws"), "--timeout", "240"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("preftune deploy: error: model server for")
    assert "exited with code" in err and "last log lines" in err
    assert "nothing was left running" in err
    log = next((tmp_path / "ws" / "logs").glob("server-broken-model-*.log")).read_text()
    assert log.strip().splitlines()[-1] in err  # the server's own last words are in the report
    assert _servers_for(str(broken.resolve())) == []
    assert not (tmp_path / "ws" / "deploy" / "endpoint.json").exists()


PREFTUNE = [sys.executable, "-m", "preftune.cli"]


def test_deploy_to_a_busy_port_is_one_line_exit_2(zoo, tmp_path):
    import socket

    with socket.socket() as foreign:  # a real listener that is not ours
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        port = foreign.getsockname()[1]
        res = subprocess.run(PREFTUNE + ["deploy", "--model", zoo["models"]["tiny-llama"], "--port", str(port),
                                         "--workspace", str(tmp_path / "ws")],
                             capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr == f"preftune deploy: error: port {port} is in use by another process\n"
    assert not (tmp_path / "ws" / "deploy" / "endpoint.json").exists()


def test_stop_leaves_alone_a_process_that_took_the_recorded_pid(zoo, tmp_path):
    other = subprocess.Popen(["sleep", "60"])
    try:
        endpoint = tmp_path / "ws" / "deploy" / "endpoint.json"
        endpoint.parent.mkdir(parents=True)
        endpoint.write_text(json.dumps({"pid": other.pid, "port": 9, "base_url": "http://127.0.0.1:9/v1",
                                        "served_folder": zoo["models"]["tiny-llama"]}))
        res = subprocess.run(PREFTUNE + ["deploy", "--stop", "--workspace", str(tmp_path / "ws")],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "nothing was signalled" in res.stdout
        assert other.poll() is None and psutil.Process(other.pid).status() != psutil.STATUS_ZOMBIE
    finally:
        other.kill()
        other.wait()
