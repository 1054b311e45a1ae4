"""The Prefect UI journey in a real browser: `preftune up` (a real Prefect server and the served
deployments), headless Debian Chromium driven by playwright, in the UI a browser lands on (Prefect
3.8's V2 UI, its default). A person's path: the deployment's custom-run form starts a run (a bad field
first, refused where the person looks), the plan question is answered in the UI (and every later
one), the run ends Completed, and the final-report artifact renders: every image loaded, every
section there.

Screenshots of each step are kept under the test's tmp folder (the path is printed)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from preftune.paths import EXAMPLES_DIR
from tests.test_signals import PREFTUNE, wait_for

CHROMIUM = "/usr/bin/chromium"
# Flags measured to work here (docs: /work/shared/ENVIRONMENT.md "Browsers"); a fresh profile per test.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
# What to answer at each question the run asks, by the field that holds its decision.
ANSWERS = {"Decision": {"approve", "deploy it", "continue"}, "Deploy": {"recommended"}}
# A guard against a hang only: the run fails when it shows no activity (no log line, no card refreshed) for
# this long. Its length depends on the machine's load (a few minutes quiet; over 15 at load 25).
RUN_TIMEOUT_S = 900
_AUTH: list[tuple[str, str]] = []  # (user, password) of the server the `ui` fixture started


def _auth() -> tuple[str, str]:
    return _AUTH[0]


def _log_in(page, ui_url: str, shot) -> None:
    """What the owner does once per browser: the address `preftune up` printed, which lands on the V2
    UI's Login page; the auth string as the password."""
    page.goto(ui_url, wait_until="networkidle")
    page.wait_for_url(re.compile(r".*/v2/login.*"))  # the server's redirect to V2, then the UI's to its login
    page.locator("input[type=password]").fill(":".join(_auth()))
    page.get_by_role("button", name="Login").click()
    page.wait_for_url(lambda url: "/login" not in url)
    shot(page, "logged-in")


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """`preftune up` on a free port with its own SQLite home (one for this module's tests)."""
    from preftune.server import free_port

    tmp_path = tmp_path_factory.mktemp("up")
    api = f"http://127.0.0.1:{free_port()}/api"
    log = tmp_path / "up.log"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen(PREFTUNE + ["up", "--home", str(tmp_path / "prefect-home")], stdout=out,
                                stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True)
    try:
        wait_for(lambda: "being served" in log.read_text() or proc.poll() is not None, 900, "preftune up")
        assert proc.poll() is None, log.read_text()
        # The server asks for the auth string `preftune up` stored: the person's browser logs in with it
        # (_log_in), the test's own API calls send it.
        _AUTH[:] = [tuple((tmp_path / "prefect-home" / "api-auth").read_text().strip().split(":", 1))]
        yield api
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(  # a fresh profile: its own --user-data-dir
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            page.set_default_timeout(120_000)  # a guard only: the machine may be loaded
            yield page
        finally:
            context.close()


class Shots:
    """Numbered screenshots of each step, beside the test's other output."""

    def __init__(self, folder: Path):
        self.folder, self.n = folder, 0
        folder.mkdir(parents=True, exist_ok=True)
        print(f"\nscreenshots: {folder}")

    def __call__(self, page, name: str) -> None:
        self.n += 1
        page.screenshot(path=str(self.folder / f"{self.n:02d}-{name}.png"))


EVALUATOR = "preftune.judges.builtin:answer_quality"


def _spec(zoo: dict, tmp_path: Path) -> dict:
    """Tiny and quick: 40 of the bundled pairs, one tiny zoo model, one beta. No evaluator: the run asks
    for one (the person first forgets to name it, then gives the bundled one)."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join((EXAMPLES_DIR / "pairs.jsonl").read_text().splitlines()[:40]) + "\n")
    return {"dataset": str(pairs), "workspace": str(tmp_path / "ws"), "base_models": [zoo["models"]["tiny-llama"]],
            "betas": [0.1], "epochs": 1, "batch_size": 8,
            "max_length": 128, "eval_max_new_tokens": 16, "max_eval_prompts": 8, "target_win_rate": None,
            "deploy": False, "approval_poll_s": 1}


def _deployment_id(api: str) -> str:
    flows = {f["id"]: f["name"] for f in httpx.post(f"{api}/flows/filter", json={}, timeout=60, auth=_auth()).json()}
    return next(d["id"] for d in httpx.post(f"{api}/deployments/filter", json={}, timeout=60, auth=_auth()).json()
                if d["name"] == "preftune" and flows.get(d["flow_id"]) == "preference-learning")


def _json_input(page, spec: dict) -> None:
    """spec ⋮ → Use JSON Input, and the spec typed into its editor (CodeMirror) in place of what is there."""
    if not page.locator(".cm-content").count():  # still the form (not after a refused submit)
        page.get_by_role("button", name="Open menu").first.click()
        page.get_by_role("menuitem", name="Use JSON Input").click()
    editor = page.locator(".cm-content").first
    editor.click()
    page.keyboard.press("Control+a")
    page.keyboard.insert_text(json.dumps(spec, indent=2))


def _start_run_from_the_form(page, ui_url: str, api: str, spec: dict, shot: Shots) -> str:
    deployment = _deployment_id(api)
    _log_in(page, ui_url, shot)
    page.goto(f"{ui_url}/v2/deployments/deployment/{deployment}", wait_until="networkidle")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Custom run").click()
    page.wait_for_url(re.compile(r".*/deployment/[0-9a-f-]+/run(\?.*)?$"))
    page.get_by_label("Dataset (Optional)", exact=True).wait_for()
    shot(page, "custom-run-form")
    # every field is named (an untitled one read "Field"); the only type switches left are the four
    # optional endpoints (an object or nothing), no `str | None` or `number | None` one
    labels = page.evaluate("Array.from(document.querySelectorAll('label')).map(l => l.innerText.trim())")
    assert not [x for x in labels if x.startswith("Field")], labels
    assert page.get_by_text('Property is type "None"').count() == 4
    # A bad field: the run is not created, and the reason shows beside the Submit button just pressed
    before = _runs(api, deployment)
    _json_input(page, {**spec, "betas": [-1]})
    submit = page.get_by_role("button", name="Submit", exact=True)
    submit.click()
    refusal = page.get_by_text("Validation failed for field 'spec.betas[0]'")
    refusal.wait_for()
    box = wait_for(lambda: (b := refusal.bounding_box()) and 0 <= b["y"] and b["y"] + b["height"] <= 900 and b,
                   10, "the refusal to slide fully into view")  # a toast, sliding in from the bottom edge
    shot(page, "custom-run-refused")
    button = submit.bounding_box()
    assert abs(box["y"] - button["y"]) < 300, f"the refusal {box} is far from the Submit button {button}"
    assert _runs(api, deployment) == before
    # the toast lies over the Submit button until it goes, and stays while the pointer rests on it
    page.mouse.move(600, 300)
    refusal.wait_for(state="hidden", timeout=60_000)
    _json_input(page, spec)
    shot(page, "custom-run-json")
    # Prefect 3.8.8's V2 form: the first Submit after a refusal only validates again (and clears the
    # refusal); the next one sends. A person presses it again; so does the test, only when nothing was sent.
    from playwright.sync_api import TimeoutError as NothingSent

    for _ in range(3):
        try:
            with page.expect_request(lambda r: r.url.endswith("/create_flow_run"), timeout=15_000):
                submit.click()
            break
        except NothingSent:
            continue
    new = wait_for(lambda: _runs(api, deployment) - before, 120, "the run the form submits")
    assert len(new) == 1, new
    page.get_by_text("scheduled to start").first.wait_for()  # the UI's own confirmation
    shot(page, "custom-run-submitted")
    return new.pop()


def _runs(api: str, deployment: str) -> set[str]:
    return {r["id"] for r in httpx.post(f"{api}/flow_runs/filter", timeout=60, auth=_auth(), json={
        "deployments": {"id": {"any_": [deployment]}}, "limit": 50, "sort": "START_TIME_DESC"}).json()}


# Every visible table whose right edge passes its container's (or the window's): cut off, or only
# readable by scrolling sideways.
CUT_TABLES_JS = """Array.from(document.querySelectorAll('table')).filter(t => t.offsetParent !== null).map(t => {
  const r = t.getBoundingClientRect(), p = t.parentElement.getBoundingClientRect();
  return {head: t.innerText.slice(0, 60), right: Math.round(r.right), limit: Math.round(Math.min(p.right, innerWidth))};
}).filter(x => x.right > x.limit + 1)"""


# Where a text is on screen: its box's height and whether all of it lies inside the window.
SHOWN_JS = """text => { const els = Array.from(document.querySelectorAll('[role=dialog] *'))
  .filter(e => e.innerText && e.innerText.includes(text)
    && !Array.from(e.children).some(c => c.innerText && c.innerText.includes(text)));
  return els.map(e => { const r = e.getBoundingClientRect();
    return {height: Math.round(r.height), top: Math.round(r.top), inView: r.height > 0 && r.top >= 0 && r.bottom <= innerHeight}; }); }"""


def _assert_shown(page, text: str, what: str) -> None:
    """`text` is on screen in the Resume dialog at 1280x900 as it opens: not squeezed to no height,
    not below the window's edge."""
    where = page.evaluate(SHOWN_JS, text)
    assert any(w["inView"] for w in where), f"{what}: {text!r} is not in view at 1280x900: {where}"


def _state(api: str, run_id: str) -> dict:
    return httpx.get(f"{api}/flow_runs/{run_id}", timeout=60, auth=_auth()).json()["state"]


def _choose(page, field: str, options: set[str]) -> str:
    """Open the dropdown of `field` with one click (#23: it used to need ArrowDown as well), pick the
    option offered that is in `options`."""
    page.get_by_role("button", name=f"Select {field}").click()
    page.get_by_role("option").first.wait_for()
    offered = {t.strip() for t in page.get_by_role("option").all_inner_texts()}
    chosen = next(iter(offered & options), None)
    assert chosen, f"{field}: the dropdown offers {sorted(offered)}, none of {sorted(options)}"
    page.get_by_role("option", name=chosen, exact=True).click()
    return chosen


def _answer_the_evaluator_question(page, shot: Shots, answered: list[str]) -> str:
    """First 'a Python evaluator' without naming one: the question comes back with the reason on top,
    in view; then with the bundled evaluator's id."""
    submit = page.locator("[role=dialog]").get_by_role("button", name="Resume", exact=True)
    if "evaluator-unnamed" not in answered:
        _assert_shown(page, "No evaluator id and no judge endpoint were given", "the evaluator question")
        _choose(page, "Decision", {"a Python evaluator"})
        shot(page, "question-evaluator-unnamed")
        submit.click()
        return "evaluator-unnamed"
    _assert_shown(page, "Your last answer was not used", "the re-asked evaluator question")
    _assert_shown(page, "'a Python evaluator' needs its id in 'evaluator'", "the re-asked evaluator question")
    shot(page, "question-evaluator-reasked")
    _choose(page, "Decision", {"a Python evaluator"})
    page.get_by_label("Evaluator (Optional)", exact=True).fill(EVALUATOR)
    submit.click()
    return "evaluator"


def _answer_in_the_ui(page, ui_url: str, run_id: str, shot: Shots, answered: list[str]) -> str:
    """Open the paused run, ⋮ → Resume, choose this question's decision in its dropdown, submit."""
    page.goto(f"{ui_url}/v2/runs/flow-run/{run_id}", wait_until="networkidle")
    page.get_by_role("button", name="Open menu").first.click()
    page.get_by_role("menuitem", name="Resume").click()
    dialog = page.locator("[role=dialog]")
    submit = dialog.get_by_role("button", name="Resume", exact=True)
    submit.wait_for()
    dialog.locator("label").first.wait_for()  # the form inside the dialog
    if page.get_by_label("Evaluator (Optional)", exact=True).count():
        return _answer_the_evaluator_question(page, shot, answered)
    if page.get_by_text("Drop Betas (Optional)").count():  # the plan: its summary is what a person approves from
        for text in ("Approve this plan?", "1 training job (", "Cost:", "Time:"):
            _assert_shown(page, text, "the plan question")
    for label, options in ANSWERS.items():
        if not page.get_by_role("button", name=f"Select {label}").count():
            continue
        chosen = _choose(page, label, options)
        shot(page, f"question-{label.lower()}-{chosen.replace(' ', '-')}")
        cut = page.evaluate(CUT_TABLES_JS)
        assert not cut, f"{label} question: tables cut off at a 1280 px window: {cut}"
        submit.click()
        return chosen
    shot(page, "unexpected-question")
    raise AssertionError("a question without a known decision field: see the screenshot")


def _wait_for_the_end(page, ui_url: str, api: str, run_id: str, shot: Shots) -> tuple[dict, list[str]]:
    answered: list[str] = []
    deadline, seen = time.monotonic() + RUN_TIMEOUT_S, None
    while time.monotonic() < deadline:
        moved = _activity(api, run_id)
        if moved != seen:  # the run is working (a new log line, a card refreshed): not hung
            deadline, seen = time.monotonic() + RUN_TIMEOUT_S, moved
        state = _state(api, run_id)
        if state["type"] in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED"):
            return state, answered
        keyset = (state["state_details"] or {}).get("run_input_keyset")
        if state["type"] == "PAUSED" and keyset:
            answered.append(_answer_in_the_ui(page, ui_url, run_id, shot, answered))
            # resumed; or, an answer not used, paused again at once with a new form (the question re-asked)
            wait_for(lambda asked=keyset: (s := _state(api, run_id))["type"] != "PAUSED"
                     or (s["state_details"] or {}).get("run_input_keyset") != asked, 60, "the run to resume")
        time.sleep(1)
    raise AssertionError(f"the run showed no activity for {RUN_TIMEOUT_S} s (answered {answered})")


def _activity(api: str, run_id: str) -> tuple:
    """What changes while a run works: its log lines and its cards' last update (the sweep table shows
    each running job's step every 10 s)."""
    logs = httpx.post(f"{api}/logs/filter", timeout=60, auth=_auth(), json={
        "logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_DESC", "limit": 1}).json()
    cards = httpx.post(f"{api}/artifacts/filter", timeout=60, auth=_auth(), json={
        "artifacts": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}).json()
    return (logs[0]["id"] if logs else None, max((c["updated"] for c in cards), default=None))


def _end(api: str, run_id: str) -> dict:
    wait_for(lambda: _state(api, run_id)["type"] in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED"), RUN_TIMEOUT_S,
             "the run to end")
    return _state(api, run_id)


def test_bad_input_from_the_form_fails_the_run_with_the_cli_line_and_no_traceback(ui, tmp_path):
    """A dataset path that does not exist: the run is Failed with the one line `preftune run` prints
    for the same spec, that line is the run's error log, and no log of the run holds a traceback."""
    missing = tmp_path / "no-such-pairs.jsonl"
    cli = subprocess.run(PREFTUNE + ["run", "--dataset", str(missing), "--workspace", str(tmp_path / "cli-ws")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert cli.returncode == 2, cli.stderr
    line = cli.stderr.strip().removeprefix("preftune run: error: ")
    assert str(missing) in line and "\n" not in line

    api = ui
    run = httpx.post(f"{api}/deployments/{_deployment_id(api)}/create_flow_run", timeout=60, auth=_auth(), json={
        "parameters": {"spec": {"dataset": str(missing), "workspace": str(tmp_path / "ws")}}}).json()
    state = _end(api, run["id"])
    assert (state["type"], state["message"]) == ("FAILED", line)

    def logs() -> list[dict]:
        return httpx.post(f"{api}/logs/filter", timeout=60, auth=_auth(), json={
            "logs": {"flow_run_id": {"any_": [run["id"]]}}, "sort": "TIMESTAMP_ASC", "limit": 200}).json()

    # the run's logs reach the server in batches, after its state: wait for its error line, then for
    # the engine's last words (it exits a few seconds after the state is set)
    wait_for(lambda: any(g["message"] == line for g in logs()), 120, "the run's error line in its logs")
    time.sleep(10)
    every = [(g["level"], g["message"]) for g in logs()]
    assert not [m for _, m in every if "Traceback" in m], every
    errors = [m for level, m in every if level >= 40]
    assert line in errors and all("\n" not in m for m in errors), every
    outcome = json.loads((tmp_path / "ws" / "outcome.json").read_text())
    assert outcome == {"status": "failed", "reason": line, "user_error": True, "workspace": str(tmp_path / "ws")}


def _report_artifact(api: str, run_id: str) -> str:
    rows = httpx.post(f"{api}/artifacts/filter", timeout=60, auth=_auth(), json={
        "artifacts": {"key": {"any_": ["final-report"]}, "flow_run_id": {"any_": [run_id]}}}).json()
    assert rows, "no final-report artifact"
    return rows[0]["id"]


def test_a_person_runs_the_flow_from_the_prefect_ui(ui, page, zoo, tmp_path):
    api, shot = ui, Shots(tmp_path / "screenshots")
    ui_url = api.removesuffix("/api")
    run_id = _start_run_from_the_form(page, ui_url, api, _spec(zoo, tmp_path), shot)
    state, answered = _wait_for_the_end(page, ui_url, api, run_id, shot)
    page.goto(f"{ui_url}/v2/runs/flow-run/{run_id}", wait_until="networkidle")
    shot(page, "run-ended")
    assert state["type"] == "COMPLETED", f"{state['type']}: {state['message']}"
    # the evaluator (asked again when not named), the plan, then the comparison
    assert answered[:3] == ["evaluator-unnamed", "evaluator", "approve"] and "recommended" in answered, answered
    _every_card_once_and_no_table_cut(page, ui_url, api, run_id, shot)

    page.goto(f"{ui_url}/v2/artifacts/artifact/{_report_artifact(api, run_id)}", wait_until="networkidle")
    report = (tmp_path / "ws" / "final_report.md").read_text(encoding="utf-8")
    sections = re.findall(r"^## (.+)$", report, flags=re.M)
    assert len(sections) >= 5, sections
    page.get_by_role("heading", name=sections[-1].strip()).first.wait_for()
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    shot(page, "final-report")
    images = page.evaluate("Array.from(document.querySelectorAll('.prose img'))"
                           ".map(i => ({src: i.src.slice(0, 60), width: i.naturalWidth}))")
    assert images, "the report shows no figure"
    assert all(i["width"] > 0 for i in images), f"images that did not load: {images}"
    page.locator(".prose img").first.scroll_into_view_if_needed()
    shot(page, "final-report-figure")
    headings = {h.strip() for h in page.locator("h2").all_inner_texts()}
    missing = [s for s in sections if s.strip() not in headings]
    assert not missing, f"sections not rendered: {missing} (page has {sorted(headings)})"
    assert page.locator("table").count() >= 3  # summary, sweep, evaluation...
    cut = page.evaluate(CUT_TABLES_JS)
    assert not cut, f"report tables cut off at a 1280 px window: {cut}"
    # What changed: the base answer and the tuned answer side by side, a table of (at least) two columns
    columns = page.evaluate(WHAT_CHANGED_COLUMNS_JS)
    assert columns and min(columns) >= 2, f"What changed is not shown side by side (columns per table: {columns})"


# The number of columns of each table in the report's "What changed" section (up to the next h2).
WHAT_CHANGED_COLUMNS_JS = """(() => { const h = Array.from(document.querySelectorAll('h2'))
  .find(e => e.innerText.trim().startsWith('What changed')); const out = [];
  for (let el = h && h.nextElementSibling; el && el.tagName !== 'H2'; el = el.nextElementSibling)
    for (const t of (el.tagName === 'TABLE' ? [el] : el.querySelectorAll('table')))
      out.push(t.rows.length ? t.rows[0].cells.length : 0);
  return out; })()"""


def _every_card_once_and_no_table_cut(page, ui_url: str, api: str, run_id: str, shot: Shots) -> None:
    """The run's Artifacts are a dashboard: one card per kind (a table or a question refreshed in place,
    not a new card each time), and no card's table runs past its box at 1280 px."""
    rows = httpx.post(f"{api}/artifacts/filter", timeout=60, auth=_auth(), json={
        "artifacts": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}).json()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), f"cards shown more than once: {sorted(keys)}"
    assert {"sweep-results", "approval-plan", "sweep-progress", "final-report"} <= set(keys), keys
    progress = next(r for r in rows if r["key"] == "sweep-progress")
    assert progress["data"] == 100.0 and "1/1 jobs finished" in progress["description"], progress
    page.goto(f"{ui_url}/v2/runs/flow-run/{run_id}?tab=Artifacts", wait_until="networkidle")
    page.get_by_text("final-report", exact=True).first.wait_for()
    shot(page, "run-artifacts")
    for row in rows:
        page.goto(f"{ui_url}/v2/artifacts/artifact/{row['id']}", wait_until="networkidle")
        if row["type"] == "table":
            page.locator("table").first.wait_for()
        cut = page.evaluate(CUT_TABLES_JS)
        assert not cut, f"artifact {row['key']}: tables cut off at a 1280 px window: {cut}"
    shot(page, "last-artifact")
