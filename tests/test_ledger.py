"""The cost ledger, judge replies without a verdict, and refused keys — against real local servers.

Every figure is checked three ways: the requests the server counted (the ones it answered with
usage) × the price = the ledger's sum = the report's figure.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.endpoint import Endpoint
from preftune.errors import UserError
from preftune.ledger import read_ledger
from preftune.reports.build import collect
from preftune.response_cache import ResponseCache
from preftune.tasks.evaluate import EvalConfig, run_evaluation
from preftune.tasks.pairs import generate_pairs
from preftune.workspace import Workspace
from tests.stub_server import Reply, StubRequest, StubServer
from tests.test_pairs import write_prompts

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "How many legs does a spider have?",
             "Why is the sky blue?", "What do bees make?", "What is two plus two?"]
# scripted usage of every answered request, and prices (USD per 1M tokens) that make it visible
PROMPT_TOKENS, COMPLETION_TOKENS = 70, 30  # within every request's bounds (max_tokens >= 30)
PRICES = {"big": (1000.0, 3000.0), "small": (100.0, 200.0), "judge": (500.0, 1500.0)}


def usd(model: str, n: int) -> float:
    price_in, price_out = PRICES[model]
    return n * (PROMPT_TOKENS * price_in + COMPLETION_TOKENS * price_out) / 1e6


def priced(model: str, url: str, **kw) -> Endpoint:
    return Endpoint(model=model, base_url=url, price_input_per_m=PRICES[model][0],
                    price_output_per_m=PRICES[model][1], **kw)


class Counting:
    """Wraps a handler; counts, per model, the requests answered 200 (the ones that are paid)."""

    def __init__(self, handler):
        self.handler = handler
        self.paid: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, req: StubRequest) -> Reply:
        reply = self.handler(req)
        if reply.status == 200 and not reply.drop and reply.raw_body is None:
            reply.prompt_tokens, reply.completion_tokens = PROMPT_TOKENS, COMPLETION_TOKENS
            with self._lock:
                self.paid[req.body["model"]] = self.paid.get(req.body["model"], 0) + 1
        return reply


def report_actual(ws: Workspace, **spec) -> dict:
    """The report's actual-cost figures, read back from the workspace as phase 7 does."""
    ws.run_record.write_text(json.dumps({"spec": {"dataset": "prompts.jsonl", "work_pool": None, "full": False,
                                                  "target_win_rate": None, **spec}}))
    return collect(ws)["actual"]


def report_rows(ws: Workspace) -> dict[str, str]:
    """The report's "Cost: estimated vs actual" table, rendered by phase 7 (write_report): phase → actual."""
    from preftune.reports.build import write_report

    ws.inspection.write_text(json.dumps({"format": "prompts", "examples": 20, "train_examples": 16,
                                         "test_examples": 4, "token_stats": {}, "warnings": [], "truncated": {}}))
    ws.outcome.write_text(json.dumps({"status": "completed", "deployed": None, "endpoint": None,
                                      "clear_winner": None, "target_met": None}))
    rng = {"low": 0.0, "high": 9.0}
    ws.plan.write_text(json.dumps({"estimate": {"device": "cpu", "total": rng, "phases": {
        "training": rng | {"tokens_low": 0, "tokens_high": 0, "hosted_equivalent_low": 0.0,
                           "hosted_equivalent_high": 0.0},
        "pair_generation": rng, "evaluation": rng}}}))
    rows = {}
    for line in write_report(ws).split("## Cost: estimated vs actual")[1].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0] in ("pair generation", "evaluation", "**total**"):
            rows[cells[0].strip("*")] = cells[2].strip("*")
    return rows


def ledger_usd(ws: Workspace, phase: str) -> float:
    return sum(e["usd"] for e in read_ledger(ws.ledger) if e["phase"] == phase)


