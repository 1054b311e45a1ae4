"""The Prefect server on PostgreSQL (what a team moves to from SQLite): two runs of the pipeline at
once, each in its own process as `preftune run` would be, each pausing for its approvals, against a
server whose database is a real PostgreSQL 15."""

from __future__ import annotations

import json

import pytest

from preftune.paths import EXAMPLES_DIR
from preftune.spec import RunSpec
from tests.flow_helpers import answer, wait_for_end, wait_for_question
from tests.prefect_processes import FlowProcess, postgres_server, prefect_server


@pytest.fixture(scope="module")
def postgres_api(tmp_path_factory):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with postgres_server() as url, prefect_server(tmp_path_factory.mktemp("pg-prefect"),
                                                  {"PREFECT_API_DATABASE_CONNECTION_URL": url}) as env:
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            yield env


def test_two_runs_at_once_with_approvals_on_postgres(postgres_api, zoo, tmp_path):
    from prefect.client.orchestration import get_client

    from preftune.flows.pipeline import preference_learning
    lines = (EXAMPLES_DIR / "pairs.jsonl").read_text(encoding="utf-8").splitlines()[:30]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    runs = {}
    for name, beta in (("a", 0.1), ("b", 0.5)):
        ws = tmp_path / name
        spec = RunSpec(dataset=str(data), workspace=str(ws), base_models=[zoo["models"]["tiny-llama"]],
                       betas=[beta], evaluator="preftune.judges.builtin:answer_quality", epochs=1, batch_size=8,
                       max_length=96, eval_max_new_tokens=8, max_eval_prompts=4, target_win_rate=None,
                       deploy=False, max_concurrent_jobs=1, approval_poll_s=1, approval_timeout_s=900)
        runs[name] = (ws, FlowProcess(spec, postgres_api, tmp_path / f"{name}.log"))
    # both runs are paused for their plan approval at the same time
    paused = {name: wait_for_question(ws, fut)[0] for name, (ws, fut) in runs.items()}
    with get_client(sync_client=True) as client:
        assert all(client.read_flow_run(run_id).state.is_paused() for run_id in paused.values())
    for ws, fut in runs.values():
        answer(ws, fut, "decision", {"decision": "approve"})
    for ws, fut in runs.values():
        answer(ws, fut, "deploy", {"deploy": "none"})
    for name, (ws, fut) in runs.items():
        outcome = wait_for_end(ws, fut, timeout=1200)
        assert outcome["status"] == "completed", (name, outcome)
        approvals = [json.loads(x) for x in (ws / "approvals.jsonl").read_text().splitlines()]
        assert [(a["kind"], a["by"]) for a in approvals] == [("plan", "user"), ("comparison", "user")]
        assert (ws / "final_report.md").is_file()
    with get_client(sync_client=True) as client:
        assert client.read_flow(client.read_flow_run(paused["a"]).flow_id).name == preference_learning.name
        states = {name: client.read_flow_run(run_id).state.type.value for name, run_id in paused.items()}
    assert states == {"a": "COMPLETED", "b": "COMPLETED"}
    # the runs are in PostgreSQL: read them back with SQL, not through the server
    import asyncio

    import asyncpg

    url = postgres_api["PREFECT_API_DATABASE_CONNECTION_URL"].replace("postgresql+asyncpg", "postgresql")

    async def count() -> int:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval("SELECT count(*) FROM flow_run WHERE id = ANY($1::uuid[])",
                                       [str(i) for i in paused.values()])
        finally:
            await conn.close()

    assert asyncio.run(count()) == 2
