"""``transformers serve``, guarded: a bearer key on every route but ``/health``, and no route that
loads or unloads a model.

    PREFTUNE_SERVER_KEY=... python -m preftune.hfserve FOLDER --port N [transformers serve's options]

transformers 5.23's server has no key option and exposes ``POST /load_model`` (load any folder or
hub id) and ``POST /reset`` (unload): another local user could load a folder of their choosing into
the owner's server, or empty it. Its app is built by one function,
``transformers.cli.serving.server.build_server``, that ``Serve`` looks up when it runs; this
module wraps that function (the app it returns gets the key check and loses the two routes) and
then runs transformers' own command line in this process. A reverse proxy in front would leave the
inner port open to every local user; here nothing listens but the guarded app.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from preftune.keys import bearer_ok, take_server_key

CLOSED_ROUTES = ("/load_model", "/reset")  # what loads or unloads a model: not for callers
OPEN_PATHS = ("/health",)  # readiness, answered without a key (it says nothing but ok / not)


class BearerKey:
    """ASGI middleware: a request without ``Authorization: Bearer <key>`` gets 401."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = dict(scope.get("headers") or []).get(b"authorization")
            if not bearer_ok(header, self.key):
                body = json.dumps({"error": {"message": "missing or wrong API key", "type": "invalid_request_error",
                                             "code": 401}}).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def guard(app: Any, key: str) -> Any:
    """``app`` (transformers' FastAPI app) without the model-loading routes, behind the key."""
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in CLOSED_ROUTES]
    app.add_middleware(BearerKey, key=key)
    return app


def main(argv: list[str] | None = None) -> int:
    key = take_server_key()
    import transformers.cli.serving.server as hf_server
    from transformers.cli.transformers import app as cli

    build = hf_server.build_server

    def guarded_build(*args: Any, **kwargs: Any) -> Any:
        return guard(build(*args, **kwargs), key)

    hf_server.build_server = guarded_build  # Serve imports it from this module when it runs
    cli(args=["serve", *(sys.argv[1:] if argv is None else argv)], prog_name="python -m preftune.hfserve")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