# ---- 1. pair generation: money paid in a run that failed part-way is still counted, once ----------
def test_pairs_interrupted_then_resumed_every_paid_request_counted_once(tmp_path: Path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 20)
    ws = Workspace(tmp_path / "ws").ensure()
    outage = {"on": True}

    def script(req: StubRequest) -> Reply:
        i = int(req.last_user[1:])
        if outage["on"] and i >= 5:  # the provider goes down after the first prompts
            return Reply(status=503)
        return Reply(text=f"{req.body['model']} answer {i}")

    server = Counting(script)
    with StubServer(server) as srv:
        strong, weak = priced("big", srv.base_url), priced("small", srv.base_url)

        def run() -> dict:
            return generate_pairs(prompts, strong, weak, ws.pairs_dir, max_tokens=32, concurrency=4,
                                  max_retries=0, timeout=5, cache_dir=ws.pairs_dir / "cache", progress=False,
                                  ledger=ws.ledger)

        first = run()
        assert first["counts"]["by_reason"]["failed"] == 15 and server.paid == {"big": 5, "small": 5}
        assert len(read_ledger(ws.ledger)) == 10  # paid before the outage stopped the run: on record
        outage["on"] = False
        second = run()  # the re-run pays only for what did not finish
        assert second["counts"]["pairs"] == 20
        assert server.paid == {"big": 20, "small": 20}
        third = run()  # everything from the cache: nothing paid, nothing recorded
        assert server.paid == {"big": 20, "small": 20} and third["usage"]["strong"]["cache_hits"] == 20

    entries = read_ledger(ws.ledger)
    assert len(entries) == 40 == sum(server.paid.values())
    assert {e["endpoint"] for e in entries} == {f"big@{srv.base_url}", f"small@{srv.base_url}"}
    assert all(e["phase"] == "pairs" and (e["prompt_tokens"], e["completion_tokens"]) == (70, 30) for e in entries)
    expected = usd("big", 20) + usd("small", 20)  # 20 × $0.16 + 20 × $0.013 = $3.46
    assert ledger_usd(ws, "pairs") == pytest.approx(expected)
    # the last run's provenance alone knows only its own (zero) spending: the ledger knows all of it
    assert third["cost_usd"] == 0.0 and second["cost_usd"] == pytest.approx(usd("big", 15) + usd("small", 15))
    actual = report_actual(ws, strong=strong.public(), weak=weak.public())
    assert actual["pair_generation"] == pytest.approx(expected) and actual["evaluation"] == 0.0
    assert actual["ledger"]["pairs"]["requests"] == 40
    assert report_rows(ws) == {"pair generation": "$3.46", "evaluation": "$0.00", "total": "$3.46"}
    assert "sk-" not in ws.ledger.read_text()


# ---- 1. evaluation: an early-stop evaluation, then the final one replaying it from the cache ---------
def judge_world(req: StubRequest) -> Reply:
    model = req.body["model"]
    if model == "base":
        return Reply(text="Short.")
    if model in ("c1", "c2"):
        return Reply(text=f"A longer answer from {model} about: {req.last_user}")
    if "rubric" in req.last_user.lower() and "Final verdict" not in req.last_user:
        return Reply(text="- Prefer answers that explain their reasoning.\n- Penalise one-word dismissals.")
    return Reply(text="Weighing both.\nFinal verdict: [[A>B]]")


def write_test_prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in QUESTIONS))
    return path


def write_train_pairs(path: Path) -> Path:
    with open(path, "w") as fh:
        for q in QUESTIONS:
            fh.write(json.dumps({"input": {"messages": [{"role": "user", "content": q}]},
                                 "preferred_output": [{"role": "assistant", "content": f"Because: {q}"}],
                                 "non_preferred_output": [{"role": "assistant", "content": "No."}]}) + "\n")
    return path


