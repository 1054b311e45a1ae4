"""The offline tiny-model zoo, its corpus and the bundled examples.

The full zoo comes from the session `zoo` fixture (built once, cached); the determinism and
locking tests use a seconds-long build with the same code path and a one-layer model.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from preftune import zoo as zoo_mod
from preftune.paths import EXAMPLES_DIR, REPO_ROOT

# The generators of the corpus and the examples are repository tools, not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_corpus  # noqa: E402
import make_examples  # noqa: E402

sys.path.pop(0)

TINY = {"tiny-test": zoo_mod.ModelSpec("llama", 32, 1, 2, 2, 64, steps=4, lr=1e-3, seed=5,
                                        batch_size=4, seq_len=32)}


def _file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "zoo.json"}


def _manifest(zoo: dict) -> dict:
    return json.loads((Path(zoo["dir"]) / "zoo.json").read_text())


# ----------------------------------------------------------------------------- determinism, cache, lock


def test_same_seed_builds_identical_files_and_another_seed_does_not(tmp_path):
    a = zoo_mod.build_into(tmp_path / "a", TINY)
    b = zoo_mod.build_into(tmp_path / "b", TINY)
    ha, hb = _file_hashes(tmp_path / "a"), _file_hashes(tmp_path / "b")
    assert {"tokenizer/tokenizer.json", "tiny-test/model.safetensors", "tiny-test/tokenizer.json",
            "tiny-test/chat_template.jinja", "tiny-test/generation_config.json"} <= set(ha)
    assert ha == hb
    assert a["models"]["tiny-test"]["heldout_perplexity"] == b["models"]["tiny-test"]["heldout_perplexity"]

    other = {"tiny-test": zoo_mod.ModelSpec(**{**TINY["tiny-test"].__dict__, "seed": 6})}
    zoo_mod.build_into(tmp_path / "c", other)
    hc = _file_hashes(tmp_path / "c")
    assert hc["tokenizer/tokenizer.json"] == ha["tokenizer/tokenizer.json"]
    assert hc["tiny-test/model.safetensors"] != ha["tiny-test/model.safetensors"]


def test_cache_is_reused_without_rebuilding(tmp_path):
    first = zoo_mod.build_zoo(tmp_path / "zoo", specs=TINY)
    weights = Path(first["models"]["tiny-test"]) / "model.safetensors"
    stamp = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    manifest_stamp = (tmp_path / "zoo" / "zoo.json").stat().st_mtime_ns
    second = zoo_mod.build_zoo(tmp_path / "zoo", specs=TINY)
    assert second == first
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == stamp
    assert (tmp_path / "zoo" / "zoo.json").stat().st_mtime_ns == manifest_stamp
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["zoo"]


def test_stale_manifest_is_rebuilt_and_orphans_removed(tmp_path):
    old = tmp_path / "zoo"
    (old / "tiny-test").mkdir(parents=True)
    (old / "tiny-test" / "config.json").write_text("{}")
    (old / "leftover.txt").write_text("from an older build")
    (old / "zoo.json").write_text(json.dumps({"build_key": "old", "tokenizer": "tokenizer",
                                              "models": {"tiny-test": {"path": "tiny-test"}}}))
    (tmp_path / ".zoo.building-killed" / "tokenizer").mkdir(parents=True)  # left by a killed build
    result = zoo_mod.build_zoo(old, specs=TINY)
    assert json.loads((old / "zoo.json").read_text())["build_key"] == zoo_mod.build_key(TINY)
    assert not (old / "leftover.txt").exists()
    assert (Path(result["models"]["tiny-test"]) / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".zoo.lock", "zoo"]


def test_cache_hit_does_not_load_torch(zoo):
    """A cached zoo is answered from zoo.json alone (no torch/transformers import, so well under 1 s)."""
    code = ("import json, sys; from preftune.zoo import build_zoo; z = build_zoo(sys.argv[1]); "
            "print(json.dumps([z, sorted(m for m in ('torch', 'transformers') if m in sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code, zoo["dir"]], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [zoo, []]


def test_concurrent_callers_build_once(tmp_path):
    """Two processes asking for the same zoo at once: one builds, the other waits and reuses it."""
    code = ("import json, sys; from preftune import zoo; "
            "spec = zoo.ModelSpec('llama', 32, 1, 2, 2, 64, steps=4, lr=1e-3, seed=5, batch_size=4, seq_len=32); "
            "print(json.dumps(zoo.build_zoo(sys.argv[1], specs={'tiny-test': spec})))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "zoo")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    results = [json.loads(o[0]) for o in outs]
    assert results[0] == results[1]
    assert sum(o[1].count("zoo: built in") for o in outs) == 1
    assert (Path(results[0]["models"]["tiny-test"]) / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- the real zoo


def test_zoo_has_the_four_models(zoo):
    assert set(zoo["models"]) == {"tiny-llama", "tiny-qwen", "tiny-strong", "tiny-weak"}
    assert Path(zoo["dir"]).is_dir() and (Path(zoo["tokenizer"]) / "tokenizer.json").is_file()
    for path in zoo["models"].values():
        assert Path(path).parent == Path(zoo["dir"])
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json"):
            assert (Path(path) / name).is_file(), (path, name)


def test_strong_has_clearly_lower_heldout_perplexity_than_weak(zoo):
    m = _manifest(zoo)["models"]
    strong, weak = m["tiny-strong"], m["tiny-weak"]
    assert strong["params"] > weak["params"] and strong["steps"] > weak["steps"]
    assert strong["heldout_perplexity"] < 0.75 * weak["heldout_perplexity"]


def test_recorded_perplexity_matches_a_fresh_evaluation(zoo):
    """Reload the saved strong/weak models and score the held-out slice again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    held = [r for r in zoo_mod.load_corpus() if r["split"] == "heldout"]
    recorded = _manifest(zoo)["models"]
    for name in ("tiny-strong", "tiny-weak"):
        tok = AutoTokenizer.from_pretrained(zoo["models"][name])
        model = AutoModelForCausalLM.from_pretrained(zoo["models"][name])
        ppl = zoo_mod.perplexity(model, tok, held)
        assert ppl == pytest.approx(recorded[name]["heldout_perplexity"], rel=1e-3)


