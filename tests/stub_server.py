"""A small, real OpenAI-compatible HTTP server whose replies a test scripts.

It speaks HTTP/1.1 (keep-alive) over a loopback socket, so the client under test goes
through its real transport: connection pooling, timeouts, retries. A handler decides each
reply, which makes faults reproducible: 429 with Retry-After, 5xx, a stall past the client's
timeout, a malformed JSON body, or a dropped connection.

    def handler(req: StubRequest) -> Reply:
        return Reply(text="hello")
    with StubServer(handler, latency=0.1) as srv:
        client = OpenAI(base_url=srv.base_url, api_key="x")
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import inspect
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    text: str = ""
    status: int = 200
    finish_reason: str = "stop"
    delay: float = 0.0  # extra seconds before answering (a stall past the client's timeout)
    headers: dict[str, str] = field(default_factory=dict)
    raw_body: str | None = None  # sent as-is instead of a completion (e.g. malformed JSON)
    drop: bool = False  # close the connection without answering
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    usage: Any = None  # sent as the completion's `usage` as-is (e.g. Infinity, -40, "lots", a list)
    no_length: bool = False  # no Content-Length: the body runs until the connection closes


@dataclass
class StubRequest:
    body: dict[str, Any]
    attempt: int  # 1 for the first time this exact body is seen, 2 for its first retry, ...

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages", [])

    @property
    def last_user(self) -> str:
        users = [m.get("content", "") for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else ""


Handler = Callable[[StubRequest], "Reply | Awaitable[Reply]"]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


def _completion(body: dict[str, Any], reply: Reply) -> dict[str, Any]:
    prompt_text = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
    if reply.usage is not None:
        return {**_completion(body, Reply(text=reply.text, finish_reason=reply.finish_reason)), "usage": reply.usage}
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "stub"),
        "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                     "message": {"role": "assistant", "content": reply.text}}],
        "usage": {
            "prompt_tokens": reply.prompt_tokens if reply.prompt_tokens is not None else len(prompt_text.split()),
            # a real server never generates more than the request's max_tokens: neither does the default
            "completion_tokens": (reply.completion_tokens if reply.completion_tokens is not None
                                  else min(len(reply.text.split()), body.get("max_tokens") or len(reply.text))),
            "total_tokens": 0,
        },
    }


class StubServer:
    """Serve ``handler`` on 127.0.0.1 in a background thread; ``latency`` is added to every reply."""

    def __init__(self, handler: Handler, *, latency: float = 0.0, model: str = "stub-model"):
        self.handler = handler
        self.latency = latency
        self.model = model
        self.requests: list[dict[str, Any]] = []  # every chat body received, in arrival order
        self._attempts: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> StubServer:
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._on_connection, "127.0.0.1", 0, backlog=1024))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="stub-openai", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("stub server did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        loop = self._loop

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread:
            self._thread.join(5)
        self._loop = None

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP ------------------------------------------------------------------------------
    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in
                           (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if not await self._respond(method, path, body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _respond(self, method: str, path: str, raw: bytes, writer: asyncio.StreamWriter) -> bool:
        path = path.split("?", 1)[0].rstrip("/")
        if method == "GET" and path in ("/health", "/v1/health"):
            return await self._send(writer, 200, {"status": "ok"})
        if method == "GET" and path == "/v1/models":
            return await self._send(writer, 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]})
        if not (method == "POST" and path == "/v1/chat/completions"):
            return await self._send(writer, 404, {"error": {"message": f"no route {method} {path}"}})
        body = json.loads(raw or b"{}")
        self.requests.append(body)
        key = json.dumps(body, sort_keys=True)
        self._attempts[key] = self._attempts.get(key, 0) + 1
        reply = self.handler(StubRequest(body=body, attempt=self._attempts[key]))
        if inspect.isawaitable(reply):
            reply = await reply
        await asyncio.sleep(self.latency + reply.delay)
        if reply.drop:
            return False
        if reply.raw_body is not None:
            return await self._send(writer, reply.status, reply.raw_body, reply.headers)
        if reply.status != 200:
            err = {"error": {"message": reply.text or "scripted failure", "type": "stub", "code": reply.status}}
            return await self._send(writer, reply.status, err, reply.headers)
        return await self._send(writer, 200, _completion(body, reply), reply.headers, length=not reply.no_length)

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, payload: Any,
                    headers: dict[str, str] | None = None, length: bool = True) -> bool:
        """Write one response; without `length`, no Content-Length: the body ends when the connection closes."""
        data = payload if isinstance(payload, str) else json.dumps(payload)
        blob = data.encode()
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", "Content-Type: application/json"]
        head += [f"Content-Length: {len(blob)}", "Connection: keep-alive"] if length else ["Connection: close"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + blob)
        await writer.drain()
        return length


class _HeaderRecorder(http.server.BaseHTTPRequestHandler):
    """Answers every chat request with "<model> says hi" and records its Authorization header."""

    seen: list[str] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).seen.append(self.headers.get("authorization", ""))
        reply = json.dumps({"choices": [{"message": {"content": f"{body['model']} says hi"}, "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def recording_server() -> Iterator[tuple[str, list[str]]]:
    """A plain stdlib HTTP server (not the scripted stub: what a key test checks is the header the
    client really sent); yields its base URL and the list of Authorization headers it received."""
    _HeaderRecorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HeaderRecorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1", _HeaderRecorder.seen
    finally:
        server.shutdown()
