"""`preftune deploy` — phase 6: serve a model (+ LoRA adapter) behind an OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from preftune.cli.common import print_json
from preftune.workspace import default_workspace as named_workspace


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "deploy", help="serve a model (merged with its LoRA adapter) on a local OpenAI-compatible endpoint",
        description="Merge the adapter into its base model (transformers serve; vLLM serves the adapter "
                    "directly when vllm and a GPU are present), start the server in the background, check "
                    "/health, send one smoke chat request, and write WORKSPACE/deploy/endpoint.json plus a "
                    "Python snippet that calls it with the openai client. --stop stops it.")
    p.add_argument("--model", metavar="BASE", help="the base model folder")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder trained on BASE (e.g. jobs/<id>/adapter)")
    p.add_argument("--port", type=int, metavar="N", help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--workspace", metavar="DIR",
                   help="where deploy/ goes (default: the adapter's run workspace, else ./workspaces/deploy)")
    p.add_argument("--device", default="cpu", help="transformers serve device (default cpu; e.g. cuda:0)")
    p.add_argument("--engine", choices=["auto", "transformers", "vllm"], default="auto",
                   help="auto: vLLM when installed and a GPU is present, else transformers serve")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S", help="seconds to wait for /health")
    p.add_argument("--stop", action="store_true", help="stop the workspace's deployed server")
    p.add_argument("--json", action="store_true", help="print endpoint.json as JSON")
    p.set_defaults(func=run)


def default_workspace(adapter: str | None) -> Path:
    """A run's adapter lives at WORKSPACE/jobs/<job-id>/adapter: deploy next to that run's files."""
    if adapter:
        parts = Path(adapter).resolve().parts
        if len(parts) >= 3 and parts[-3] == "jobs":
            return Path(*parts[:-3])
    return named_workspace("deploy")


def run(args: argparse.Namespace) -> int:
    from preftune.errors import UserError
    from preftune.server import ServerError
    from preftune.tasks.deploy import deploy, stop_deployment

    workspace = Path(args.workspace) if args.workspace else default_workspace(args.adapter)
    if args.stop:
        result = stop_deployment(workspace)
        if args.json:
            print_json(result)
        else:
            print(f"stopped server pid {result['pid']} ({result['base_url']})" if result["stopped"]
                  else f"nothing to stop in {workspace}: {result.get('reason', 'server was not running')}")
        return 0
    if not args.model:
        raise UserError("--model BASE is required (or --stop)")
    try:
        info = deploy(args.model, workspace, adapter=args.adapter, port=args.port, device=args.device,
                      engine=args.engine, timeout=args.timeout)
    except ServerError as err:
        print(f"preftune deploy: error: {err}", file=sys.stderr)
        print("nothing was left running", file=sys.stderr)
        return 1
    if args.json:
        print_json(info)
    else:
        print(f"serving   {info['model']} at {info['base_url']} (pid {info['pid']}, {info['engine']})")
        print(f"smoke     {info['smoke']['reply']!r}")
        print(f"endpoint  {Path(workspace) / 'deploy' / 'endpoint.json'}; stop with: preftune deploy --stop "
              f"--workspace {workspace}")
        print("\n" + Path(info["snippet"]).read_text())
    return 0
