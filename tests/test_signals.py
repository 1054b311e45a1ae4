"""SIGTERM stops a preftune command within 10 s with every server it started; after kill -9 of a
command nothing it started keeps running. Real `preftune` children, real servers, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

PREFTUNE = [sys.executable, "-m", "preftune.cli"]


def listening_children(pid: int, needle: str) -> list[psutil.Process]:
    """Descendants of ``pid`` whose command line holds ``needle`` and that listen on a TCP port."""
    out = []
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return out
    for kid in kids:
        try:
            if needle in " ".join(kid.cmdline()) and any(
                    c.status == psutil.CONN_LISTEN for c in kid.net_connections(kind="tcp")):
                out.append(kid)
        except psutil.Error:
            continue
    return out


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def all_gone(procs: list[psutil.Process], timeout: float) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not alive


def start_pairs(tmp_path: Path, zoo: dict) -> subprocess.Popen:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Tell a story {i}"}]}) + "\n"
                               for i in range(200)))
    argv = PREFTUNE + ["pairs", "--prompts", str(prompts), "--strong", zoo["models"]["tiny-llama"],
                       "--weak", zoo["models"]["tiny-qwen"], "--out", str(tmp_path / "out"),
                       "--max-tokens", "64"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path,
                            start_new_session=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_pairs_and_its_servers_within_10s(tmp_path, zoo, sig):
    proc = start_pairs(tmp_path, zoo)
    try:
        servers = wait_for(lambda: len(listening_children(proc.pid, "serve")) == 2
                           and listening_children(proc.pid, "serve"), 120, "both model servers to listen")
        time.sleep(1.0)  # requests in flight
        sent = time.monotonic()
        os.kill(proc.pid, sig)
        proc.wait(timeout=10)
        took = time.monotonic() - sent
        print(f"{sig.name}: exited after {took:.1f} s with {proc.returncode}")
        assert took < 10 and proc.returncode == 128 + sig
        assert all_gone(servers, 3.0), [s.pid for s in servers if s.is_running()]
        assert "Traceback" not in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _kill_9_leaves_nothing(proc: subprocess.Popen, child: str, what: str) -> None:
    """Once `proc` has a listening child whose command line holds `child`, kill -9 `proc`: the
    children must be gone within a few seconds (they die with their parent)."""
    try:
        servers = wait_for(lambda: listening_children(proc.pid, child), 120, what)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
        assert all_gone(servers, 5.0), [s.pid for s in servers if s.is_running()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_9_takes_the_servers_down(tmp_path, zoo):
    _kill_9_leaves_nothing(start_pairs(tmp_path, zoo), "serve", "a model server to listen")


def test_kill_9_of_a_run_takes_its_temporary_prefect_server_down(tmp_path, public_datasets):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    argv = PREFTUNE + ["run", "--dataset", str(public_datasets / "public_pairs.jsonl"),
                       "--workspace", str(tmp_path / "ws")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=env,
                            start_new_session=True)
    _kill_9_leaves_nothing(proc, "uvicorn", "the temporary Prefect server")


def test_serve_stops_on_sigterm_after_its_api_has_gone(tmp_path):
    """`preftune serve` against a real Prefect server; the server dies; SIGTERM still ends the
    command within 10 s, and its serve loop with it (Prefect's own shutdown waits on the API)."""
    from preftune.server import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    api = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--port", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    serve = None
    try:
        import httpx

        wait_for(lambda: _answers(httpx, f"http://127.0.0.1:{port}/api/health"), 180, "the Prefect server")
        log = tmp_path / "serve.log"
        with open(log, "w") as out:
            serve = subprocess.Popen(PREFTUNE + ["serve"], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                     env=env | {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"},
                                     start_new_session=True)
        wait_for(lambda: "being served" in log.read_text(), 180, "the deployments to be served")
        loop = psutil.Process(serve.pid).children(recursive=True)
        os.killpg(api.pid, signal.SIGKILL)
        api.wait(timeout=10)
        start = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)
        assert time.monotonic() - start < 10 and serve.returncode == 128 + signal.SIGTERM
        assert loop and all_gone(loop, 5.0)
    finally:
        for proc in (serve, api):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _answers(httpx, url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _children_whose(pid: int, holds) -> list[psutil.Process]:
    """Descendants of ``pid`` whose argv (a list) ``holds(argv)`` says yes to."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for kid in kids:
        try:
            if holds(kid.cmdline()):
                out.append(kid)
        except psutil.Error:
            continue
    return out


def _train_children(pid: int) -> list[psutil.Process]:
    return _children_whose(pid, lambda argv: "train" in argv)


def _metrics_lines(ws: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in ws.glob("jobs/*/metrics.jsonl"))


def test_sigterm_during_training_ends_the_run_and_its_job_within_10s_and_the_job_resumes(tmp_path, zoo):
    """Before: SIGTERM to `preftune run` while a sweep job trained left the CLI waiting for the job to
    finish (9.5 minutes for 150 steps): Prefect's SIGTERM bridge raised in the flow, and leaving the
    sweep's thread pool waited for the job. Now the sweep stops its jobs; a job checkpoints the step it
    is on and exits; the run ends within 10 s, nothing of it left; the job resumes from that step."""
    import torch

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": str(tmp_path / "prefect-home")}
    ws = tmp_path / "ws"
    data = tmp_path / "pairs.jsonl"  # 80 pairs: a short reference pass, then ~32 steps to train
    data.write_text("".join((Path(__file__).parent.parent / "examples" / "pairs.jsonl").read_text()
                            .splitlines(keepends=True)[:80]))
    argv = PREFTUNE + ["run", "--dataset", str(data),
                       "--workspace", str(ws), "--base-model", zoo["models"]["tiny-llama"], "--beta", "0.1",
                       "--evaluator", "preftune.judges.builtin:answer_quality", "--yes", "--no-deploy",
                       "--batch-size", "2", "--max-length", "64"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path, env=env,
                            start_new_session=True)
    try:
        wait_for(lambda: _metrics_lines(ws) >= 2, 600, "the sweep job to train two steps")
        jobs = _train_children(proc.pid)
        assert jobs, "the job runs as a child process of the run"
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - sent
        print(f"SIGTERM during training: the run exited after {took:.1f} s with {proc.returncode}")
        assert took < 10 and proc.returncode == 128 + signal.SIGTERM
        assert all_gone(jobs, 1.0), [j.pid for j in jobs if j.is_running()]
        assert "Traceback" not in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    (job_dir,) = [p.parent for p in ws.glob("jobs/*/job.json")]
    # The job checkpoints the step it is on when that step ends within the sweep's grace (6 s); on a
    # machine too loaded for that it is killed, and resumes from its last periodic checkpoint, or 0.
    ckpt = job_dir / "checkpoint.pt"
    ckpt_step = torch.load(ckpt, weights_only=True)["state"]["step"] if ckpt.exists() else 0
    print(f"the job resumes from step {ckpt_step}")
    done = subprocess.run(PREFTUNE + ["train", "--config", str(job_dir / "job.json"), "--json"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["resumed_from_step"] == ckpt_step and summary["steps"] > ckpt_step
    steps = [json.loads(x)["step"] for x in (job_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, summary["steps"] + 1))  # no step lost or repeated


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_during_a_training_job_checkpoints_the_step_and_resumes(tmp_path, zoo, sig):
    """`preftune train` alone: SIGTERM (or Ctrl-C) ends it within 10 s with a checkpoint of the step
    it was on (before: an interruption mid-step, no checkpoint: the job restarted from its last
    periodic one)."""
    import torch

    out = tmp_path / "job"
    argv = PREFTUNE + ["train", "--data", str(Path(__file__).parent.parent / "examples" / "pairs.jsonl"),
                       "--model", zoo["models"]["tiny-llama"], "--out", str(out), "--num-threads", "1",
                       "--batch-size", "2", "--max-length", "96", "--save-every", "1000", "--ref-cache",
                       str(tmp_path / "rc"), "--epochs", "1", "--json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3,
                 600, "three training steps")
        sent = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - sent < 10 and proc.returncode == 128 + sig, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ckpt_step = torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"]
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert ckpt_step >= 3 and logged[-1] == ckpt_step  # the step in progress finished and was saved
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["resumed_from_step"] == ckpt_step


SLOW_EVALUATOR = '''
import time
from pathlib import Path


def score(messages, completion):
    """A slow evaluator that leaves a mark when phase 5 first calls it."""
    Path(__file__).with_suffix(".called").touch()
    time.sleep(0.3)
    return 0.5
'''


def _rerun_completes_without_training(argv: list[str], ws: Path, cwd: Path, env: dict) -> None:
    """The interrupted run again: it completes, and its one finished job is not trained again."""
    (summary,) = ws.glob("jobs/*/summary.json")
    trained = summary.stat().st_mtime_ns
    again = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=900)
    assert again.returncode == 0 and "run completed" in again.stdout, again.stderr
    assert summary.stat().st_mtime_ns == trained


def test_sigint_during_evaluation_ends_the_run_within_10s_and_a_rerun_resumes_after_the_sweep(tmp_path, zoo):
    """Ctrl-C (SIGINT to the whole `preftune run`) while phase 5 scores: the run ends within 10 s with
    exit 130, one line and no traceback, its evaluator workers gone; the re-run finishes without
    training the job again."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": str(tmp_path / "prefect-home")}
    ws, evaluator = tmp_path / "ws", tmp_path / "slow_eval.py"
    evaluator.write_text(SLOW_EVALUATOR)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join((Path(__file__).parent.parent / "examples" / "pairs.jsonl").read_text()
                            .splitlines(keepends=True)[:60]))
    argv = PREFTUNE + ["run", "--dataset", str(data), "--workspace", str(ws), "--base-model", zoo["models"]["tiny-llama"],
                       "--beta", "0.1", "--evaluator", f"{evaluator}:score", "--yes", "--no-deploy",
                       "--max-length", "64", "--eval-max-new-tokens", "8", "--max-eval-prompts", "8"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path, env=env,
                            start_new_session=True)
    try:
        wait_for(lambda: evaluator.with_suffix(".called").exists() or proc.poll() is not None, 900,
                 "phase 5 to call the evaluator")
        assert proc.poll() is None, proc.stderr.read().decode()
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "evaluators" in " ".join(p.cmdline())]
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
        took = time.monotonic() - sent
        err = proc.stderr.read().decode()
        print(f"SIGINT during evaluation: the run exited after {took:.1f} s with {proc.returncode}")
        assert took < 10 and proc.returncode == 130, err
        assert "Traceback" not in err and "interrupted" in err
        assert all_gone(workers, 3.0), [w.pid for w in workers if w.is_running()]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _rerun_completes_without_training(argv, ws, tmp_path, env)
    assert json.loads((ws / "eval" / "scores.json").read_text())["models"]


