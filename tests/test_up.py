"""`preftune up`: a real Prefect server started (or found), the deployments served, and Ctrl-C
stopping exactly what the command started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import psutil

from tests.test_signals import PREFTUNE, all_gone, wait_for

DEPLOYMENTS = {("preference-learning", "preftune"), ("train-job", "preftune-train-job")}


def _deployments(api: str, auth: tuple[str, str] | None = None) -> set[tuple[str, str]]:
    flows = {f["id"]: f["name"] for f in httpx.post(f"{api}/flows/filter", json={}, auth=auth, timeout=60).json()}
    rows = httpx.post(f"{api}/deployments/filter", json={}, auth=auth, timeout=60).json()
    return {(flows.get(d["flow_id"]), d["name"]) for d in rows}


def _up(tmp_path, api: str, *extra: str) -> tuple[subprocess.Popen, object]:
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = tmp_path / "up.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(PREFTUNE + ["up", "--home", str(tmp_path / "home"), *extra], stdout=out,
                                stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True)
    return proc, log


def _stop_with_sigint(proc: subprocess.Popen) -> tuple[list[psutil.Process], list[list[str]]]:
    """SIGINT to the command alone (what Ctrl-C sends it); its descendants and their command lines."""
    children = psutil.Process(proc.pid).children(recursive=True)
    cmdlines = [c.cmdline() for c in children]
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    return children, cmdlines


def test_up_starts_a_server_serves_and_ctrl_c_stops_everything(tmp_path):
    """--port N puts the server on N (PREFECT_API_URL names another port: --port wins), and Ctrl-C says
    what `up` stopped, not a run's "re-run to resume"."""
    from preftune.server import free_port

    port, other = free_port(), free_port()
    api = f"http://127.0.0.1:{port}/api"
    proc, log = _up(tmp_path, f"http://127.0.0.1:{other}/api", "--port", str(port))
    try:
        wait_for(lambda: "being served" in log.read_text(), 900, f"the deployments to be served ({log})")
        text = log.read_text()
        assert f"starting a Prefect server at {api}" in text
        assert f"Prefect UI: {api.removesuffix('/api')}" in text
        assert httpx.get(f"{api}/health", timeout=60).json() is True
        # the UI in the browser talks to this server, not to the default port, and asks for a login
        settings = httpx.get(f"{api.removesuffix('/api')}/ui-settings", timeout=60).json()
        assert settings["api_url"] == api and settings["auth"] == "BASIC"
        auth_file = tmp_path / "home" / "api-auth"
        assert f"enter the whole line stored in {auth_file}" in text
        user, _, password = auth_file.read_text().strip().partition(":")
        assert password not in text  # where the secret is, never the secret
        assert (auth_file.stat().st_mode & 0o777, (tmp_path / "home").stat().st_mode & 0o777) == (0o600, 0o700)
        assert DEPLOYMENTS <= _deployments(api, (user, password))
        assert (tmp_path / "home" / "prefect.db").exists()  # SQLite in --home
        children, cmdlines = _stop_with_sigint(proc)
        assert any(c[1:5] == ["-m", "prefect", "server", "start"] for c in cmdlines), cmdlines
        assert any("preftune.cli.serve" in c for c in cmdlines), cmdlines
        assert all_gone(children, 10.0), [c for c in children if c.is_running()]
        assert proc.returncode == 128 + signal.SIGINT
        said = log.read_text()
        assert "preftune up: stopped the serve loop and the Prefect server it started" in said
        assert "re-run to resume" not in said
        try:
            httpx.get(f"{api}/health", timeout=2)
            raise AssertionError("the server still answers after Ctrl-C")
        except httpx.HTTPError:
            pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_up_server_refuses_strangers_and_preftune_commands_log_in(tmp_path):
    """#21: a second local user approved the owner's paused plan through the unauthenticated API.
    Now a request without the auth string gets 401, and `preftune approve` (given only
    PREFECT_API_URL) reads the stored string and answers a really paused flow run."""
    from preftune.server import free_port

    api = f"http://127.0.0.1:{free_port()}/api"
    proc, log = _up(tmp_path, api)
    paused = None
    try:
        wait_for(lambda: "being served" in log.read_text(), 900, f"the deployments to be served ({log})")
        auth = (tmp_path / "home" / "api-auth").read_text().strip()
        for creds in (None, ("preftune", "guess"), ("admin", "pass")):
            assert httpx.post(f"{api}/flow_runs/filter", json={}, auth=creds, timeout=60).status_code == 401
        # A flow run that pauses for an answer, as a run's plan does (its client holds the string).
        env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": auth}
        paused = subprocess.Popen([sys.executable, "-c", PAUSING_FLOW], stdout=subprocess.PIPE, text=True,
                                  env=env, cwd=tmp_path)
        run_id = paused.stdout.readline().strip()
        user, _, password = auth.partition(":")

        def is_paused() -> bool:
            state = httpx.get(f"{api}/flow_runs/{run_id}", auth=(user, password), timeout=60).json()["state"]
            return state["type"] == "PAUSED" and bool(state["state_details"].get("run_input_keyset"))

        wait_for(is_paused, 300, "the flow run to pause")
        stranger = {k: v for k, v in env.items() if k != "PREFECT_API_AUTH_STRING"}
        for command in (["approve", run_id], ["serve"], ["up", "--home", str(tmp_path / "other")]):
            wrong = subprocess.run(PREFTUNE + command, env={**stranger, "PREFECT_API_AUTH_STRING": "x:y"},
                                   capture_output=True, text=True, timeout=300, cwd=tmp_path)
            assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1, (command, wrong.stderr)
            assert "refused the credentials ($PREFECT_API_AUTH_STRING)" in wrong.stderr and "x:y" not in wrong.stderr
        ok = subprocess.run(PREFTUNE + ["approve", run_id], env=stranger, capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
        assert ok.returncode == 0, ok.stderr
        assert paused.communicate(timeout=300)[0].strip() == "answered approve"
    finally:
        if paused is not None and paused.poll() is None:
            paused.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_runs_temporary_server_refuses_strangers_and_the_owner_answers_it(tmp_path, zoo, public_datasets):
    """#21: `preftune run` without PREFECT_API_URL reports to a temporary Prefect server, which answered
    anyone on the machine. Now it asks for this run's own auth string (stored 0600), the run's run.json
    names the server, and the owner's `preftune approve WORKSPACE` finds both and answers."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFTUNE_CACHE": str(tmp_path / "cache")}
    ws = tmp_path / "ws"
    argv = PREFTUNE + ["run", "--dataset", str(public_datasets / "public_pairs.jsonl"), "--workspace", str(ws),
                       "--base-model", zoo["models"]["tiny-llama"], "--evaluator", "preftune.judges.builtin:answer_quality"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
                            start_new_session=True)
    try:
        record = wait_for(lambda: (ws / "run.json").is_file() and json.loads((ws / "run.json").read_text()), 300,
                          "the run's run.json")
        api, run_id = record["api_url"], record["flow_run_id"]
        assert api.startswith("http://127.0.0.1:") and api.endswith("/api")
        (auth_file,) = (tmp_path / "cache" / "temporary-servers").glob("*.auth")
        assert auth_file.stat().st_mode & 0o777 == 0o600
        user, _, password = auth_file.read_text().strip().partition(":")

        def state() -> dict:
            return httpx.get(f"{api}/flow_runs/{run_id}", auth=(user, password), timeout=60).json()["state"]

        wait_for(lambda: state()["type"] == "PAUSED", 300, "the plan question")
        for creds in (None, ("preftune", "guess")):
            assert httpx.post(f"{api}/flow_runs/filter", json={}, auth=creds, timeout=60).status_code == 401
        ok = subprocess.run(PREFTUNE + ["approve", str(ws), "--reject"], env=env, capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
        assert ok.returncode == 0 and '"decision": "reject"' in ok.stdout, ok.stderr
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 3 and out.startswith("run rejected"), (out, err)
        assert password not in out + err + ok.stdout + ok.stderr
        assert not auth_file.exists()  # the string went with its server (31 of them had piled up)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


PAUSING_FLOW = """
from typing import Literal
from prefect import flow
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run

class Answer(RunInput):
    decision: Literal["approve", "reject"]

@flow
def waits():
    print(flow_run.id, flush=True)
    answer = pause_flow_run(wait_for_input=Answer, timeout=600, poll_interval=1)
    print("answered", answer.decision, flush=True)

waits()
"""


def test_up_leaves_a_server_it_found_running(tmp_path, prefect_api):
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    proc, log = _up(tmp_path, api)
    try:
        wait_for(lambda: "being served" in log.read_text(), 900, f"the deployments to be served ({log})")
        assert f"using the Prefect server already running at {api}" in log.read_text()
        assert not (tmp_path / "home").exists()  # nothing started, nothing written
        assert DEPLOYMENTS <= _deployments(api)
        children, cmdlines = _stop_with_sigint(proc)
        assert not any("server" in c for c in cmdlines), cmdlines
        assert children and all_gone(children, 10.0)
        assert httpx.get(f"{api}/health", timeout=60).json() is True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_up_port_out_of_range_is_one_line(tmp_path):
    done = subprocess.run(PREFTUNE + ["up", "--port", "70000", "--home", str(tmp_path / "home")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "preftune up: error: --port 70000: expected a port number from 1 to 65535"
    assert not (tmp_path / "home").exists()
