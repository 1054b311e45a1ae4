"""Drive the real flow from a test: run it in a thread, answer its questions like a person would."""

from __future__ import annotations

import contextvars
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.flow_runs import resume_flow_run
from prefect.input.actions import read_flow_run_input
from prefect.input.run_input import keyset_from_paused_state

from preftune.errors import run_outcome
from preftune.spec import RunSpec

_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="flow-under-test")


def start_flow(spec: RunSpec) -> Future:
    """The flow in another thread, in a copy of this context so it talks to the same API."""
    from preftune.flows.pipeline import preference_learning

    def run() -> dict:
        # The run's outcome, whatever its state: a failed or rejected run returns a Failed or
        # Cancelled state carrying the outcome (a crash raises, as it should).
        outcome = run_outcome(preference_learning(spec, return_state=True).result(raise_on_failure=False))
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    ctx = contextvars.copy_context()
    return _POOL.submit(ctx.run, run)


def _run_id(ws: Path, fut: Future, timeout: float) -> UUID:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (ws / "run.json").exists():
            return UUID(json.loads((ws / "run.json").read_text())["flow_run_id"])
        if fut.done():
            raise AssertionError(f"flow ended before asking anything: {fut.result()}")
        time.sleep(0.2)
    raise AssertionError("flow did not start")


def wait_for_question(ws: Path, fut: Future, timeout: float = 300) -> tuple[UUID, dict]:
    """Wait until the run is paused with its form saved; return (run id, form JSON schema)."""
    run_id = _run_id(ws, fut, timeout)
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            schema = _pending_question(client, run_id)
            if schema is not None:
                return run_id, schema
            if fut.done():
                raise AssertionError(f"flow ended while a question was expected: {fut.result()}")
            time.sleep(0.3)
    raise AssertionError("no question was asked in time")


def answer(ws: Path, fut: Future, expect_field: str, values: dict) -> dict:
    """Answer the pending question, checking it is the expected one (by its form's field)."""
    run_id, schema = wait_for_question(ws, fut)
    assert expect_field in schema["properties"], f"asked {sorted(schema['properties'])}, expected {expect_field}"
    resume_flow_run(run_id, run_input=values)
    # wait until the run has left the paused state, so the next wait sees the next question
    with get_client(sync_client=True) as client:
        for _ in range(200):
            state = client.read_flow_run(run_id).state
            if state is None or not state.is_paused():
                break
            time.sleep(0.1)
    return schema


def _pending_question(client, run_id: UUID) -> dict | None:
    state = client.read_flow_run(run_id).state
    if state is not None and state.is_paused() and state.state_details.run_input_keyset:
        return read_flow_run_input(keyset_from_paused_state(state)["schema"], flow_run_id=run_id) or None
    return None


def wait_for_end(ws: Path, fut: Future, timeout: float = 900) -> dict:
    """The flow's result; fails at once, naming the form's fields, if the run pauses for a question
    instead (an unexpected question would otherwise hang the test until the approval timeout)."""
    run_id = _run_id(ws, fut, timeout)
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if fut.done():
                return fut.result()
            schema = _pending_question(client, run_id)
            if schema is not None and not fut.done():
                raise AssertionError(f"unexpected question, fields {sorted(schema['properties'])}")
            time.sleep(0.3)
    raise AssertionError(f"flow did not end within {timeout:g} s")


def question_text(run_id: UUID) -> str:
    """The Markdown shown above the pending question's form."""
    with get_client(sync_client=True) as client:
        keyset = keyset_from_paused_state(client.read_flow_run(run_id).state)
    return read_flow_run_input(keyset["description"], flow_run_id=run_id) or ""


def flow_state(ws: Path):
    """The final Prefect state of the flow run recorded in the workspace's run.json."""
    run_id = UUID(json.loads((ws / "run.json").read_text())["flow_run_id"])
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state


def api_post(route: str, body: dict) -> list:
    """POST to the Prefect API's raw filter routes. In Prefect 3.8.8 the client's read_artifacts
    gets HTTP 422 with defaults and nothing with empty filters, so the tests use the routes."""
    with get_client(sync_client=True) as client:
        return client.request("POST", route, json={"limit": 200, "offset": 0, **body}).json()


def artifact_data(key: str, flow_run_id: str | None = None) -> list:
    """Every artifact version under `key` (of one flow run, when given), newest first."""
    where: dict = {"key": {"any_": [key]}}
    if flow_run_id:
        where["flow_run_id"] = {"any_": [flow_run_id]}
    return [a["data"] for a in api_post("/artifacts/filter", {"artifacts": where, "limit": 10,
                                                              "sort": "CREATED_DESC"})]
