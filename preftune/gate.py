"""A bearer key in front of a model server's whole app, as ASGI middleware.

``BearerKey`` answers 401 to a request without ``Authorization: Bearer <key>`` on every path but
``/health``, and 404 to everyone on its closed paths (routes that load, unload or reconfigure a
model: a caller with the key has no business there either). preftune/hfserve.py puts it in front of
``transformers serve``; ``VllmGate`` is the same for ``vllm serve``, which checks its own key on
``/v1/*`` only: /tokenize, /metrics, /invocations (it generates), /pooling, /score, /sleep, ...
answer any local user without it. vLLM adds a middleware class named by ``--middleware
preftune.gate.VllmGate`` with no arguments, so ``VllmGate`` reads its key where vLLM does, from
``VLLM_API_KEY``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from preftune.keys import bearer_ok

OPEN_PATHS = ("/health",)  # readiness, answered without a key (it says nothing but ok / not)
VLLM_KEY_ENV = "VLLM_API_KEY"
# vLLM's routes that change what the server is (load or drop an adapter, sleep, reset caches, pause,
# profile, rescale, swap weights) rather than answer a request: preftune calls none of them, and a
# deployment's caller must not reconfigure the owner's server. Most exist only behind a setting
# (VLLM_SERVER_DEV_MODE, VLLM_ALLOW_RUNTIME_LORA_UPDATING, which preftune.server clears); closed here
# as well, so a setting or a vLLM release that turns one on opens nothing.
VLLM_ADMIN_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/sleep", "/wake_up", "/is_sleeping",
                     "/collective_rpc", "/reset_prefix_cache", "/reset_mm_cache", "/scale_elastic_ep",
                     "/is_scaling_elastic_ep", "/pause", "/resume", "/start_profile", "/stop_profile",
                     "/update_weights", "/init_weight_transfer")


def _route_path(scope: dict) -> str:
    """The path the app routes on: without the app's root path (as Starlette strips it) and without a
    trailing slash (Starlette redirects ``/sleep/`` to ``/sleep``)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/") or "/"


def _json_headers(body: bytes, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]


class BearerKey:
    """ASGI middleware: 404 on ``closed`` paths, key or not; else 401 without the key (``/health`` open).

    WebSocket routes (vLLM's /v1/realtime) are held to the same rules: refused before the handshake."""

    def __init__(self, app: Any, key: str, closed: tuple[str, ...] = ()) -> None:
        if not key:
            raise ValueError("a server's bearer key must not be empty")
        self.app, self.key, self.closed = app, key, frozenset(closed)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            path = _route_path(scope)
            if path in self.closed:
                return await self._refuse(scope, send, 404, "no such route")
            header = dict(scope.get("headers") or []).get(b"authorization")
            if path not in OPEN_PATHS and not bearer_ok(header, self.key):
                return await self._refuse(scope, send, 401, "missing or wrong API key")
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: dict, send: Any, status: int, message: str) -> None:
        if scope["type"] == "websocket":  # closed before it is accepted: the client gets HTTP 403
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": status}}).encode()
        extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
        await send({"type": "http.response.start", "status": status, "headers": _json_headers(body, *extra)})
        await send({"type": "http.response.body", "body": body})


class VllmGate(BearerKey):
    """``BearerKey`` for ``vllm serve --middleware preftune.gate.VllmGate``: the key from
    ``VLLM_API_KEY`` (where preftune.server puts it), vLLM's admin routes closed.

    Without a key the server does not start. Not by raising here: Starlette builds its middleware
    inside the app's first call (the lifespan startup), and uvicorn in its default lifespan mode
    ("auto", as vLLM runs it) takes an exception there for an app without lifespan support, logs
    "appears unsupported" and serves on, 500 on every route. A ``lifespan.startup.failed`` message
    stops uvicorn in every mode, with the reason logged as an error."""

    def __init__(self, app: Any) -> None:
        key = os.environ.get(VLLM_KEY_ENV, "")
        self.problem = "" if key else f"{VLLM_KEY_ENV} is not set: preftune.gate.VllmGate serves nothing without a key"
        if key:
            super().__init__(app, key, closed=VLLM_ADMIN_ROUTES)
        else:
            self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if not self.problem:
            return await super().__call__(scope, receive, send)
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            await send({"type": "lifespan.startup.failed", "message": self.problem})
        elif scope["type"] in ("http", "websocket"):  # a server run with its lifespan off: still nothing
            await self._refuse(scope, send, 503, self.problem)
