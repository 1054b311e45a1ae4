"""kill -9 of `preftune deploy` while its detached server starts (issue 21, item 6): the server is on
record in the workspace before it is launched, so `preftune deploy --stop --workspace WS` finds and
stops it, and a re-run replaces it instead of starting a second one. Real CLI, real server, real kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

PREFTUNE = [sys.executable, "-m", "preftune.cli"]


def _servers_for(folder: str) -> list[psutil.Process]:
    """Every live process on this machine serving ``folder`` (detached: not anyone's child any more)."""
    out = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if folder in cmd and "--port" in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(proc)
    return out


def _deploy_killed_while_starting(model: str, ws: Path, env: dict) -> psutil.Process:
    """Start `preftune deploy`, kill -9 it as soon as its server process exists; return the server."""
    proc = subprocess.Popen(PREFTUNE + ["deploy", "--model", model, "--workspace", str(ws)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not _servers_for(model):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (server,) = _servers_for(model)
    return server


@pytest.fixture
def model(zoo, tmp_path) -> str:
    """A folder of its own (a copy of tiny-llama): no other test's server serves it."""
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(Path(zoo["models"]["tiny-llama"]).resolve(), dst)
    return str(dst)


def test_a_server_left_by_a_killed_deploy_is_found_by_stop_and_by_a_rerun(model, tmp_path):
    """Before: the detached server kept running; `deploy --stop` said there was nothing to stop, and a
    re-run started a second server beside it."""
    env = os.environ | {"PREFTUNE_CACHE": str(tmp_path / "cache")}
    ws = tmp_path / "ws"
    try:
        first = _deploy_killed_while_starting(model, ws, env)
        stop = subprocess.run(PREFTUNE + ["deploy", "--stop", "--workspace", str(ws)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr
        assert stop.stdout.startswith(f"stopped server pid {first.pid}")
        assert psutil.wait_procs([first], timeout=15)[1] == [] and _servers_for(model) == []

        second = _deploy_killed_while_starting(model, ws, env)
        rerun = subprocess.run(PREFTUNE + ["deploy", "--model", model, "--workspace", str(ws)], env=env,
                               capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr
        assert psutil.wait_procs([second], timeout=15)[1] == []  # replaced, not doubled
        (serving,) = _servers_for(model)
        assert serving.pid != second.pid and f"pid {serving.pid}" in rerun.stdout
    finally:
        subprocess.run(PREFTUNE + ["deploy", "--stop", "--workspace", str(ws)], env=env, capture_output=True,
                       timeout=120)
        for leftover in _servers_for(model):
            leftover.kill()
    assert _servers_for(model) == []
