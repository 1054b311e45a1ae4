"""SIGTERM stops a preftune command within 10 s with every server it started; after kill -9 of a
command nothing it started keeps running. Real `preftune` children, real servers, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

PREFTUNE = [sys.executable, "-m", "preftune.cli"]


def listening_children(pid: int, needle: str) -> list[psutil.Process]:
    """Descendants of ``pid`` whose command line holds ``needle`` and that listen on a TCP port."""
    out = []
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return out
    for kid in kids:
        try:
            if needle in " ".join(kid.cmdline()) and any(
                    c.status == psutil.CONN_LISTEN for c in kid.net_connections(kind="tcp")):
                out.append(kid)
        except psutil.Error:
            continue
    return out


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def all_gone(procs: list[psutil.Process], timeout: float) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not alive


def start_pairs(tmp_path: Path, zoo: dict) -> subprocess.Popen:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Tell a story {i}"}]}) + "\n"
                               for i in range(200)))
    argv = PREFTUNE + ["pairs", "--prompts", str(prompts), "--strong", zoo["models"]["tiny-llama"],
                       "--weak", zoo["models"]["tiny-qwen"], "--out", str(tmp_path / "out"),
                       "--max-tokens", "64"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path,
                            start_new_session=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_pairs_and_its_servers_within_10s(tmp_path, zoo, sig):
    proc = start_pairs(tmp_path, zoo)
    try:
        servers = wait_for(lambda: len(listening_children(proc.pid, "serve")) == 2
                           and listening_children(proc.pid, "serve"), 120, "both model servers to listen")
        time.sleep(1.0)  # requests in flight
        sent = time.monotonic()
        os.kill(proc.pid, sig)
        proc.wait(timeout=10)
        took = time.monotonic() - sent
        print(f"{sig.name}: exited after {took:.1f} s with {proc.returncode}")
        assert took < 10 and proc.returncode == 128 + sig
        assert all_gone(servers, 3.0), [s.pid for s in servers if s.is_running()]
        assert "Traceback" not in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _kill_9_leaves_nothing(proc: subprocess.Popen, child: str, what: str) -> None:
    """Once `proc` has a listening child whose command line holds `child`, kill -9 `proc`: the
    children must be gone within a few seconds (they die with their parent)."""
    try:
        servers = wait_for(lambda: listening_children(proc.pid, child), 120, what)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
        assert all_gone(servers, 5.0), [s.pid for s in servers if s.is_running()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_9_takes_the_servers_down(tmp_path, zoo):
    _kill_9_leaves_nothing(start_pairs(tmp_path, zoo), "serve", "a model server to listen")


def test_kill_9_of_a_run_takes_its_temporary_prefect_server_down(tmp_path, public_datasets):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    argv = PREFTUNE + ["run", "--dataset", str(public_datasets / "public_pairs.jsonl"),
                       "--workspace", str(tmp_path / "ws")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=env,
                            start_new_session=True)
    _kill_9_leaves_nothing(proc, "uvicorn", "the temporary Prefect server")


def test_serve_stops_on_sigterm_after_its_api_has_gone(tmp_path):
    """`preftune serve` against a real Prefect server; the server dies; SIGTERM still ends the
    command within 10 s, and its serve loop with it (Prefect's own shutdown waits on the API)."""
    from preftune.server import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    api = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--port", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    serve = None
    try:
        import httpx

        wait_for(lambda: _answers(httpx, f"http://127.0.0.1:{port}/api/health"), 180, "the Prefect server")
        log = tmp_path / "serve.log"
        with open(log, "w") as out:
            serve = subprocess.Popen(PREFTUNE + ["serve"], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                     env=env | {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"},
                                     start_new_session=True)
        wait_for(lambda: "being served" in log.read_text(), 180, "the deployments to be served")
        loop = psutil.Process(serve.pid).children(recursive=True)
        os.killpg(api.pid, signal.SIGKILL)
        api.wait(timeout=10)
        start = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)
        assert time.monotonic() - start < 10 and serve.returncode == 128 + signal.SIGTERM
        assert loop and all_gone(loop, 5.0)
    finally:
        for proc in (serve, api):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _answers(httpx, url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