def test_early_stop_then_final_evaluation_counts_each_judge_request_once(tmp_path: Path):
    ws = Workspace(tmp_path / "ws").ensure()
    test, train = write_test_prompts(tmp_path / "test.jsonl"), write_train_pairs(tmp_path / "train.jsonl")
    server = Counting(judge_world)
    with StubServer(server) as srv:
        judge = priced("judge", srv.base_url)

        def evaluate(candidates: list[str]) -> dict:  # as tasks/evaluate_candidates.py configures it
            return run_evaluation(EvalConfig(
                test_data=test, base_model=f"base@{srv.base_url}", out_dir=ws.eval_base_dir("base"),
                candidates={c: f"{c}@{srv.base_url}" for c in candidates}, auto_rubric=True, train_data=train,
                judge=judge, ledger=ws.ledger, bootstrap_resamples=1000))

        early = evaluate(["c1"])  # the early-stop evaluation after the first job finished
        assert server.paid["judge"] == 1 + 6 * 2  # the rubric, 6 comparisons × 2 orders
        final = evaluate(["c1", "c2"])  # the final one: c1 and the rubric from the cache, c2 paid
        assert server.paid["judge"] == 1 + 2 * 6 * 2
    assert early["models"]["c1"]["wins"] == final["models"]["c1"]["wins"]
    # what the counters of the final run saw: only c2's judgments (the early ones came from the cache)
    assert final["judge_usage"]["succeeded"] == 12 and final["judge_usage"]["cache_hits"] == 13

    entries = read_ledger(ws.ledger)
    by_phase = {p: [e for e in entries if e["phase"] == p] for p in ("rubric", "evaluation", "completions")}
    assert (len(by_phase["rubric"]), len(by_phase["evaluation"])) == (1, 24)
    assert len(by_phase["completions"]) == 3 * 6 == server.paid["base"] + server.paid["c1"] + server.paid["c2"]
    assert all(e["usd"] is None for e in by_phase["completions"])  # unpriced endpoints: unknown, not $0
    expected = usd("judge", server.paid["judge"])  # 25 × $0.08 = $2.00
    assert ledger_usd(ws, "rubric") + ledger_usd(ws, "evaluation") == pytest.approx(expected)
    actual = report_actual(ws, judge=judge.public())
    assert actual["evaluation"] == pytest.approx(expected) and actual["total"] == pytest.approx(expected)
    assert actual["ledger"]["completions"]["usd"] is None
    assert report_rows(ws) == {"pair generation": "$0.00", "evaluation": "$2.00", "total": "$2.00"}
    report = ws.report.read_text()
    assert "- rubric: 1 requests" in report and "- evaluation: 24 requests" in report
    assert "- completions: 18 requests" in report and "unknown (unpriced: base@" in report
    assert actual["ledger"]["completions"]["unpriced"] == [f"base@{srv.base_url}", f"c1@{srv.base_url}",
                                                            f"c2@{srv.base_url}"]


def test_an_unpriced_judge_makes_the_evaluation_cost_unknown(tmp_path: Path):
    ws = Workspace(tmp_path / "ws").ensure()
    test = write_test_prompts(tmp_path / "test.jsonl")
    server = Counting(judge_world)
    with StubServer(server) as srv:
        judge = Endpoint(model="judge", base_url=srv.base_url)
        run_evaluation(EvalConfig(test_data=test, base_model=f"base@{srv.base_url}", out_dir=ws.eval_base_dir("base"),
                                  candidates={"c1": f"c1@{srv.base_url}"}, rubric="Be thorough.", judge=judge,
                                  ledger=ws.ledger, bootstrap_resamples=1000))
    actual = report_actual(ws, judge=judge.public())
    assert actual["evaluation"] is None and actual["total"] is None
    assert report_rows(ws)["evaluation"] == "unknown (unpriced endpoint)"
    assert actual["ledger"]["evaluation"]["requests"] == server.paid["judge"] == 12


