"""Concepts defined once (#21 item 9, #22): the evaluator kind, a model's identity, the checked
offline loaders, and the end tokens a completion stops at. Each test failed while two definitions
disagreed."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from preftune.endpoint import Endpoint

JUDGE = Endpoint.parse("judge@http://127.0.0.1:9/v1")


def test_a_blank_rubric_is_no_rubric_in_the_plan_the_run_and_phase_5(zoo, tmp_path):
    """#22: `--rubric " "` counted as the user's rubric in the plan and the run's resolution (priced
    without the rubric call, shown as "user rubric") while phase 5 stripped it and wrote an auto rubric."""
    from preftune.cli.plan import build_dry_plan
    from preftune.flows.questions import resolve_evaluator
    from preftune.paths import EXAMPLES_DIR
    from preftune.spec import RunSpec
    from preftune.tasks.evaluate import EvalConfig, evaluation_mode
    from preftune.workspace import Workspace

    for rubric, kind in ((" \n\t", "auto"), (None, "auto"), ("Prefer the correct answer.", "rubric")):
        spec = RunSpec(dataset=str(EXAMPLES_DIR / "pairs.jsonl"), base_models=[zoo["models"]["tiny-llama"]],
                       judge=JUDGE, rubric=rubric, workspace=str(tmp_path / "ws"))
        assert resolve_evaluator(spec, Workspace(tmp_path / "ws"))[1] == kind
        assert build_dry_plan(spec)[0]["evaluator"]["kind"] == kind
        cfg = EvalConfig(test_data=tmp_path / "t.jsonl", base_model="b", out_dir=tmp_path / "o", judge=JUDGE,
                         rubric=rubric)
        assert evaluation_mode(cfg) == kind
    with_evaluator = EvalConfig(test_data=tmp_path / "t.jsonl", base_model="b", out_dir=tmp_path / "o", judge=JUDGE,
                                rubric="x", evaluator="preftune.judges.builtin:answer_quality")
    assert evaluation_mode(with_evaluator) == "evaluator"


@pytest.fixture
def end_of_turn_model(zoo, tmp_path):
    """A copy of tiny-llama whose generation config lists two end tokens: EOS and a token the model
    greedily produces a few tokens into its answer (an "end of turn" that is not the tokenizer's
    EOS). Returns (folder, prompt, the answer's tokens before that end token)."""
    import torch

    from preftune.hf import load_causal_lm, prompt_ids

    folder = tmp_path / "eot-model"
    shutil.copytree(zoo["models"]["tiny-llama"], folder)
    model, tok = load_causal_lm(folder)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    ids = torch.tensor([prompt_ids(tok, prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    special = set(tok.all_special_ids)
    at = next(i for i in range(2, len(out)) if out[i] not in special and out[i] not in out[:i])
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = [tok.eos_token_id, out[at]]
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder, prompt, tok.decode(out[:at], skip_special_tokens=True)


def test_phase_5_stops_at_every_end_token_the_generation_config_lists(end_of_turn_model, tmp_path):
    """#22: phase 5 passed `eos_token_id=tokenizer.eos_token_id`, overriding the generation config's
    list, so it ran past the end of turn a run's server (phase 3) stops at."""
    from preftune.server import serve_local
    from preftune.tasks.generate import generate_completions

    folder, prompt, expected = end_of_turn_model
    [phase5] = generate_completions(folder, [prompt], max_new_tokens=12)
    assert phase5 == expected.strip()
    with serve_local(folder, tmp_path / "logs", timeout=600) as handle:
        from preftune.client import ChatClient

        reply = ChatClient(handle.endpoint()).chat_sync(prompt, max_tokens=12)
    assert (reply.text.strip(), reply.finish_reason) == (phase5, "stop")


def test_one_model_identity_follows_content(zoo, tmp_path):
    """One definition (preftune.hf) serves the response cache, phase 5's completion cache, the
    reference cache and deploy: a copy is the same model, a changed end-token list is not."""
    import preftune.server
    import preftune.tasks.deploy
    import preftune.tasks.evaluate
    from preftune.hf import model_fingerprint, model_identity

    assert preftune.server.model_fingerprint is model_fingerprint is preftune.tasks.evaluate.model_fingerprint
    assert preftune.tasks.deploy.model_fingerprint is model_fingerprint
    original = zoo["models"]["tiny-llama"]
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    assert model_fingerprint(copy) == model_fingerprint(original)
    assert set(model_identity(copy, {})) == {"config", "weights", "tokenizer", "generation"}
    config = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [2, 5]}))
    assert model_fingerprint(copy) != model_fingerprint(original)


class _Hub(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def _any(self):
        type(self).seen.append(f"{self.command} {self.path}")
        self.send_response(404)
        self.send_header("content-length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_POST = _any  # noqa: N815 (http.server's naming)

    def log_message(self, *args):
        pass


def test_phase_5_model_load_never_asks_a_hub(tmp_path):
    """#21: phase 5's in-process load lacked local_files_only. With the hub's address pointed at a
    local server and offline mode off, loading a name that is not a local folder sends nothing."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HOME=str(tmp_path / "hf"))
    code = ("from preftune.hf import load_causal_lm\n"
            "from preftune.errors import UserError\n"
            "try:\n    load_causal_lm('someone/some-model')\n"
            "except (UserError, OSError) as err:\n    print('refused:', type(err).__name__)\n")
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
    assert done.returncode == 0 and "refused" in done.stdout, done.stderr[-2000:]
    assert _Hub.seen == []
