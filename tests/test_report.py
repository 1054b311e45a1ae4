"""The final report and the deploy question, on the files of one real run.

One flow run under the real Prefect API (module fixture): tiny-llama, 3 betas of which the approver
drops one, trained hard enough (lr 5e-3, 2 epochs) that every held-out answer changes, scored by the
bundled Python evaluator; the person deploys the candidate with the lowest win rate, as in the issue
that asked for this report (a deployed model that lost to its base). The judge cases re-run phase 5
on copies of that workspace with a scripted judge (its completions come from the cache, nothing is
generated again) that prefers the tuned answers (won) or the base answers (lost).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from preftune.endpoint import Endpoint
from preftune.judges import selection
from preftune.paths import EXAMPLES_DIR
from preftune.reports.build import comparison_markdown, write_report
from preftune.spec import RunSpec
from preftune.tasks.evaluate_candidates import evaluate_candidates
from preftune.workspace import Workspace
from tests.flow_helpers import answer, artifact_data, start_flow, wait_for_end, wait_for_question
from tests.stub_server import Reply, StubServer
from tests.test_evaluate import BLOCK

pytestmark = pytest.mark.usefixtures("prefect_api")

EVALUATOR = "preftune.judges.builtin:answer_quality"
DATA_URI = re.compile(r"!\[[^\]]*\]\((data:image/png;base64,([A-Za-z0-9+/=]+))\)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# A table line holds at most this many Markdown characters. Measured in Chromium at a 1280 px window,
# the Prefect UI's artifact view gives its Markdown ~1,000 px; at ~7.5 px a character and ~16 px of
# padding a cell, 8 columns of 120 characters in all (pipes and backticks included, which do not
# render) fit with room to spare. Job ids of real model names (`Qwen2.5-1.5B-Instruct-dpo-b0.05`)
# stay inside it.
MAX_TABLE_LINE = 120
MAX_COLUMNS = 8


@pytest.fixture(scope="module")
def run(zoo, tmp_path_factory) -> dict:
    """The finished run: {"ws": workspace, "outcome", "deployed", "comparison": the question's text}."""
    root = tmp_path_factory.mktemp("report")
    lines = (EXAMPLES_DIR / "pairs.jsonl").read_text(encoding="utf-8").splitlines()[:60]
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ws = root / "ws"
    spec = RunSpec(dataset=str(root / "pairs.jsonl"), workspace=str(ws), base_models=[zoo["models"]["tiny-llama"]],
                   betas=[0.1, 0.3, 0.5], evaluator=EVALUATOR, epochs=2, batch_size=8, max_length=128,
                   eval_max_new_tokens=24, max_eval_prompts=12, lr=5e-3, target_win_rate=None,
                   max_concurrent_jobs=2, approval_poll_s=1, approval_timeout_s=600)
    fut = start_flow(spec)
    answer(ws, fut, "decision", {"decision": "approve", "drop_betas": [0.5]})
    try:
        wait_for_question(ws, fut, timeout=900)
        scores = json.loads((ws / "eval/scores.json").read_text())
        worst = min(scores["models"], key=lambda m: (scores["models"][m]["win_rate"], m))
        answer(ws, fut, "deploy", {"deploy": worst})
        outcome = wait_for_end(ws, fut, timeout=900)
        assert outcome["status"] == "completed" and outcome["deployed"] == worst, outcome
        yield {"ws": ws, "outcome": outcome, "deployed": worst, "comparison": artifact_data("approval-comparison")[0]}
    finally:
        from preftune.tasks.deploy import stop_deployment

        stop_deployment(ws)


def _section(markdown: str, heading: str) -> str:
    """The text of one `## heading` section, up to the next `## `."""
    start = markdown.index(f"\n## {heading}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start:end if end >= 0 else None].strip()


def _tables(markdown: str) -> list[list[str]]:
    """Every Markdown table, as its lines."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _kind(line: str) -> str:
    if not line.strip():
        return "blank"
    for prefix, kind in (("|", "table"), (">", "quote"), ("- ", "list"), ("#", "heading")):
        if line.startswith(prefix):
            return kind
    return "text"


def _quotes(block: str) -> list[str]:
    """The texts of the block quotes in ``block`` (a quote: consecutive lines starting with '>')."""
    out, current = [], []
    for line in block.splitlines() + [""]:
        if line.startswith(">"):
            current.append(line[2:] if line.startswith("> ") else "")
        elif current:
            out.append(html.unescape("\n".join(current)))
            current = []
    return out


CELL = re.compile(r'<td valign="top"[^>]*>(.*?)</td>')


def _answer_cells(block: str) -> list[str]:
    """The two answers of a side-by-side table, unescaped, without the notes under them."""
    return [html.unescape(re.split(r"<br><(?:em|strong)>", c)[0].replace("<br>", "\n")) for c in CELL.findall(block)]


def _check_layout(markdown: str, with_tables: bool = True) -> None:
    """Tables narrow enough for a 1280 px window, with a real header; blocks that do not run together.
    ``with_tables=False``: a text that must have none (the approval modal is too narrow for one)."""
    tables = _tables(markdown)
    assert bool(tables) is with_tables
    for table in tables:
        header = _cells(table[0])
        assert set(table[1].replace("|", "").replace("-", "")) <= {""}, table[:2]  # the delimiter row
        assert all(header), f"a table with an empty header cell: {table[0]}"
        for line in table:
            assert len(_cells(line)) == len(header) <= MAX_COLUMNS, line
            assert len(line) <= MAX_TABLE_LINE, f"{len(line)} characters: {line}"
    lines = markdown.splitlines()
    fence = False
    for before, line in zip(lines, lines[1:], strict=False):
        fence ^= line.startswith("```")
        if fence or not line.strip():
            continue
        # A table, list, quote or heading must be followed by a blank line before plain text, and
        # a table must start after one: otherwise Markdown glues the text onto the block before it.
        a, b = _kind(before), _kind(line)
        assert not (b == "text" and a in ("table", "quote", "list", "heading")), f"runs together:\n{before}\n{line}"
        assert not (b == "table" and a not in ("table", "blank")), f"table glued to text:\n{before}\n{line}"
    prose = re.sub(r"`[^`]*`", "", re.sub(r"```.*?```", "", markdown, flags=re.S))
    assert not re.search(r"[\w)]\.[A-Z][a-z]", prose), "sentences run together"


def _report(ws: Path) -> tuple[str, str]:
    """(final_report.md, the artifact's Markdown), rendered again from the workspace."""
    artifact = write_report(Workspace(ws))
    return (ws / "final_report.md").read_text(encoding="utf-8"), artifact


def test_artifact_embeds_the_figures_and_the_file_links_them(run):
    ws = run["ws"]
    published = artifact_data("final-report")[0]  # what the flow published in the Prefect API
    report, artifact = _report(ws)
    assert artifact == published
    images = DATA_URI.findall(artifact)
    assert len(images) == 2
    for _, b64 in images:
        raw = base64.b64decode(b64, validate=True)
        assert raw.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(raw)) as image:
            image.verify()
        with Image.open(io.BytesIO(raw)) as image:
            assert image.size == (614, 307)
        assert len(raw) < 40_000  # stored in the Prefect database: small (about 10 KB measured)
    assert "](figures/" not in artifact and "figures/" not in "".join(LINK.findall(artifact))
    links = LINK.findall(report)
    assert sorted(links) == ["figures/loss.png", "figures/margins.png"]
    for target in links:
        assert (ws / target).is_file() and (ws / target).read_bytes().startswith(b"\x89PNG")
    # the two renderings differ only in where the images come from
    for (uri, _), target in zip(DATA_URI.findall(artifact), ["figures/loss.png", "figures/margins.png"], strict=True):
        artifact = artifact.replace(uri, target)
    assert artifact == report


def test_tables_fit_and_blocks_do_not_run_together(run):
    report, _ = _report(run["ws"])
    _check_layout(report)
    summary = _section(report, "Summary")
    assert summary.splitlines()[2:4] == ["| item | value |", "|---|---|"]
    sweep = _tables(_section(report, "Sweep"))
    assert len(sweep) == 2 and all(len(t) == 2 + 2 for t in sweep)  # both tables: one row per approved job
    evaluation = _tables(_section(report, "Evaluation"))
    assert len(evaluation) == 1 and len(evaluation[0]) == 2 + 3  # the base and its 2 candidates
    _check_layout(run["comparison"], with_tables=False)


def test_what_changed_shows_five_prompts_with_both_answers_and_the_scores(run):
    ws, deployed = run["ws"], run["deployed"]
    report, _ = _report(ws)
    section = _section(report, "What changed")
    blocks = section.split("\n### Prompt ")[1:]
    assert len(blocks) == 5
    info = json.loads((ws / "eval/tiny-llama/scores.json").read_text())["models_info"]
    answers = {name: [json.loads(x)["completion"] for x in Path(info[name]["completions"]).read_text().splitlines()]
               for name in ("base", deployed)}
    scores = {}
    for x in (ws / "eval/tiny-llama/evaluator_scores.jsonl").read_text().splitlines():
        row = json.loads(x)
        scores.setdefault(row["key"].split(":")[0], []).append(round(row["score"], 3))
    assert f"the deployed candidate `{deployed}`" in section
    for block in blocks:
        assert f"<th align=\"left\">Base model <code>tiny-llama</code></th><th align=\"left\"><code>{deployed}</code> " \
               "(deployed)</th>" in block
        assert len(_quotes(block)) == 1  # the prompt; the answers sit side by side in the table below it
        base_answer, tuned_answer = _answer_cells(block)
        assert base_answer in [a.strip() for a in answers["base"]]
        assert tuned_answer in [a.strip() for a in answers[deployed]]
        assert base_answer != tuned_answer and "(identical answers)" not in block
        m = re.search(r"\*\*Evaluator:\*\* (\d\.\d{3}) for `[^`]+`, (\d\.\d{3}) for the base model", block)
        assert m, block
        tuned_score, base_score = float(m.group(1)), float(m.group(2))
        assert tuned_score in scores[deployed] and base_score in scores["base"]
        heading = block.splitlines()[0]
        expect = ("the tuned answer wins" if tuned_score > base_score else "the base answer wins"
                  if tuned_score < base_score else "a tie")
        assert heading in (f"{block[0]}: {expect}", f"{block[0]}: {expect} (an answer was cut at the token limit)")


def test_warning_when_the_deployed_model_did_not_beat_its_base(run):
    ws, deployed = run["ws"], run["deployed"]
    report, artifact = _report(ws)
    entry = json.loads((ws / "eval/scores.json").read_text())["models"][deployed]
    assert entry["win_rate"] <= 0.5  # the weakest candidate of this run lost (0.222 measured)
    head = report.split("## Summary")[0]
    assert f"> ⚠ **Warning: the deployed model `{deployed}` is not shown to be better than its base model.**" in head
    vs = json.loads((ws / "eval/scores.json").read_text())["selection"]["vs_base"][deployed]
    assert not vs["above"] and f"its per-prompt score minus its base's averages {vs['diff']:.3f}, 95% CI [" in head
    assert f"`{deployed}` ⚠ not better than its base" in _section(report, "Summary")
    assert artifact.split("## Summary")[0] == head


def _judge_copy(run: dict, dest: Path, prefer: str) -> tuple[Path, dict]:
    """A copy of the run's workspace (its deployed server left alone) whose phase 5 is done again by a
    scripted judge preferring the tuned answers (prefer="tuned") or the base's ("base")."""
    src = run["ws"]
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("deploy", "logs", ".preftune.lock"))
    ws = Workspace(dest)
    info = json.loads((src / "eval/tiny-llama/scores.json").read_text())["models_info"]
    base_answers = {json.loads(x)["completion"] for x in Path(info["base"]["completions"]).read_text().splitlines()}

    def judge(req) -> Reply:
        r = {m.group(1): m.group(3) for m in BLOCK.finditer(req.last_user)}
        a_base, b_base = r["A"] in base_answers, r["B"] in base_answers
        if a_base == b_base:  # the labelled validity pairs: neither side is the base's answer
            return Reply(text="Final verdict: [[A=B]]")
        tuned_is_a = b_base
        return Reply(text=f"Final verdict: [[{'A>B' if tuned_is_a == (prefer == 'tuned') else 'B>A'}]]")

    spec = RunSpec.model_validate(json.loads((src / "run.json").read_text())["spec"])
    jobs = [r["job"] for r in json.loads((src / "jobs/sweep.json").read_text()) if r["status"] == "finished"]
    with StubServer(judge) as srv:
        spec = spec.model_copy(update={"evaluator": None, "rubric": "Prefer the better answer.",
                                       "judge": Endpoint(model="judge", base_url=srv.base_url)})
        scores = evaluate_candidates(spec, ws, "rubric", jobs)
    assert all(m["generated"] == 0 for m in json.loads((dest / "eval/tiny-llama/scores.json").read_text())
               ["models_info"].values())  # every completion came from the run's cache
    return dest, scores


@pytest.mark.parametrize("prefer", ["tuned", "base"])
def test_judge_verdicts_and_the_warning_follow_who_won(run, tmp_path, prefer):
    ws, scores = _judge_copy(run, tmp_path / "ws", prefer)
    deployed = run["deployed"]
    entry = scores["models"][deployed]
    won = prefer == "tuned"
    assert (entry["win_rate"], entry["ci_low"]) == ((1.0, 1.0) if won else (0.0, 0.0))  # every answer differs
    report, artifact = _report(ws)
    _check_layout(report)
    warned = "is not shown to be better than its base model" in report
    assert warned is not won and ("⚠ not better than its base" in artifact) is not won
    blocks = _section(report, "What changed").split("\n### Prompt ")[1:]
    assert len(blocks) == 5
    judged = {json.loads(x)["key"]: json.loads(x) for x in
              (ws / "eval/tiny-llama/judgments" / f"{deployed}.jsonl").read_text().splitlines()}
    tokens = ("A>B", "B>A") if won else ("B>A", "A>B")
    for block in blocks:
        assert ("the tuned answer wins" if won else "the base answer wins") in block.splitlines()[0]
        assert (f"**Judge:** {'win' if won else 'loss'} for `{deployed}`; verdict with the tuned answer as A: "
                f"`{tokens[0]}`, with the base answer as A: `{tokens[1]}`.") in block
    assert {r["outcome"] for r in judged.values()} == {"win" if won else "loss"}
    comparison = comparison_markdown(scores, selection.recommended(scores))
    _check_layout(comparison, with_tables=False)
    if won:  # both candidates won every prompt: a recommendation, named the same way everywhere
        rec = selection.recommended(scores)
        assert rec in scores["models"] and f"**Recommended: deploy `{rec}`** (★)" in comparison
        assert f"- `{rec}` ★: win rate vs base" in comparison and f"- `recommended`: deploy `{rec}`" in comparison
    else:
        assert "**Recommended: deploy nothing.**" in comparison and "★" not in comparison
        assert "- `recommended`: deploy nothing (the same as `none`)" in comparison
    assert "- **base `tiny-llama`**: win rate 0.5 (the reference)" in comparison


def test_comparison_question_shows_the_base_scores_and_names_the_recommendation(run):
    ws, text = run["ws"], run["comparison"]
    scores = json.loads((ws / "eval/scores.json").read_text())
    assert text == comparison_markdown(scores, selection.recommended(scores))
    base = scores["bases"]["tiny-llama"]
    assert f"- **base `tiny-llama`**: mean score {base['mean_score']:.3f} [{base['ci_low']:.3f}, {base['ci_high']:.3f}]\n" in text
    for name, m in scores["models"].items():
        assert f"- `{name}`: mean score {m['mean_score']:.3f} [" in text  # no star: nothing is recommended here
    assert "|" not in text  # no table: the approval modal is narrow
    assert selection.recommended(scores) is None  # both candidates lost in this run
    assert "**Recommended: deploy nothing.**" in text and "- `recommended`: deploy nothing" in text
    assert ("**No significant winner: no candidate beats its base (no 95% CI of the difference from its base is "
            "above 0).** Rule: paired bootstrap") in text
    assert "\n\n**Recommended: deploy nothing.** No candidate beats its base" in text


def test_plan_versus_actual_tokens_after_a_dropped_beta(run):
    ws = run["ws"]
    plan = json.loads((ws / "plan.json").read_text())
    approved = plan["approved"]
    assert [j["id"] for j in plan["jobs"]] == ["tiny-llama-dpo-b0.1", "tiny-llama-dpo-b0.3", "tiny-llama-dpo-b0.5"]
    assert approved["jobs"] == ["tiny-llama-dpo-b0.1", "tiny-llama-dpo-b0.3"]
    assert approved["dropped"] == ["tiny-llama-dpo-b0.5"]
    full, kept = plan["estimate"]["phases"]["training"], approved["estimate"]["phases"]["training"]
    # the same base model and data for every job: 2 of the 3 jobs' tokens
    assert kept["tokens_low"] == pytest.approx(full["tokens_low"] * 2 / 3, abs=1)
    assert kept["tokens_high"] == pytest.approx(full["tokens_high"] * 2 / 3, abs=1)
    sweep = json.loads((ws / "jobs/sweep.json").read_text())
    actual = sum(r["summary"]["train_tokens"] for r in sweep)
    assert kept["tokens_low"] * 0.8 <= actual <= kept["tokens_high"]  # the estimate is of the jobs that ran
    report, _ = _report(ws)
    cost = _section(report, "Cost: estimated vs actual")
    assert "Estimates are for the 2 approved jobs of the plan's 3; dropped at approval: `tiny-llama-dpo-b0.5`." in cost
    assert f"| planned: the full grid | 3 | {full['tokens_low']:,}–{full['tokens_high']:,} |" in cost
    assert f"| estimated: the approved jobs | 2 | {kept['tokens_low']:,}–{kept['tokens_high']:,} |" in cost
    assert f"| actual | 2 finished | {actual:,} |" in cost


def test_the_stop_instruction_stops_the_endpoint(run):
    """Last in this module: it stops the run's deployed server with the command the report gives."""
    from preftune.server import healthy

    ws = run["ws"]
    endpoint = json.loads((ws / "deploy/endpoint.json").read_text())
    assert healthy(endpoint["port"])
    report = (ws / "final_report.md").read_text()
    section = _section(report, "How to stop the endpoint")
    command = re.search(r"```bash\n(.+)\n```", section).group(1)
    assert command.startswith("preftune deploy --stop --workspace ") and f"pid {endpoint['pid']}" in section
    argv = shlex.split(command)
    done = subprocess.run([str(Path(sys.executable).parent / argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"stopped server pid {endpoint['pid']} ({endpoint['base_url']})"
    assert not healthy(endpoint["port"])
    assert json.loads((ws / "deploy/endpoint.json").read_text())["stopped_at"]
    report, _ = _report(ws)
    assert "The server was stopped at" in _section(report, "How to stop the endpoint")
    assert "## Calling the deployed model" not in report


def test_long_answers_are_cut_with_a_note_and_stay_quoted(run, tmp_path):
    """A long, multi-line answer holding Markdown and HTML (rewritten into a copy's completion cache):
    cut at a word with the full length named, every line inside its quote, nothing interpreted."""
    from preftune.reports.changes import ANSWER_CHARS

    ws = tmp_path / "ws"
    shutil.copytree(run["ws"], ws, ignore=shutil.ignore_patterns("deploy", "logs", ".preftune.lock"))
    info = json.loads((ws / "eval/tiny-llama/scores.json").read_text())["models_info"][run["deployed"]]
    cache = ws / "eval/tiny-llama/completions" / Path(info["completions"]).name
    rows = [json.loads(x) for x in cache.read_text().splitlines()]
    long = "\n".join(f"| row {i} | <b>bold</b> & ## not a heading: word word word word word word" for i in range(60))
    rows[0]["completion"] = long
    cache.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report, _ = _report(ws)
    _check_layout(report)
    section = _section(report, "What changed")
    block = next(b for b in section.split("\n### Prompt ")[1:] if "row 0" in b)
    cell = next(c for c in CELL.findall(block) if "row 0" in c)
    shown = _answer_cells(f'<td valign="top">{cell}</td>')[0]
    assert long.startswith(shown) and len(shown) <= ANSWER_CHARS
    assert f"<br><em>… shortened here: {len(long):,} characters in full.</em>" in cell
    assert "<b>" not in block and "&lt;b&gt;bold&lt;/b&gt; &amp; ## not a heading" in cell
    assert "\n\n" not in cell  # a blank line would end the HTML block: line breaks are <br>


def test_the_warning_rule_on_the_run_scores(run):
    """not_better on this run's scores, with the selection rule's verdict on the deployed entry moved
    across its limit (the paired bootstrap's CI of the difference from the base against 0)."""
    from preftune.reports.changes import not_better

    scores = json.loads((run["ws"] / "eval/scores.json").read_text())
    deployed = run["deployed"]
    outcome = {"deployed": deployed}

    def reasons(**vs) -> list[str]:
        changed = json.loads(json.dumps(scores))
        changed["selection"]["vs_base"][deployed].update(vs)
        return not_better(outcome, changed)

    assert reasons(diff=0.1, ci_low=0.02, ci_high=0.2, above=True) == []
    assert reasons(diff=0.1, ci_low=-0.02, ci_high=0.2, above=False, n=12) == [
        "its per-prompt score minus its base's averages 0.100, 95% CI [-0.020, 0.200] (paired bootstrap over "
        "12 prompts): not above 0"]
    assert reasons(diff=None, ci_low=None, ci_high=None, above=False) == [
        "no held-out prompt gave a valid comparison with its base"]
    old = json.loads(json.dumps(scores))
    del old["selection"]  # a workspace written before the rule: its win rate against 0.5
    old["models"][deployed].update(win_rate=0.6, ci_low=0.45, ci_high=0.8)
    assert not_better(outcome, old) == ["the 95% CI of its win rate, [0.450, 0.800], includes 0.5: the gain may be chance"]
    assert not_better({"deployed": "base"}, scores) == [] and not_better({"deployed": None}, scores) == []