# ---- 2. judge replies without a verdict are asked again on a re-run (bounded) ------------------------
def test_invalid_judge_replies_are_asked_again_after_the_judge_is_fixed(tmp_path: Path):
    test = write_test_prompts(tmp_path / "test.jsonl")
    state = {"broken": True}

    def world(req: StubRequest) -> Reply:
        if req.body["model"] == "judge" and state["broken"]:
            return Reply(text="I think both are fine.")  # no [[verdict]]
        return judge_world(req)

    server = Counting(world)
    with StubServer(server) as srv:
        cfg = EvalConfig(test_data=test, base_model=f"base@{srv.base_url}", out_dir=tmp_path / "eval",
                         candidates={"c1": f"c1@{srv.base_url}"}, rubric="Be thorough.",
                         judge=Endpoint.parse(f"judge@{srv.base_url}"), bootstrap_resamples=1000)
        broken = run_evaluation(cfg)
        assert server.paid["judge"] == 12 and broken["models"]["c1"]["invalid"] == 6
        state["broken"] = False
        fixed = run_evaluation(cfg)
        assert server.paid["judge"] == 24  # the invalid replies were not final: asked again
        assert fixed["models"]["c1"]["invalid"] == 0 and fixed["models"]["c1"]["wins"] == 0
        assert fixed["models"]["c1"]["ties"] == 6  # A>B in both orders: the orders disagree → tie
        run_evaluation(cfg)
        assert server.paid["judge"] == 24  # valid verdicts are final: answered by the cache


def test_a_judge_that_never_answers_properly_is_asked_a_bounded_number_of_times(tmp_path: Path):
    test = write_test_prompts(tmp_path / "test.jsonl")

    def world(req: StubRequest) -> Reply:
        return Reply(text="No opinion.") if req.body["model"] == "judge" else judge_world(req)

    server = Counting(world)
    with StubServer(server) as srv:
        cfg = EvalConfig(test_data=test, base_model=f"base@{srv.base_url}", out_dir=tmp_path / "eval",
                         candidates={"c1": f"c1@{srv.base_url}"}, rubric="Be thorough.",
                         judge=Endpoint.parse(f"judge@{srv.base_url}"), bootstrap_resamples=1000)
        sent = []
        for _ in range(4):
            scores = run_evaluation(cfg)
            sent.append(server.paid["judge"])
            assert scores["models"]["c1"]["invalid"] == 6
    assert sent == [12, 24, 36, 36]  # the first ask and 2 re-asks per request, then the reply stands
    cache = ResponseCache(tmp_path / "eval" / "judge_cache")
    # one entry per request (the most re-asked wins), its count recorded: 12 judge requests rejected 3
    # times each; the 12 endpoint completions share the folder and are final
    rejected = [(cache.get(k) or {}).get("rejected") for k in cache._index]
    assert len(cache) == 24 and rejected.count(3) == 12 and rejected.count(None) == 12


# ---- 3. a refused key stops the phase after a few requests -------------------------------------------
def refuse(model: str, inner):
    def handler(req: StubRequest) -> Reply:
        if req.body["model"] == model:
            return Reply(status=401, text="Incorrect API key provided", delay=0.05)
        return inner(req)
    return handler


def test_pairs_cli_stops_at_a_refused_key(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("PREFTUNE_STRONG_KEY", "sk-wrong-0123456789")
    prompts = write_prompts(tmp_path / "prompts.jsonl", 40)
    with StubServer(refuse("big", lambda req: Reply(text=f"small answer {req.last_user}", delay=0.05))) as srv:
        code = main(["pairs", "--prompts", str(prompts), "--strong", f"big@{srv.base_url}",
                     "--strong-api-key-env", "PREFTUNE_STRONG_KEY", "--weak", f"small@{srv.base_url}",
                     "--out", str(tmp_path / "pairs"), "--concurrency", "4", "--max-retries", "2"])
        refused = [r for r in srv.requests if r["model"] == "big"]
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"preftune pairs: error: authentication failed for big at {srv.base_url}: "
                   "check $PREFTUNE_STRONG_KEY\n")
    assert 1 <= len(refused) <= 4 + 2  # at most the requests already in flight, not 40 (nor 40 × 3)
    assert "sk-wrong" not in "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())


