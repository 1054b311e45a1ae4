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

import sys
from typing import Any

from preftune.gate import BearerKey
from preftune.keys import take_server_key

# What loads or unloads a model: not for callers. Taken out of the router (so the key check answers
# first, 401 without the key, and 404 with it); vLLM's admin routes are closed by preftune.gate instead.
CLOSED_ROUTES = ("/load_model", "/reset")


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
