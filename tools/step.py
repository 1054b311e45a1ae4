"""`python3 tools/step.py "WHAT" SECONDS -- COMMAND...`: run COMMAND, and while it runs say what it does,
how long it has run and how long it usually takes, every 10 s (the Makefile's set-up steps: a quiet
`pip install` of torch and prefect is a minute or more with no output). Standard library only: it
runs before the virtual environment exists. Exits with COMMAND's exit code."""

from __future__ import annotations

import subprocess
import sys
import time

EVERY_S = 10.0


def main(argv: list[str]) -> int:
    what, usual, command = argv[0], float(argv[1]), argv[argv.index("--") + 1:]
    start = time.monotonic()
    print(f"make: {what} ...", flush=True)
    proc = subprocess.Popen(command)
    while True:
        try:
            code = proc.wait(timeout=EVERY_S)
            break
        except subprocess.TimeoutExpired:
            spent = time.monotonic() - start
            left = f"~{usual - spent:.0f} s left" if spent < usual else "longer than usual (a loaded machine?)"
            print(f"make: {what}: {spent:.0f} s so far, usually ~{usual:.0f} s on a quiet 2-core machine, {left}",
                  flush=True)
    print(f"make: {what}: done in {time.monotonic() - start:.0f} s" if code == 0 else
          f"make: {what}: failed (exit {code})", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