def test_models_round_trip_through_from_pretrained(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = {"tiny-llama": "llama", "tiny-qwen": "qwen2", "tiny-strong": "llama", "tiny-weak": "llama"}
    for name, path in zoo["models"].items():
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.model_type == arch[name]
        assert model.config.vocab_size == len(tok) == 1024
        assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", "<|startoftext|>")
        assert model.generation_config.eos_token_id == tok.eos_token_id
        assert model.generation_config.pad_token_id == tok.pad_token_id
        if name in ("tiny-llama", "tiny-qwen"):
            assert 0.9e6 <= model.num_parameters() <= 5e6


def test_every_folder_tokenizes_like_the_zoo_tokenizer(zoo):
    """Whatever class AutoTokenizer picks for a folder (transformers 5 forces Qwen2Tokenizer on
    qwen2 folders), the ids must be those the models were trained on."""
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(zoo["tokenizer"])
    texts = [zoo_mod.render_record(r, base) for r in zoo_mod.load_corpus()[::7]]
    texts += ["  café\r\n\tÉté isn't  ", "E=mc² (1879–1955)", "日本 100%"]
    expected = [base(t, add_special_tokens=False)["input_ids"] for t in texts]
    for name, path in zoo["models"].items():
        tok = AutoTokenizer.from_pretrained(path)
        assert [tok(t, add_special_tokens=False)["input_ids"] for t in texts] == expected, name
        assert tok.decode(expected[-2]) == "E=mc² (1879–1955)"


def test_chat_template_renders_chatml(zoo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo["models"]["tiny-llama"])
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == (
        "<|startoftext|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
        "<|im_start|>assistant\n")
    full = tok.apply_chat_template(conv + [{"role": "assistant", "content": "Hello."}], tokenize=False)
    assert full.endswith("<|im_start|>assistant\nHello.<|im_end|>\n")
    ids = tok.apply_chat_template(conv, add_generation_prompt=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tok.decode(tok("Rome grew.", add_special_tokens=False)["input_ids"]) == "Rome grew."


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen", "tiny-strong", "tiny-weak"])
def test_greedy_generation_is_readable_and_stops_at_eos(zoo, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo["models"][name])
    model = AutoModelForCausalLM.from_pretrained(zoo["models"][name])
    for question in ("What is the capital of France?", "What does the honeybee eat?"):
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=80, do_sample=False)[0, ids.shape[1]:].tolist()
        assert out[-1] == tok.eos_token_id and len(out) < 80  # stopped by EOS, not by the limit
        text = tok.decode(out, skip_special_tokens=True).strip()
        words = text.split()
        assert len(words) >= 3, text
        assert sum(w.strip(".,!?").isalpha() for w in words) / len(words) >= 0.8, text
        assert text[0].isupper() and text[-1] in ".!?", text  # a sentence, not a fragment


def test_cli_zoo_json_matches_the_fixture(zoo):
    out = subprocess.run([sys.executable, "-m", "preftune.cli", "zoo", "--dir", zoo["dir"], "--json", "--no-real"],
                         capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == zoo
    table = subprocess.run([sys.executable, "-m", "preftune.cli", "zoo", "--dir", zoo["dir"], "--no-real"],
                           capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    ppl = _manifest(zoo)["models"]["tiny-strong"]["heldout_perplexity"]
    assert f"{ppl:.2f}" in table.stdout and zoo["models"]["tiny-weak"] in table.stdout


# ----------------------------------------------------------------------------- corpus and examples


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_corpus_is_regenerated_byte_for_byte(tmp_path):
    make_corpus.write_corpus(tmp_path / "corpus.jsonl")
    assert (tmp_path / "corpus.jsonl").read_bytes() == make_corpus.CORPUS_PATH.read_bytes()
    records = _read_jsonl(make_corpus.CORPUS_PATH)
    held = [r for r in records if r["split"] == "heldout"]
    assert 30 <= len(held) <= 0.1 * len(records)
    assert {r["topic"] for r in records} >= {"science", "history", "geography", "animals", "cooking",
                                               "health", "technology"}


def test_examples_are_regenerated_byte_for_byte(tmp_path):
    make_examples.write_examples(tmp_path)
    for name in ("pairs.jsonl", "prompts.jsonl"):
        assert (tmp_path / name).read_bytes() == (EXAMPLES_DIR / name).read_bytes(), name


def _check_messages(messages: list[dict]) -> None:
    assert messages and all(set(m) == {"role", "content"} for m in messages)
    assert all(m["role"] in ("system", "user", "assistant") and m["content"].strip() for m in messages)
    assert messages[-1]["role"] == "user"
    assert all(m["role"] != "system" for m in messages[1:])


def test_pairs_file_shape_and_worked_examples():
    pairs = _read_jsonl(EXAMPLES_DIR / "pairs.jsonl")
    assert 200 <= len(pairs) <= 1000
    for p in pairs:
        assert set(p) == {"input", "preferred_output", "non_preferred_output"}
        _check_messages(p["input"]["messages"])
        good, bad = p["preferred_output"], p["non_preferred_output"]
        assert len(good) == len(bad) == 1 and good[0]["role"] == bad[0]["role"] == "assistant"
        assert good[0]["content"].strip() and bad[0]["content"].strip() and good[0] != bad[0]
    by_prompt = {p["input"]["messages"][-1]["content"]: p for p in pairs}
    einstein = by_prompt["What is Einstein famous for?"]
    assert einstein["preferred_output"][0]["content"] == \
        "Einstein is renowned for his theory of relativity, especially the equation E=mc²."
    assert einstein["non_preferred_output"][0]["content"] == "He was a famous scientist."
    assert einstein["input"]["tools"] == []
    roman = [p for p in pairs if "rise of the Roman Empire" in p["input"]["messages"][-1]["content"]]
    assert roman and "Augustus" in roman[0]["preferred_output"][0]["content"]
    longer = sum(len(p["preferred_output"][0]["content"]) > len(p["non_preferred_output"][0]["content"])
                 for p in pairs) / len(pairs)
    assert 0.35 <= longer <= 0.75  # no systematic length bias


def test_prompts_file_shape_and_no_overlap_with_heldout_slice():
    prompts = _read_jsonl(EXAMPLES_DIR / "prompts.jsonl")
    assert 200 <= len(prompts) <= 1000
    for p in prompts:
        assert set(p) == {"messages"}
        _check_messages(p["messages"])
    held = make_corpus.heldout_questions()
    assert held  # the slice has chat records
    asked = {m["content"] for p in prompts for m in p["messages"] if m["role"] == "user"}
    assert not asked & held
    pairs = _read_jsonl(EXAMPLES_DIR / "pairs.jsonl")
    assert not {p["input"]["messages"][-1]["content"] for p in pairs} & held