KNOWN_FOR_EVALUATOR = '''
def score(messages, completion):
    """1 for an answer that says what someone is best known for, as the dataset's answers do."""
    return 1.0 if "known for" in completion else 0.0
'''


def _deploy_servers(pid: int, folder: Path) -> list[psutil.Process]:
    """The run's children serving ``folder`` with ``transformers serve`` (preftune.hfserve, a
    deployment's server on CPU), listening or not."""
    return _children_whose(pid, lambda argv: "preftune.hfserve" in argv and str(folder) in argv)


def test_sigterm_during_deploy_ends_the_run_within_10s_and_the_server_it_was_starting(tmp_path, zoo):
    """SIGTERM to `preftune run` while phase 6 waits for the server it deploys to load: the run ends
    within 10 s with exit 143, one line and no traceback, and that server is gone (a server still
    starting is the run's to stop; only one that is up and smoke-tested outlives the command, found
    by `preftune deploy --stop`). The re-run deploys without training the job again.

    Reaching phase 6 headless (`--yes`) takes a candidate that beats its base: at lr 0.02 for two
    epochs the tiny model picks up the dataset's "X is best known for ..." (the base answers "The
    main language of ..."), and the evaluator scores exactly that. The signal is sent as soon as the
    server process exists: it then imports transformers and loads the merged model (~5 s on 2 cores)
    before /health answers, which the test checks it has not yet done. The workspace is relative, as
    typed: a merged model's relative path once named nothing from the server's folder."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": str(tmp_path / "prefect-home")}
    ws, evaluator, log = tmp_path / "ws", tmp_path / "known_for.py", tmp_path / "run.err"
    evaluator.write_text(KNOWN_FOR_EVALUATOR)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join((Path(__file__).parent.parent / "examples" / "pairs.jsonl").read_text()
                            .splitlines(keepends=True)[:60]))
    argv = PREFTUNE + ["run", "--dataset", str(data), "--workspace", "ws", "--base-model", zoo["models"]["tiny-llama"],
                       "--beta", "0.1", "--lr", "0.02", "--epochs", "2", "--evaluator", f"{evaluator}:score", "--yes",
                       "--max-length", "64", "--eval-max-new-tokens", "8", "--max-eval-prompts", "8"]
    stop = PREFTUNE + ["deploy", "--stop", "--workspace", "ws"]
    try:
        with open(log, "w") as err:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path, env=env,
                                    start_new_session=True)
        try:
            merged = (ws / "deploy" / "model").resolve()  # the job's adapter merged into its base, served
            servers = wait_for(lambda: _deploy_servers(proc.pid, merged) or proc.poll() is not None, 900,
                               "phase 6 to start the model server")
            assert proc.poll() is None, log.read_text()
            from preftune.server import healthy

            port = json.loads((ws / "deploy" / "starting.json").read_text())["port"]
            assert not healthy(port, timeout=1.0), "the server was up before the signal: not the case under test"
            family = psutil.Process(proc.pid).children(recursive=True)  # the server, the temporary Prefect API
            sent = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
            took = time.monotonic() - sent
            print(f"SIGTERM during deploy: the run exited after {took:.1f} s with {proc.returncode}")
            err_text = log.read_text()
            assert took < 10 and proc.returncode == 128 + signal.SIGTERM, err_text
            assert "Traceback" not in err_text
            assert len([line for line in err_text.splitlines() if "interrupted" in line]) == 1, err_text
            assert all_gone(servers, 3.0), [s.pid for s in servers if s.is_running()]
            assert all_gone(family, 5.0), [(p.pid, p.cmdline()) for p in family if p.is_running()]
            assert not (ws / "deploy" / "endpoint.json").exists()  # nothing recorded as deployed
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        _rerun_completes_without_training(argv, ws, tmp_path, env)
        endpoint = json.loads((ws / "deploy" / "endpoint.json").read_text())
        assert endpoint["smoke"]["completion_tokens"] > 0 and healthy(endpoint["port"], timeout=5.0)
        deployed = psutil.Process(endpoint["pid"])
        stopped = subprocess.run(stop, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        assert stopped.stdout.startswith(f"stopped server pid {endpoint['pid']}"), stopped.stdout + stopped.stderr
        assert all_gone([deployed], 15.0)
    finally:  # whatever failed above, no deployment is left running
        subprocess.run(stop, capture_output=True, cwd=tmp_path, env=env, timeout=120)
