"""A local model folder behind an OpenAI-compatible chat endpoint, continuously batched.

    python -m preftune.batchserve FOLDER --port N [--host 127.0.0.1] [--device cpu] [--rows 32]

What a run's generation needs and no more: ``POST /v1/chat/completions`` (non-streaming, one
choice; ``messages``, optional ``tools``, ``max_tokens`` / ``max_completion_tokens``,
``temperature``, ``top_p``, ``seed``), ``GET /v1/models`` and ``GET /health``. Any other request
field that would change the answer (``stop``, ``logprobs``, ``response_format``, penalties, ...)
is a 400 naming it, never silently ignored. Requests must name the folder as their ``model``, as
with ``transformers serve``, and carry the server's key (``Authorization: Bearer``, given in
``PREFTUNE_SERVER_KEY``; ``/health`` alone is open). Replies carry ``finish_reason`` ("stop" at an
end token, "length" at ``max_tokens``) and ``usage``. The model is loaded before the port opens,
so a health answer means ready; ``/health`` is 503 once the model thread is gone. A request whose
client disconnects is dropped from the batch at the next step. Deployments (``preftune deploy``)
use ``transformers serve`` or vLLM, whose API is broader (streaming).

The batching itself is ``preftune.batching.Engine``: one model thread, up to ``--rows`` requests
advancing together, a finished row refilled from the queue at once.
"""

from __future__ import annotations

import argparse
import json
import math
import select
import socket
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from preftune.batching import Cancelled, Engine, EngineDead, Request
from preftune.hf import load_causal_lm, prompt_ids, stop_token_ids
from preftune.keys import bearer_ok, take_server_key

SUPPORTED = {"model", "messages", "tools", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
             "stream", "n"}
HARMLESS = {"user", "metadata", "store", "service_tier"}  # bookkeeping fields that do not change an answer
MAX_TEMPERATURE = 2.0  # OpenAI's range


class BadRequest(ValueError):
    pass


class Model:
    """The tokenizer, the engine and the chat template between them."""

    def __init__(self, folder: str, device: str, rows: int) -> None:
        self.name = folder
        model, self.tok = load_causal_lm(folder, device=device)  # as phase 5 loads a model
        eos_ids = set(stop_token_ids(model, self.tok))  # as phase 5 stops
        self.context = getattr(model.config, "max_position_embeddings", None)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.engine = Engine(model, eos_ids, max_rows=rows, pad_id=pad)
        self.engine.start()

    def request(self, body: Any) -> Request:
        """The engine request for an OpenAI chat body; BadRequest names what is wrong."""
        if not isinstance(body, dict):
            raise BadRequest(f"the body must be a JSON object, not {type(body).__name__}")
        ignored = sorted(k for k, v in body.items() if k not in SUPPORTED | HARMLESS and not _unset(v))
        if ignored:
            raise BadRequest(f"not supported by this server (a run's generation server): {', '.join(ignored)}")
        if body.get("stream"):
            raise BadRequest("streaming is not supported by this server (a run's generation server)")
        if int(body.get("n") or 1) != 1:
            raise BadRequest("n > 1 is not supported")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list")
        try:
            ids = prompt_ids(self.tok, messages, body.get("tools"))  # as the trainer renders a prompt
        except Exception as err:  # a template that rejects these messages (roles, tools)
            raise BadRequest(f"the chat template rejected the messages: {err}") from None
        max_tokens = next((body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), 256)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest(f"max_tokens must be an integer of at least 1, not {max_tokens!r}")
        if self.context and len(ids) + max_tokens > self.context:
            raise BadRequest(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                             f"model's context of {self.context} tokens")
        # Checked here: a bad value found in the model thread would fail every request of its batch.
        temperature, top_p, seed = body.get("temperature"), body.get("top_p"), body.get("seed")
        if temperature is not None and (not isinstance(temperature, int | float) or not math.isfinite(temperature)
                                        or not 0 <= temperature <= MAX_TEMPERATURE):
            raise BadRequest(f"temperature must be a number from 0 to {MAX_TEMPERATURE:g}, not {temperature!r}")
        if top_p is not None and (not isinstance(top_p, int | float) or not 0 < top_p <= 1):
            raise BadRequest(f"top_p must be a number in (0, 1], not {top_p!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise BadRequest(f"seed must be an integer, not {seed!r}")
        return Request(ids, max_tokens, temperature=float(temperature or 0.0),
                       top_p=float(1.0 if top_p is None else top_p), seed=seed)

    def reply(self, req: Request) -> dict[str, Any]:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name,
                "choices": [{"index": 0, "finish_reason": req.finish_reason,
                             "message": {"role": "assistant",
                                         "content": self.tok.decode(req.tokens, skip_special_tokens=True)}}],
                "usage": {"prompt_tokens": len(req.prompt), "completion_tokens": req.generated,
                          "total_tokens": len(req.prompt) + req.generated}}


def _unset(value: Any) -> bool:
    """A field sent at its no-op value (``"stop": null``, ``"logprobs": false``, a 0 penalty)."""
    return value is None or value is False or value == 0 or value == [] or value == {}


def client_gone(sock: socket.socket) -> bool:
    """Whether the peer closed its end: readable with nothing to read (a non-streaming client sends
    nothing more while it waits for its answer)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def handler(model: Model, key: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the client reuses its connections

        def _send(self, status: int, obj: dict[str, Any]) -> None:
            data = json.dumps(obj, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a cancelled run)
                self.close_connection = True

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

        def _authorized(self) -> bool:
            if bearer_ok(self.headers.get("Authorization"), key):
                return True
            self._error(401, "missing or wrong API key")
            return False

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/health":
                alive = model.engine.alive
                self._send(200 if alive else 503, {"status": "ok" if alive else "model thread gone",
                                                   **model.engine.stats()})
            elif not self._authorized():
                return
            elif self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model.name, "object": "model",
                                                             "owned_by": "preftune"}]})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:  # noqa: N802
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            except ValueError as err:
                return self._error(400, f"the body is not JSON: {err}")
            if not self._authorized():
                return None
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}")
            if isinstance(body, dict) and body.get("model") != model.name:
                return self._error(400, f"this server serves {model.name!r}, not {body.get('model')!r}")
            try:
                req = model.engine.submit(model.request(body))
            except EngineDead as err:
                return self._error(503, str(err))
            except (BadRequest, ValueError) as err:
                return self._error(400, str(err))
            while not req.done.wait(0.25):
                if client_gone(self.connection):
                    req.cancelled = True  # the engine drops it at its next step
                    req.done.wait()
            if isinstance(req.error, Cancelled):
                self.close_connection = True
                return None
            if req.error is not None:
                status = 503 if isinstance(req.error, EngineDead) else 500
                return self._error(status, f"generation failed: {type(req.error).__name__}: {req.error}")
            self._send(200, model.reply(req))

        def log_message(self, format: str, *args: Any) -> None:  # one line per request, to the log file
            sys.stderr.write(f"{self.log_date_time_string()} {format % args}\n")

    return Handler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m preftune.batchserve", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=32, help="requests batched together (default 32)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    args = ap.parse_args(argv)
    key = take_server_key()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = Model(args.folder, args.device, args.rows)
    ThreadingHTTPServer.request_queue_size = 256  # a run opens 32+ connections at once (default 5)
    server = ThreadingHTTPServer((args.host, args.port), handler(model, key))
    server.daemon_threads = True
    print(f"serving {args.folder} on http://{args.host}:{args.port}/v1 ({args.rows} rows, {args.device})",
          file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
