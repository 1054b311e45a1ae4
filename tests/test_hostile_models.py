"""Hostile model folders (issue 21, item 5): a chat template that never ends, one the sandbox
stops, one that raises; a config.json with sizes no model has; training that runs out of file
size or memory. Each folder is a copy of a zoo model with one file changed; the real `preftune`
command runs on it, and the one line (exit 2) or the recovery is asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from preftune.paths import EXAMPLES_DIR

PREFTUNE = [sys.executable, "-m", "preftune.cli"]
NESTED = ("{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}x"
          "{% endfor %}{% endfor %}{% endfor %}")


def _folder(zoo: dict, root: Path, name: str, template: str | None = None, **config) -> Path:
    """A copy of the zoo's tiny-llama with its chat template and/or config fields replaced."""
    dst = root / name
    shutil.copytree(Path(zoo["models"]["tiny-llama"]).resolve(), dst)
    if template is not None:
        jinja = dst / "chat_template.jinja"
        if jinja.exists():
            jinja.write_text(template)
        else:
            tok = json.loads((dst / "tokenizer_config.json").read_text())
            (dst / "tokenizer_config.json").write_text(json.dumps(tok | {"chat_template": template}))
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(cfg | config))
    return dst


def _one_line(proc: subprocess.CompletedProcess | subprocess.Popen, stderr: str, command: str) -> str:
    assert proc.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"preftune {command}: error: "), stderr
    return lines[0]


def test_hostile_chat_templates_are_one_line_and_exit_2(zoo, tmp_path):
    """Before: the nested loops hung `preftune inspect` for good; `__class__` and raise_exception were
    tracebacks with exit 1. The three run at once (the machine is shared: each takes a while to start)."""
    cases = {"hang": (NESTED, "rendering its chat template took longer than 5 s (a loop that does not end?)"),
             "klass": ("{{ ''.__class__.__mro__[1].__subclasses__() }}",
                       "its chat template was stopped by the sandbox: access to attribute '__class__' of 'str' "
                       "object is unsafe."),
             "raises": ("{{ raise_exception('Conversation roles must alternate') }}",
                        "its chat template refused to render: Conversation roles must alternate")}
    procs = {}
    for name, (template, _) in cases.items():
        model = _folder(zoo, tmp_path, name, template)
        procs[name] = (model, subprocess.Popen(
            PREFTUNE + ["inspect", str(EXAMPLES_DIR / "pairs.jsonl"), "--model", str(model), "--workspace",
                        str(tmp_path / f"ws-{name}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for name, (model, proc) in procs.items():
        _, err = proc.communicate(timeout=300)
        line = _one_line(proc, err, "inspect")
        assert line == f"preftune inspect: error: {model}: {cases[name][1]}"
        assert not (tmp_path / f"ws-{name}" / "inspection.json").exists()


def test_chat_template_limits_cost_nothing_on_an_honest_template(zoo):
    """The limits change no rendering, and a value built by one operator is refused before it exists."""
    from jinja2.exceptions import SecurityError
    from transformers import AutoTokenizer
    from transformers.utils import chat_template_utils as ctu

    from preftune.templating import limit_chat_templates

    tok = AutoTokenizer.from_pretrained(zoo["models"]["tiny-llama"])
    convs = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q{i}"},
              {"role": "assistant", "content": f"a{i}"}, {"role": "user", "content": "more"}] for i in range(50)]
    plain = tok.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
    limit_chat_templates()
    assert getattr(ctu._compile_jinja_template, "preftune_limited", False)
    assert tok.apply_chat_template(convs, tokenize=False, add_generation_prompt=True) == plain
    for template in ("{{ 'x' * 100000000000 }}", "{{ 2 ** 100000000 }}", "{{ '%*d' % (1000000000, 1) }}"):
        with pytest.raises(SecurityError):
            ctu.render_jinja_template([[{"role": "user", "content": "hi"}]], chat_template=template)
    assert ctu.render_jinja_template([[{"role": "user", "content": "hi"}]],
                                     chat_template="{{ 'ab' * 3 }}{{ 2 ** 10 }}{{ '%5d' % 7 }}")[0][0] == "ababab1024    7"


def _train(model: Path, out: Path, limit: str | None = None) -> subprocess.CompletedProcess:
    pairs = out.parent / "pairs.jsonl"
    if not pairs.exists():
        pairs.write_text("".join((EXAMPLES_DIR / "pairs.jsonl").read_text().splitlines(keepends=True)[:24]))
    argv = PREFTUNE + ["train", "--data", str(pairs), "--model", str(model), "--out", str(out), "--num-threads",
                       "1", "--batch-size", "4", "--max-length", "96", "--save-every", "2", "--ref-cache",
                       str(out.parent / "rc"), "--json"]
    cmd = " ".join(f"'{a}'" for a in argv)
    return subprocess.run(["bash", "-c", f"ulimit {limit}; exec {cmd}" if limit else f"exec {cmd}"],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("field, value, message", [
    ("vocab_size", 10**12, "vocab_size 1000000000000 is not a size a model can have (a positive integer up to 4,000,000)"),
    ("num_hidden_layers", 512, "the model's parameters alone need "),
])
def test_configs_with_impossible_sizes_are_refused_before_any_allocation(zoo, tmp_path, field, value, message):
    """Before: vocab_size 1e12 tried a 512 TB allocation in `train` and printed a traceback."""
    changes = {field: value} | ({"hidden_size": 65536, "intermediate_size": 262144} if field != "vocab_size" else {})
    model = _folder(zoo, tmp_path, "model", **changes)
    proc = _train(model, tmp_path / "job")
    line = _one_line(proc, proc.stderr, "train")
    assert line.startswith(f"preftune train: error: {model / 'config.json'}: {message}")
    if field == "vocab_size":  # `plan` prices the model first: it read 1e12 as a 128,000B model, no field named
        pairs = EXAMPLES_DIR / "pairs.jsonl"
        plan = subprocess.run(PREFTUNE + ["plan", "--dataset", str(pairs), "--base-model", str(model)],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert _one_line(plan, plan.stderr, "plan").startswith(f"preftune plan: error: {model / 'config.json'}: {message}")


def test_file_size_and_memory_limits_are_one_line_and_the_job_resumes(zoo, tmp_path):
    """Before: EFBIG (ulimit -f 200) and alloc_cpu (ulimit -v 835000) were tracebacks, exit 1.
    Now each is one line naming what ran out, exit 2; the re-run without the limit finishes."""
    model = Path(zoo["models"]["tiny-llama"])
    out = tmp_path / "job"
    small_files = _train(model, out, "-f 200")
    assert _one_line(small_files, small_files.stderr, "train").startswith(
        "preftune train: error: file size limit reached")
    small_memory = _train(model, out, "-v 835000")
    assert _one_line(small_memory, small_memory.stderr, "train").startswith("preftune train: error: out of memory (")
    done = _train(model, out)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == 6  # 24 pairs, batch 4: the whole job ran