def test_evaluate_cli_stops_at_a_refused_judge_key(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("PREFTUNE_JUDGE_KEY", "sk-wrong-0123456789")
    test = write_test_prompts(tmp_path / "test.jsonl")
    with StubServer(refuse("judge", judge_world)) as srv:
        code = main(["evaluate", "--test", str(test), "--base", f"base@{srv.base_url}",
                     "--candidate", f"c1=c1@{srv.base_url}", "--candidate", f"c2=c2@{srv.base_url}",
                     "--rubric", "Be thorough.", "--judge", f"judge@{srv.base_url}",
                     "--judge-api-key-env", "PREFTUNE_JUDGE_KEY", "--judge-concurrency", "4",
                     "--out", str(tmp_path / "eval")])
        refused = [r for r in srv.requests if r["model"] == "judge"]
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"preftune evaluate: error: authentication failed for judge at {srv.base_url}: "
                   "check $PREFTUNE_JUDGE_KEY\n")
    assert 1 <= len(refused) <= 4 + 2  # of 2 candidates × 6 prompts × 2 orders = 24
    assert not (tmp_path / "eval" / "scores.json").exists()


def test_in_the_flow_a_refused_key_ends_the_pairs_phase_with_that_line(tmp_path: Path, monkeypatch):
    """The flow's phase 3 (pairs_phase): the run ends failed with the one line; what the other,
    working generator was paid before the stop is in the workspace's ledger."""
    from preftune.errors import RunEnded
    from preftune.spec import RunSpec
    from preftune.tasks.pairs import pairs_phase

    monkeypatch.setenv("PREFTUNE_STRONG_KEY", "sk-wrong-0123456789")
    ws = Workspace(tmp_path / "ws")
    ws.data_dir.mkdir(parents=True)
    write_prompts(ws.train_data, 30)
    write_prompts(ws.test_data, 10)
    inspection = {"format": "prompts", "train_examples": 30, "test_examples": 10}
    server = Counting(refuse("big", lambda req: Reply(text=f"small answer {req.last_user}")))
    with StubServer(server) as srv:
        spec = RunSpec(dataset=str(tmp_path / "p.jsonl"), workspace=str(ws.root),
                       strong=Endpoint(model="big", base_url=srv.base_url, api_key_env="PREFTUNE_STRONG_KEY"),
                       weak=priced("small", srv.base_url))
        with pytest.raises(RunEnded) as end:
            pairs_phase(spec, ws, inspection)
        refused = [r for r in srv.requests if r["model"] == "big"]
    assert end.value.status == "failed"
    assert end.value.reason == f"authentication failed for big at {srv.base_url}: check $PREFTUNE_STRONG_KEY"
    assert 1 <= len(refused) <= 16 + 2  # the default concurrency, not 40
    entries = read_ledger(ws.ledger)
    settled = [e for e in entries if e.get("settled", True) and e["endpoint"].startswith("small@")]
    assert len(settled) == server.paid.get("small", 0)  # every answer paid for is on record with its usage
    assert sum(e["usd"] for e in settled) == pytest.approx(usd("small", server.paid.get("small", 0)))
    # requests cut off in flight by the stop count at their worst case: sent is possibly spent
    assert len(entries) >= len(settled)
    assert not ws.pairs_done.exists()


