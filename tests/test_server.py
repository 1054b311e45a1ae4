"""The local model server manager: real servers (preftune's batching server for a run, transformers
serve for a deployment), plus a tiny stand-in for lifecycle checks.

The stand-in (a 10-line HTTP server answering /health) is started through the same ``serve_local``
code path via ``command=``, so the start/stop/reuse/signal logic is exercised without paying a
model load each time; one real run server (module-scoped) and one deployment cover the real ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest

from preftune.backends import BATCHED_CONCURRENCY, SERIAL_CONCURRENCY
from preftune.client import ChatClient
from preftune.endpoint import Endpoint
from preftune.errors import UserError
from preftune.keys import read_key_file
from preftune.server import (
    ServerError,
    healthy,
    registry_path,
    resolve_endpoint,
    serve_local,
    serve_many,
    stop_server,
)

FAKE_SERVER = textwrap.dedent("""
    import http.server, subprocess, sys
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a grandchild in the group
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}')
        def log_message(self, *args):
            print("fake:", *args, flush=True)
    print("fake server up", flush=True)
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")
FAKE = [sys.executable, "-c", FAKE_SERVER, "{port}"]


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """A registry of this module's own (children inherit it through the environment)."""
    cache = tmp_path_factory.mktemp("server-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFTUNE_CACHE", str(cache))
        yield cache


def group_members(pgid: int) -> list[int]:
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def run_child(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)


# -- the real servers -----------------------------------------------------------------
@pytest.fixture(scope="module")
def real_server(zoo, tmp_path_factory, private_cache):
    handle = serve_local(zoo["models"]["tiny-llama"], tmp_path_factory.mktemp("logs"))
    with handle:
        yield handle, private_cache
    assert not handle.alive()


def test_real_server_health_chat_and_log(real_server, zoo):
    handle, _ = real_server
    assert httpx.get(f"http://127.0.0.1:{handle.port}/health").json()["status"] == "ok"
    assert handle.model == str(Path(zoo["models"]["tiny-llama"]).resolve())
    result = ChatClient(handle.endpoint()).chat_sync([{"role": "user", "content": "Tell me about the sea."}],
                                                     max_tokens=6)
    assert result.finish_reason in ("stop", "length")
    assert result.prompt_tokens > 0 and 0 < result.completion_tokens <= 6
    assert result.finish_reason == "stop" or result.completion_tokens == 6
    log = handle.log_path.read_text()
    assert log.splitlines()[0].startswith("$ ") and "--device cpu" in log.splitlines()[0]
    assert "POST /v1/chat/completions" in log


def test_real_server_is_reused_in_process_not_by_another_process(real_server, zoo):
    handle, cache = real_server
    again = serve_local(zoo["models"]["tiny-llama"], handle.log_path.parent)
    assert again is handle and handle.users == 2
    again.release()
    assert handle.alive() and handle.users == 1
    reg = json.loads((cache / "servers" / "registry.json").read_text())
    entry = reg[handle.model_dir]
    assert (entry["pid"], entry["port"], entry["owner"]) == (handle.pid, handle.port, os.getpid())
    # A run's own server is preftune's batching one (tests/test_batching.py), sent what it batches.
    assert "-m preftune.batchserve" in handle.log_path.read_text().splitlines()[0]
    ep = handle.endpoint()
    assert (ep.server_pid, ep.concurrency) == (handle.pid, BATCHED_CONCURRENCY)

    child = run_child("""
        import sys
        from preftune.server import serve_local
        h = serve_local(sys.argv[1], sys.argv[2])
        print(h.pid, h.port, h.owned, flush=True)
    """, zoo["models"]["tiny-llama"], str(handle.log_path.parent))
    out, _ = child.communicate(timeout=180)
    pid, port, owned = out.split()
    assert int(pid) != handle.pid and int(port) != handle.port and owned == "True"  # its own server
    assert group_members(int(pid)) == [] and not healthy(int(port))  # stopped when that process ended
    assert handle.alive() and healthy(handle.port)  # ours was never touched
    assert json.loads((cache / "servers" / "registry.json").read_text())[handle.model_dir]["pid"] == handle.pid


