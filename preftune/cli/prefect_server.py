"""The temporary Prefect server (what Prefect starts when PREFECT_API_URL is unset) dies with us.

Prefect 3 starts it as ``python -m uvicorn ... prefect.server.api.server:create_app`` from
``SubprocessASGIServer._run_uvicorn_command`` and stops it in an atexit hook, which a ``kill -9``
never runs: the server then stays up and listening. We start the same command through
``preftune.procs.popen``, so the kernel kills it when this process dies, and with an auth string
(``preftune.cli.prefect_auth.temporary_auth``): Prefect's would answer anyone on the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

_PATCHED = False
TEMPORARY_API_ENV = "PREFTUNE_TEMPORARY_API_URL"  # where this process's temporary server listens


def die_with_us() -> None:
    global _PATCHED
    if _PATCHED:
        return
    try:
        import prefect
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import get_current_settings
    except ImportError:  # pragma: no cover - a Prefect without that class starts no such server
        return
    from preftune.cli.prefect_auth import SERVER_SETTING, record_temporary
    from preftune.keys import child_environ
    from preftune.procs import popen

    def _run_uvicorn_command(self) -> subprocess.Popen:
        # It requires this process's auth string (prefect_auth.temporary_auth): another local user cannot
        # answer the run's questions through it. Its URL goes into the run's run.json (flows/pipeline.py).
        api_url = f"http://127.0.0.1:{self.port}/api"
        auth = record_temporary(api_url)
        os.environ[TEMPORARY_API_ENV] = api_url
        env = child_environ({"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
                             **get_current_settings().to_environment_variables(exclude_unset=True),
                             **({SERVER_SETTING: auth} if auth else {})})
        argv = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "error", "--lifespan", "on"]
        return popen(argv, env=env, death_signal=signal.SIGKILL)

    SubprocessASGIServer._run_uvicorn_command = _run_uvicorn_command
    _PATCHED = True
