"""`preftune up`: the whole local UI path in one command. Starts a Prefect server (SQLite, in
`--home`, by default under preftune's cache) when none answers at PREFECT_API_URL (or the default
127.0.0.1:4200), serves the deployments as `preftune serve` does, prints the UI's address, and on
Ctrl-C or SIGTERM stops what it started: the serve loop, then the server (never a server it found
already running)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from urllib.parse import urlsplit

from preftune.errors import UserError

DEFAULT_API = "http://127.0.0.1:4200/api"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "0.0.0.0", "::1"}
# A guard against a server that never answers, not an expectation: a fresh SQLite database is migrated
# in ~10 s on an idle machine, but took over 180 s on a 2-core machine at load average 12.
STARTUP_TIMEOUT_S = 600.0


def add_parser(sub) -> None:
    p = sub.add_parser("up", help="Start a local Prefect server (if none is running) and serve the deployments.")
    p.add_argument("--home", help="Folder for the server's SQLite database and settings (default: "
                   "<cache>/prefect-server; only used when a server is started).")
    p.add_argument("--port", type=int, default=None,
                   help="Port of the Prefect server (default: the one in PREFECT_API_URL, else 4200). A server "
                   "already answering there is used; otherwise one is started on 127.0.0.1 at that port.")
    p.add_argument("--job-limit", type=int, default=6, help="Training jobs at once (default %(default)s).")
    p.set_defaults(func=run)


def answers(api_url: str, timeout: float = 10.0) -> bool:
    """Whether a Prefect API answers its health check at `api_url` (ending in /api)."""
    import httpx

    try:
        return httpx.get(api_url.rstrip("/") + "/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def start_server(api_url: str, home: str, auth: str) -> subprocess.Popen:
    """`prefect server start` on the host and port of `api_url`, asking every API request for `auth`
    (preftune.cli.prefect_auth), in its own process group (so the terminal's Ctrl-C reaches us first
    and we stop it after the serve loop); it dies with us."""
    from preftune.cli.prefect_auth import CLIENT_SETTING, SERVER_SETTING
    from preftune.keys import child_environ
    from preftune.procs import popen

    where = urlsplit(api_url)
    if where.hostname not in LOCAL_HOSTS:
        raise UserError(f"no Prefect server answers at {api_url}, and it is not on this machine, so preftune "
                        "cannot start it: start it there, or unset PREFECT_API_URL for a local one")
    os.makedirs(home, exist_ok=True)
    # The UI asks its API at PREFECT_UI_API_URL, which defaults to port 4200, not the one it serves on.
    # The owner's Prefect settings (database URL, logging...), not a client's credentials.
    settings = {k: v for k, v in os.environ.items()
                if k.startswith("PREFECT_") and k not in (CLIENT_SETTING, "PREFECT_API_KEY")}
    env = child_environ({**settings, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                         "PREFECT_UI_API_URL": api_url, SERVER_SETTING: auth})
    env.pop("PREFECT_API_URL", None)
    log = open(os.path.join(home, "server.log"), "ab")  # noqa: SIM115 - the child holds it for its life
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", where.hostname,
            "--port", str(where.port or 4200)]
    try:
        return popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                     start_new_session=True, death_signal=signal.SIGTERM)
    finally:
        log.close()


def wait_until_up(api_url: str, server: subprocess.Popen, home: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not answers(api_url, timeout=2.0):
        if server.poll() is not None:
            from preftune.server import log_tail

            raise UserError(f"the Prefect server exited with {server.returncode} before answering at {api_url}: "
                            f"{log_tail(os.path.join(home, 'server.log'), 3)}")
        if time.monotonic() > deadline:
            raise UserError(f"the Prefect server did not answer at {api_url} within {STARTUP_TIMEOUT_S:g} s; "
                            f"see {home}/server.log")
        time.sleep(0.5)


def stop(proc: subprocess.Popen | None, *, group: bool = False, grace_s: float = 3.0) -> None:
    """SIGTERM (its whole process group when `group`), then SIGKILL after `grace_s` (both stops fit
    in the CLI's exit deadline after a signal, preftune.cli.EXIT_DEADLINE_S)."""
    if proc is None or proc.poll() is not None:
        return
    send = (lambda sig: os.killpg(proc.pid, sig)) if group else proc.send_signal
    try:
        send(signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def with_port(api_url: str, port: int) -> str:
    """`api_url` on `port` (--port): the host stays, so a remote PREFECT_API_URL is refused as before."""
    if not 0 < port < 65536:
        raise UserError(f"--port {port}: expected a port number from 1 to 65535")
    where = urlsplit(api_url)
    host = f"[{where.hostname}]" if ":" in (where.hostname or "") else where.hostname
    return where._replace(netloc=f"{host}:{port}").geturl()


# What Ctrl-C leaves behind, printed by preftune.cli when this command is interrupted (a run's message,
# "re-run to resume", would not be true of `up`).
INTERRUPTED = ("preftune up: stopped the serve loop and the Prefect server it started (a server it found "
               "running is left running); flow runs and their workspaces are kept")


def ui_url(api_url: str) -> str:
    from prefect.settings import PREFECT_UI_URL

    if os.environ.get("PREFECT_UI_URL"):
        return PREFECT_UI_URL.value()
    return api_url.rstrip("/").removesuffix("/api")


def run(args: argparse.Namespace) -> int:
    from prefect.settings import PREFECT_API_URL

    from preftune.cli.prefect_auth import CLIENT_SETTING, check_credentials, record_server, server_auth
    from preftune.cli.serve import start_serve_loop
    from preftune.paths import cache_dir

    api_url = PREFECT_API_URL.value() or DEFAULT_API  # the environment, else the active Prefect profile
    if args.port is not None:
        api_url = with_port(api_url, args.port)
    home = os.path.abspath(args.home or str(cache_dir() / "prefect-server"))
    server = None
    loop = None
    login = ""
    try:
        if answers(api_url):
            print(f"using the Prefect server already running at {api_url}", flush=True)
            check_credentials(api_url)
        else:
            print(f"starting a Prefect server at {api_url} (SQLite in {home})", flush=True)
            auth, auth_file = server_auth(home)
            record_server(api_url, auth_file)  # so `preftune run/approve/serve` find the credentials
            os.environ[CLIENT_SETTING] = auth  # the serve loop's
            server = start_server(api_url, home, auth)
            wait_until_up(api_url, server, home)
            login = (f"; it asks for credentials: on its Login page enter the whole line stored in {auth_file} "
                     "(readable by you only), and preftune commands read that file themselves")
        os.environ["PREFECT_API_URL"] = api_url
        loop = start_serve_loop(args.job_limit, env={**os.environ, "PREFECT_API_URL": api_url})
        print(f"Prefect UI: {ui_url(api_url)}  (deployment 'preference-learning/preftune': Run → Custom run; "
              f"Ctrl-C stops everything this command started{login})", flush=True)
        code = loop.wait()  # until Ctrl-C / SIGTERM (KeyboardInterrupt), or the loop dies by itself
        print(f"preftune up: the serve loop exited with {code}", file=sys.stderr, flush=True)
        return code or 1
    finally:
        stop(loop)
        stop(server, group=True)