RUN_B = """
    import sys
    from preftune.client import ChatClient
    from preftune.server import resolve_endpoint
    ep = resolve_endpoint(sys.argv[1], log_dir=sys.argv[2])
    client = ChatClient(ep, timeout=120)
    ask = lambda: client.chat_sync([{"role": "user", "content": "Tell me about the sea."}], max_tokens=4).text
    print(ep.server_pid, ep.base_url, flush=True)
    ask()
    print("asked", flush=True)
    sys.stdin.readline()  # the test stops A meanwhile
    print(repr(ask()), flush=True)
"""


def test_a_deployment_is_transformers_serve_one_request_at_a_time(zoo, tmp_path):
    """A detached server (``preftune deploy``) is ``transformers serve``, whose API is the broader
    one (streaming). A tiny model there is served one request at a time, and its idle OpenMP
    threads wait passively instead of spinning on the cores (server.py). It is guarded
    (preftune/hfserve.py): a bearer key on every route but /health, passed in its environment (not its
    world-readable command line), and no /load_model or /reset (another local user loaded a folder
    of their own into it, before)."""
    handle = serve_local(zoo["models"]["tiny-qwen"], tmp_path / "logs", detach=True)  # (not the run's model above)
    try:
        assert "-m preftune.hfserve" in handle.log_path.read_text().splitlines()[0]
        key = read_key_file(handle.key_file)
        assert key not in Path(f"/proc/{handle.pid}/cmdline").read_text() and key not in handle.log_path.read_text()
        url = f"http://127.0.0.1:{handle.port}"
        body = {"model": handle.model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 401
        assert httpx.post(f"{url}/load_model", json={"model": str(tmp_path)}, timeout=30).status_code == 401
        with_key = {"Authorization": f"Bearer {key}"}
        for route in ("/load_model", "/reset"):
            assert httpx.post(f"{url}{route}", json={"model": str(tmp_path)}, headers=with_key,
                              timeout=30).status_code == 404, route
        ep = handle.endpoint()
        assert (ep.server_pid, ep.concurrency) == (handle.pid, SERIAL_CONCURRENCY)
        environ = dict(v.split("=", 1) for v in Path(f"/proc/{handle.pid}/environ").read_text().split("\0")
                       if "=" in v)
        assert environ.get("OMP_WAIT_POLICY") == "PASSIVE"
        reply = ChatClient(ep).chat_sync([{"role": "user", "content": "Hello"}], max_tokens=4)
        assert 0 < reply.completion_tokens <= 4
    finally:
        assert stop_server(handle.model_dir, pid=handle.pid)
    assert not handle.alive()


def test_a_run_keeps_its_server_when_another_process_using_the_folder_exits(zoo, tmp_path):
    """Process A serves a zoo folder and holds it; process B (a run) uses the same folder. A exits
    (its server dies with it): B's requests still succeed, and when B ends no server of either
    remains."""
    folder = zoo["models"]["tiny-llama"]
    a = start_in_child_real(folder, tmp_path / "logs-a")
    a_pid, a_port = map(int, a.stdout.readline().split())
    b = run_child(RUN_B, folder, str(tmp_path / "logs-b"))
    b_pid, b_url = b.stdout.readline().split()
    assert int(b_pid) != a_pid and f":{a_port}/" not in b_url
    assert b.stdout.readline().strip() == "asked"
    a.stdin.write("go\n")
    a.stdin.flush()
    assert a.wait(timeout=60) == 0
    assert group_members(a_pid) == [] and not healthy(a_port)  # A's server went with A
    out, _ = b.communicate("go\n", timeout=180)
    assert b.returncode == 0 and out.strip().startswith("'")  # B's request after A left succeeded
    assert group_members(int(b_pid)) == []
    assert not _serve_processes(folder, {a_pid, int(b_pid)})


def start_in_child_real(folder: str, log_dir: Path) -> subprocess.Popen:
    return run_child("""
        import sys
        from preftune.server import serve_local
        h = serve_local(sys.argv[1], sys.argv[2])
        print(h.pid, h.port, flush=True)
        sys.stdin.readline()
    """, folder, str(log_dir))


def _serve_processes(folder: str, pids: set[int]) -> list[int]:
    """Those of ``pids`` still running a server for ``folder``."""
    alive = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE and "serve" in proc.cmdline():
                alive.append(pid)
        except psutil.Error:
            continue
    return alive


def test_real_resolve_endpoint_serves_a_folder_and_passes_urls_through(real_server, zoo, tmp_path):
    handle, _ = real_server
    ep = resolve_endpoint(zoo["models"]["tiny-llama"], log_dir=tmp_path)
    assert (ep.base_url, ep.model) == (handle.base_url, handle.model) and ep.cache_id.startswith("local:")
    assert ep.cost(1000, 1000) == 0.0  # served by preftune: free, not "unpriced"
    handle.release()  # resolve_endpoint without a stack took one more use
    remote = Endpoint.parse("gpt-x@https://api.example.com/v1", api_key_block="ex-key")
    assert resolve_endpoint(remote, log_dir=tmp_path) == remote
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_endpoint(str(tmp_path / "empty"), log_dir=tmp_path)
    with pytest.raises(UserError, match="MODEL@BASE_URL"):
        resolve_endpoint("just-a-name", log_dir=tmp_path)


# -- lifecycle, with the stand-in -----------------------------------------------------------------
def test_stop_kills_the_whole_group_and_clears_the_registry(tmp_path):
    handle = serve_local(tmp_path / "m", tmp_path / "logs", command=FAKE, timeout=30)
    time.sleep(0.3)
    members = group_members(handle.pid)
    assert len(members) == 2  # the server and its grandchild
    assert json.loads(registry_path().read_text())[str((tmp_path / "m").resolve())]["pid"] == handle.pid
    with handle:
        pass
    assert group_members(handle.pid) == []
    assert not healthy(handle.port)
    assert str((tmp_path / "m").resolve()) not in json.loads(registry_path().read_text())


def test_dead_on_start_reports_log_lines_and_leaves_nothing(tmp_path):
    """(A real model that fails to load is covered by test_deploy's broken-weights case.)"""
    crash = [sys.executable, "-c", "import sys; print('loading weights'); print('OSError: bad weights', flush=True); "
             "sys.exit(3)"]
    with pytest.raises(ServerError) as info:
        serve_local(tmp_path / "m", tmp_path / "logs", command=crash, timeout=60)
    msg = str(info.value)
    assert "exited with code 3 before it was healthy" in msg
    assert msg.endswith("loading weights\nOSError: bad weights")  # the log's last lines close the report
    assert not registry_path().exists() or str((tmp_path / "m").resolve()) not in json.loads(
        registry_path().read_text())


def test_never_healthy_times_out_and_is_killed(tmp_path):
    stall = [sys.executable, "-c", "import time; print('loading forever', flush=True); time.sleep(600)"]
    with pytest.raises(ServerError, match=r"not healthy after 2s[\s\S]*loading forever"):
        serve_local(tmp_path / "m", tmp_path / "logs", command=stall, timeout=2)
    log = next((tmp_path / "logs").glob("server-m-*.log"))
    assert not [p for p in psutil.process_iter(["cmdline"]) if "loading forever" in " ".join(p.info["cmdline"] or [])]
    assert "loading forever" in log.read_text()


CHILD_START = """
    import sys, time
    from preftune.server import serve_local
    h = serve_local(sys.argv[1], sys.argv[2], command={fake!r}, timeout=30, detach={detach})
    print(h.pid, h.port, flush=True)
    sys.stdin.readline()  # the test says when to go on
    {then}
"""


def start_in_child(tmp_path: Path, then: str, detach: bool = False) -> tuple[subprocess.Popen, int, int]:
    code = textwrap.dedent(CHILD_START).format(fake=FAKE, detach=detach, then=then)
    child = run_child(code, str(tmp_path / "m"), str(tmp_path / "logs"))
    pid, port = map(int, child.stdout.readline().split())
    assert healthy(port)
    child.stdin.write("go\n")
    child.stdin.flush()
    return child, pid, port


@pytest.mark.parametrize("how", ["exit", "exception", "sigterm"])
def test_owner_exit_error_or_sigterm_stops_the_server(tmp_path, how):
    then = {"exit": "pass", "exception": "raise RuntimeError('flow failed')", "sigterm": "time.sleep(60)"}[how]
    child, pid, port = start_in_child(tmp_path, then)
    if how == "sigterm":  # what a cancelled flow run's process receives
        child.send_signal(signal.SIGTERM)
    code = child.wait(timeout=30)
    assert code == {"exit": 0, "exception": 1, "sigterm": -signal.SIGTERM}[how]
    assert group_members(pid) == [] and not healthy(port)


def test_detached_server_outlives_its_starter_until_stopped(tmp_path):
    child, pid, port = start_in_child(tmp_path, "pass", detach=True)
    assert child.wait(timeout=30) == 0
    assert healthy(port) and group_members(pid)
    handle = serve_local(tmp_path / "m", tmp_path / "logs", command=FAKE, detach=True)  # a re-deploy reuses it
    assert (handle.pid, handle.owned) == (pid, False)
    handle.release()
    assert healthy(port)
    with serve_local(tmp_path / "m", tmp_path / "logs", command=FAKE) as run_own:  # a run gets its own
        assert run_own.pid != pid and run_own.owned
    assert healthy(port)
    assert stop_server(tmp_path / "m") is True
    assert group_members(pid) == [] and not healthy(port)
    assert stop_server(tmp_path / "m") is False


def test_server_of_a_killed_owner_dies_with_it_and_is_not_reused(tmp_path):
    child, pid, port = start_in_child(tmp_path, "time.sleep(60)")
    child.kill()  # SIGKILL: no handler runs; the kernel's parent-death signal takes the server down
    child.wait(timeout=10)
    deadline = time.monotonic() + 5
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the server outlived its killed owner"
        time.sleep(0.1)
    assert not healthy(port)
    for member in group_members(pid):  # the stand-in's own grandchild (not a child of preftune)
        os.kill(member, signal.SIGKILL)
    with serve_local(tmp_path / "m", tmp_path / "logs", command=FAKE) as handle:  # the stale entry is dropped
        assert handle.pid != pid and handle.owned


def test_serve_many_loads_side_by_side_and_counts_each_use(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    handles = serve_many([a, b, a], tmp_path / "logs", command=FAKE, timeout=30)
    assert handles[0] is handles[2] and handles[0].pid != handles[1].pid
    assert (handles[0].users, handles[1].users) == (2, 1)
    assert all(healthy(h.port) for h in handles)
    for h in handles:
        h.release()
    assert group_members(handles[0].pid) == [] and group_members(handles[1].pid) == []
    assert not healthy(handles[0].port) and not healthy(handles[1].port)


def test_served_model_gets_no_api_keys(tmp_path, monkeypatch):
    from preftune.server import note_secret_env

    monkeypatch.setenv("MY_JUDGE_KEY", "k1")
    monkeypatch.setenv("OPENAI_API_KEY", "k2")
    monkeypatch.setenv("HF_TOKEN", "k3")
    monkeypatch.setenv("SOME_SECRET", "k4")
    monkeypatch.setenv("PREFTUNE_VISIBLE", "yes")
    note_secret_env("MY_JUDGE_KEY")
    dump = tmp_path / "env.json"
    command = [sys.executable, "-c", f"import json, os; json.dump(dict(os.environ), open({str(dump)!r}, 'w'))"]
    with pytest.raises(ServerError):  # the stand-in exits at once; its environment is what we check
        serve_local(tmp_path / "m", tmp_path / "logs", command=command, timeout=10)
    env = json.loads(dump.read_text())
    assert env["PREFTUNE_VISIBLE"] == "yes"
    assert not {"MY_JUDGE_KEY", "OPENAI_API_KEY", "HF_TOKEN", "SOME_SECRET"} & env.keys()


def test_batching_server_gets_a_kv_cache_sized_for_its_requests(tmp_path):
    """Left to its default, transformers serve sized its paged KV cache from the machine's memory
    (14.3 GB resident for SmolLM2-135M on CPU). The fraction is BATCHED_CONCURRENCY requests of
    CB_CONTEXT_TOKENS, fp32 keys and values of every layer, +25 %: 4 layers x 2 KV heads x 128
    dims → 2 x 4 x 2 x 128 x 4 bytes = 8,192 bytes a token; x 32 x 1024 x 1.25 = 335,544,320 bytes."""
    from transformers import LlamaConfig

    from preftune.backends import (
        BATCHED_CONCURRENCY,
        CB_CONTEXT_TOKENS,
        kv_cache_fraction,
        transformers_command,
    )

    assert (BATCHED_CONCURRENCY, CB_CONTEXT_TOKENS) == (32, 1024)
    LlamaConfig(vocab_size=64, hidden_size=512, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path / "m")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    expected = round(min(0.5, max(0.02, 335_544_320 / total)), 4)
    assert kv_cache_fraction(str(tmp_path / "m")) == expected
    cmd = transformers_command(str(tmp_path / "m"), batching=True)
    assert cmd[cmd.index("--cb-max-memory-percent") + 1] == str(expected)
    assert "--cb-max-memory-percent" not in transformers_command(str(tmp_path / "m"), batching=False)