# ---- 4. the cap is held as requests are reserved; a line that is not a ledger line is refused --------
def test_reservations_hold_the_cap_and_settle_once(tmp_path: Path):
    """Plain arithmetic on the ledger file: each reservation $0.30 (10,000 + 10,000 tokens at $10/$20
    per 1M), settled at $0.05 (2,500 + 1,250). A cap of $1: three reservations fit ($0.90), a fourth
    would make $1.20; once one is settled ($0.65 committed) it fits, a fifth ($1.25) does not, and from
    then on nothing leaves (the phase is ending) until a cap is set again."""
    from preftune.ledger import BudgetReached, Ledger

    ep = Endpoint(model="m", base_url="http://127.0.0.1:9/v1", price_input_per_m=10.0, price_output_per_m=20.0)
    book = Ledger(tmp_path / "ledger.jsonl", "pairs")
    book.set_cap(1.0)
    holds = [book.reserve(ep, 10_000, 10_000) for _ in range(3)]
    with pytest.raises(BudgetReached) as end:
        book.reserve(ep, 10_000, 10_000)
    assert end.value.status == "failed"
    assert str(end.value) == (f"budget cap $1.00 reached: $0.90 spent or reserved ({tmp_path / 'ledger.jsonl'}); "
                              "the next request (up to $0.3000) was not sent")
    book.set_cap(1.0)  # a new approval of the same cap: requests that fit may leave again
    holds[0].settle(ep, 2_500, 1_250)
    holds[0].settle(ep, 2_500, 1_250)  # a second settlement of the same request counts once
    assert book.totals() == (1.0, pytest.approx(0.65))
    holds.append(book.reserve(ep, 10_000, 10_000))  # 0.65 + 0.30 = 0.95 <= 1
    with pytest.raises(BudgetReached):
        book.reserve(ep, 10_000, 10_000)
    with pytest.raises(BudgetReached):  # even one that would fit: nothing more leaves at the cap
        book.reserve(ep, 1, 1)
    holds[1].release("http 503")  # the server refused it: nothing billed
    entries = read_ledger(book.path)
    assert [e["settled"] for e in entries] == [True, False, False]  # one settled, two still in flight
    assert sum(e["usd"] for e in entries) == pytest.approx(0.05 + 0.30 + 0.30)
    # a second process reading the same file sees the same figures (the file is the record, not memory)
    from preftune import ledger as ledger_module

    ledger_module._TALLIES.clear()
    assert Ledger(book.path, "pairs").totals() == (1.0, pytest.approx(0.65))


@pytest.mark.parametrize(("line", "problem"), [
    ("[]", "expected a JSON object, got []"),
    ('{"time": "t", "phase": "pairs", "endpoint": "e", "prompt_tokens": 1, "completion_tokens": 1, "usd": "free"}',
     "usd: Input should be a valid number"),
    ('{"time": "t", "phase": "pairs", "endpoint": "e", "prompt_tokens": 1, "completion_tokens": 1, "usd": -40.0}',
     "usd: Input should be greater than or equal to 0"),
    ('{"time": "t", "kind": "settled", "phase": "pairs", "endpoint": "e", "prompt_tokens": 1, "completion_tokens": 1, '
     '"usd": 1}', "a settled line names its request"),
    ('{"time": "t", "kind": "refund", "usd": 5}', 'kind: unknown value "refund"'),
])
def test_a_line_that_is_not_a_ledger_line_is_refused_naming_it(tmp_path: Path, line: str, problem: str):
    path = tmp_path / "ledger.jsonl"
    good = ('{"time": "t", "phase": "pairs", "endpoint": "e", "prompt_tokens": 1, "completion_tokens": 2, '
            '"usd": 0.5}\n')
    path.write_text(good + '{"time": "t", "phase": "pa\n' + line + "\n")  # line 2: cut short by a crash
    before = path.read_bytes()
    with pytest.raises(UserError) as err:
        read_ledger(path)
    assert str(err.value).startswith(f"{path}:3: not a valid ledger line: {problem}")
    assert "\n" not in str(err.value)
    assert path.read_bytes() == before  # never rewritten
    path.write_text(good + '{"time": "t", "phase": "pa\n')  # a torn line alone is skipped, not refused
    assert [e["usd"] for e in read_ledger(path)] == [0.5]
