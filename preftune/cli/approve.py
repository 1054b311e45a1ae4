"""`preftune approve RUN [--reject] [--set FIELD=VALUE]`: answer a paused run's question from a
terminal, as the Prefect UI's form would. RUN is a flow-run id or the run's workspace folder."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

from preftune.errors import UserError
from preftune.files import read_json
from preftune.workspace import Workspace

# Each form's decision is a required choice: `decision` (its first option says yes, its last no —
# approve/reject, continue/stop, deploy it/do not deploy) or, at the comparison, `deploy`.
_DEPLOY_ANSWER = {False: "recommended", True: "none"}


def _run_ref(ref: str) -> tuple[UUID, str | None]:
    """(the flow run, the API it reports to when its workspace's run.json says so)."""
    record, api_url = Workspace(Path(ref)).run_record, None
    try:
        run = read_json(record) if Path(ref).is_dir() else None
    except FileNotFoundError:
        run = None
    except (OSError, ValueError) as err:  # a folder of another user's (0700) is a PermissionError here
        raise UserError(f"cannot read the run's record ({type(err).__name__})", path=record) from None
    if run is not None:
        if not (isinstance(run, dict) and isinstance(run.get("flow_run_id"), str)
                and isinstance(run.get("api_url"), str | None)):
            raise UserError("not a run record: expected an object with a flow_run_id text (and an api_url)",
                            path=record)
        ref, api_url = run["flow_run_id"], run.get("api_url")
    try:
        return UUID(ref), api_url
    except ValueError:
        raise UserError(f"{ref!r} is neither a flow-run id nor a workspace with run.json") from None


@contextlib.contextmanager
def _api(api_url: str | None) -> Iterator[None]:
    """The run's own API (and its stored auth string) when PREFECT_API_URL does not name one: a
    `preftune run` without it reports to a temporary server only its workspace's run.json names."""
    if os.environ.get("PREFECT_API_URL") or not api_url:
        yield
        return
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from preftune.cli.prefect_auth import saved_auth

    updates = {PREFECT_API_URL: api_url}
    if auth := saved_auth(api_url):
        updates[PREFECT_API_AUTH_STRING] = auth
    with temporary_settings(updates=updates):
        yield


def _parse_sets(pairs: list[str], schema: dict) -> dict:
    props = schema.get("properties", {})
    out = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or key not in props:
            raise UserError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(props))}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare string
    return out


def _choices(schema: dict, field: str) -> list:
    """The options of an enum field of a form's JSON schema (inline or behind a $ref)."""
    prop = schema["properties"][field]
    ref = prop.get("$ref") or next((p["$ref"] for p in prop.get("allOf", []) if "$ref" in p), None)
    if ref:
        prop = schema.get("$defs", schema.get("definitions", {}))[ref.rsplit("/", 1)[-1]]
    return list(prop.get("enum", []))


def answer(run_id: UUID, *, reject: bool, sets: list[str]) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run
    from prefect.input.actions import read_flow_run_input
    from prefect.input.run_input import keyset_from_paused_state

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(run_id)
    if flow_run.state is None or not flow_run.state.is_paused():
        state = flow_run.state.name if flow_run.state else "unknown"
        raise UserError(f"flow run {run_id} is not waiting for an answer (state: {state})")
    keyset = keyset_from_paused_state(flow_run.state)
    schema = read_flow_run_input(keyset["schema"], flow_run_id=run_id) or {}
    props = schema.get("properties", {})
    values = {k: v["default"] for k, v in props.items() if "default" in v}
    if "decision" in props:
        options = _choices(schema, "decision")
        values["decision"] = options[-1] if reject else options[0]
    if "deploy" in props:
        values["deploy"] = _DEPLOY_ANSWER[reject]
    values.update(_parse_sets(sets, schema))
    resume_flow_run(run_id, run_input=values)
    return values


def add_parser(sub) -> None:
    p = sub.add_parser("approve", help="Answer a paused run's question (plan, evaluator, comparison, promotion).")
    p.add_argument("run", help="Flow-run id, or the run's workspace folder.")
    p.add_argument("--reject", action="store_true", help="Say no (the run ends cleanly, nothing more is spent).")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                   help="Set a form field, e.g. --set budget_usd=20 --set 'drop_betas=[0.5]'.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    run_id, api_url = _run_ref(args.run)
    with _api(api_url):
        values = answer(run_id, reject=args.reject, sets=args.sets)
    print(f"answered: {json.dumps(values)}")
    return 0
