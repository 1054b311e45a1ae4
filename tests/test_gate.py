"""preftune.gate.VllmGate in front of an app shaped like vLLM's: the key on every route but /health,
vLLM's admin routes closed to everyone, and no server without a key.

vLLM is not installed here (no GPU), so the app is a real FastAPI app with stand-in routes at vLLM's
paths, given the gate exactly as vLLM's ``build_app`` gives it a ``--middleware`` class
(``app.add_middleware(cls)``, no arguments), and served by real uvicorn on a loopback port, with
uvicorn's default lifespan mode as vLLM's ``serve_http`` runs it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
import websockets.sync.client
from fastapi import FastAPI, WebSocket
from websockets.exceptions import InvalidStatus

from preftune.backends import vllm_command
from preftune.gate import VLLM_ADMIN_ROUTES, VllmGate
from preftune.server import free_port

KEY = "test-key-0123456789"
# Routes vLLM answers outside /v1 (its own key check covers /v1/* alone), and one inside it.
KEYED = ("/tokenize", "/metrics", "/invocations", "/v1/chat/completions")
CLOSED = ("/v1/load_lora_adapter", "/sleep")


def vllm_like_app() -> FastAPI:
    """Stand-ins at vLLM's paths, each answering what it is, and the gate added as vLLM adds it."""
    app = FastAPI()
    for path in (*KEYED, *CLOSED):
        app.add_api_route(path, lambda path=path: {"route": path}, methods=["GET", "POST"])
    app.add_api_route("/health", lambda: {"status": "ok"}, methods=["GET"])

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text("realtime")
        await ws.close()

    app.add_middleware(VllmGate)  # vLLM's build_app: `if inspect.isclass(imported): app.add_middleware(imported)`
    return app


class Served:
    """``app`` on real uvicorn, in a thread: its url, and how ``server.run`` ended (uvicorn exits
    a server whose startup failed with ``sys.exit``)."""

    def __init__(self, app: FastAPI, lifespan: str = "auto") -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        # log_config=None: uvicorn's records reach the root logger (and pytest's caplog).
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                                    lifespan=lifespan))
        self.exit_code: int | str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.server.run()
        except SystemExit as end:
            self.exit_code = end.code


@contextlib.contextmanager
def served(app: FastAPI, lifespan: str = "auto") -> Iterator[Served]:
    """``app`` served; yields once it has started, or once it has given up (60 s at most)."""
    run = Served(app, lifespan)
    run.thread.start()
    deadline = time.monotonic() + 60
    while not run.server.started and run.thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield run
    finally:
        run.server.should_exit = True
        run.thread.join(timeout=30)


@pytest.fixture
def gated(monkeypatch) -> Iterator[str]:
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    with served(vllm_like_app()) as run:
        assert run.server.started
        yield run.url


def test_every_route_but_health_needs_the_key(gated):
    with httpx.Client(base_url=gated, timeout=30) as client:
        for path in KEYED:
            bare = client.post(path)
            assert bare.status_code == 401, path
            assert bare.json()["error"]["code"] == 401 and bare.headers["www-authenticate"] == "Bearer"
            assert client.post(path, headers={"Authorization": "Bearer wrong-key"}).status_code == 401, path
            assert client.post(path, headers={"Authorization": KEY}).status_code == 401, path  # no scheme
            right = client.post(path, headers={"Authorization": f"Bearer {KEY}"})
            assert (right.status_code, right.json()) == (200, {"route": path})
        assert (client.get("/health").status_code, client.get("/health").json()) == (200, {"status": "ok"})


def test_admin_routes_are_closed_to_everyone(gated):
    with httpx.Client(base_url=gated, timeout=30) as client:
        for path in CLOSED:
            for headers in ({}, {"Authorization": f"Bearer {KEY}"}):
                reply = client.post(path, headers=headers)
                assert reply.status_code == 404 and "route" not in reply.json(), (path, headers)
            # a trailing slash reaches the same route (Starlette redirects it): closed as well
            assert client.post(path + "/", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    assert set(CLOSED) <= set(VLLM_ADMIN_ROUTES) and "/health" not in VLLM_ADMIN_ROUTES


def test_websocket_routes_need_the_key_too(gated):
    url = gated.replace("http://", "ws://") + "/v1/realtime"
    for headers in ({}, {"Authorization": "Bearer wrong-key"}):
        with pytest.raises(InvalidStatus) as refused:
            websockets.sync.client.connect(url, additional_headers=headers, open_timeout=30)
        assert refused.value.response.status_code == 403
    with websockets.sync.client.connect(url, additional_headers={"Authorization": f"Bearer {KEY}"},
                                        open_timeout=30) as ws:
        assert ws.recv(timeout=30) == "realtime"


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_without_a_key_the_server_does_not_start(monkeypatch, caplog, value):
    """uvicorn in its default lifespan mode (vLLM's) ends at startup, the error naming the variable;
    nothing listens, so nothing is served without a key."""
    if value is None:
        monkeypatch.delenv("VLLM_API_KEY", raising=False)
    else:
        monkeypatch.setenv("VLLM_API_KEY", value)
    caplog.set_level(logging.INFO, logger="uvicorn.error")
    with served(vllm_like_app()) as run:
        run.thread.join(timeout=30)
        assert not run.thread.is_alive() and not run.server.started
        assert run.exit_code == 3  # uvicorn's STARTUP_FAILURE: vLLM's server task ends with it
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{run.url}/health", timeout=5)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("VLLM_API_KEY is not set" in m for m in errors), errors
    assert "Application startup failed. Exiting." in errors


def test_without_a_key_and_without_a_lifespan_nothing_is_served(monkeypatch):
    """A server run with its lifespan off never hears of startup: every request is refused instead."""
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with served(vllm_like_app(), lifespan="off") as run:
        assert run.server.started
        for path in ("/health", "/tokenize", "/v1/chat/completions"):
            reply = httpx.post(f"{run.url}{path}", headers={"Authorization": "Bearer any"}, timeout=30)
            assert reply.status_code == 503 and "VLLM_API_KEY is not set" in reply.json()["error"]["message"]


def test_vllm_is_started_with_the_gate_by_an_importable_dotted_path():
    argv = vllm_command("/models/base", {})
    dotted = argv[argv.index("--middleware") + 1]
    assert dotted == "preftune.gate.VllmGate"
    module, name = dotted.rsplit(".", 1)  # as vLLM's build_app resolves it, in the vLLM process
    assert getattr(importlib.import_module(module), name) is VllmGate
