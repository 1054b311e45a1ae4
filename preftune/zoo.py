"""The offline tiny-model zoo: one BPE tokenizer and four small causal LMs, built from the shipped
corpus with fixed seeds, no network, and cached.

    build_zoo(dir) -> {"dir": str, "tokenizer": str, "models": {name: str}}

`tiny-llama` (LlamaConfig) and `tiny-qwen` (Qwen2Config) are the base models; `tiny-strong`
(bigger, trained longer) and `tiny-weak` (smaller, trained briefly) are the delta-learning
generators, and the manifest `zoo.json` records their held-out perplexities. Every model folder is
an ordinary Hugging Face folder (config, safetensors, tokenizer + chat template, generation config),
loaded back through `from_pretrained` before the zoo is published. The build happens in a
temporary folder renamed into place under an `fcntl` lock, so concurrent callers are safe.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from preftune.files import file_lock, replace_dir
from preftune.paths import default_zoo_dir

BUILD_VERSION = "zoo-4"  # bump whenever a change alters the built files
CORPUS_PATH = Path(__file__).resolve().parent / "corpus" / "corpus.jsonl"
VOCAB_SIZE = 1024
PAD, BOS, EOS, IM_START = "<|endoftext|>", "<|startoftext|>", "<|im_end|>", "<|im_start|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START]  # ids 0..3, in this order
# ChatML-like; the assistant turn ends with <|im_end|>, which is the eos token generation stops at.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MODEL_NAMES = ("tiny-llama", "tiny-qwen", "tiny-strong", "tiny-weak")
# transformers 5 loads any qwen2 folder with Qwen2Tokenizer, which rebuilds the pipeline around the
# saved vocab/merges with this split regex and NFC. The zoo tokenizer uses the very same pipeline,
# so every model folder tokenizes identically whichever tokenizer class loads it.
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and training budget of one zoo model."""

    arch: str  # "llama" | "qwen2"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    steps: int
    lr: float
    seed: int
    batch_size: int = 16
    seq_len: int = 128


SPECS: dict[str, ModelSpec] = {
    "tiny-llama": ModelSpec("llama", 128, 4, 4, 4, 384, steps=150, lr=4e-3, seed=11),
    "tiny-qwen": ModelSpec("qwen2", 128, 4, 4, 2, 384, steps=150, lr=4e-3, seed=12),
    "tiny-strong": ModelSpec("llama", 160, 5, 5, 5, 448, steps=220, lr=3e-3, seed=13),
    # Weak, but trained enough to end its answers with <|im_end|> (at 60-110 steps greedy decoding loops).
    "tiny-weak": ModelSpec("llama", 64, 2, 2, 2, 192, steps=150, lr=5e-3, seed=14),
}


# ----------------------------------------------------------------------------- corpus


def load_corpus(path: Path = CORPUS_PATH) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def render_record(record: dict, tokenizer) -> str:
    """One corpus record as training text: chat records through the chat template, prose wrapped."""
    if "messages" in record:
        return tokenizer.apply_chat_template(record["messages"], tokenize=False)
    return BOS + record["text"] + PAD


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(records: list[dict], out_dir: Path):
    """Train a byte-level BPE on the corpus text and save it as a Hugging Face tokenizer folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for r in records:
        texts += [m["content"] for m in r["messages"]] if "messages" in r else [r["text"]]
    texts += ["user", "assistant", "system"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=None,
        additional_special_tokens=[IM_START], model_max_length=512, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


# ----------------------------------------------------------------------------- models


def make_model(spec: ModelSpec, tokenizer):
    """A freshly initialised model for `spec` (seeded, so the same spec gives the same weights)."""
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[spec.arch]
    with _INIT_LOCK:  # the global RNG: models built side by side must not draw from it in turns
        return _seeded_model(cls, spec, tokenizer)


def _seeded_model(cls, spec: ModelSpec, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    config = cls(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(spec.seed)
    return AutoModelForCausalLM.from_config(config)


def _token_stream(records: list[dict], tokenizer):
    import torch

    ids: list[int] = []
    for r in records:
        ids += tokenizer(render_record(r, tokenizer), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


PARALLEL_MODELS = 2  # models trained at once, one torch thread each (see build_into)
_INIT_LOCK = threading.Lock()
# A build prints a progress line at least this often: on a loaded 2-core machine one model took 15 min.
PROGRESS_EVERY_S = 10.0


def _say(text: str) -> None:
    print(f"zoo: {text}", file=sys.stderr, flush=True)


def train_model(spec: ModelSpec, tokenizer, stream, name: str = "model"):
    """Packed causal-LM training on `stream`, the concatenated token ids of the training records
    (N,): AdamW, linear warm-up then cosine decay. Says how far it is every PROGRESS_EVERY_S."""
    import torch

    from preftune import fmt

    # The clock starts with the "training ..." line: building the model takes seconds under load too.
    t0, done, finished = time.monotonic(), [0], threading.Event()

    def progress() -> None:  # from its own thread: one step can take longer than the period under load
        while not finished.wait(PROGRESS_EVERY_S):
            spent, step = time.monotonic() - t0, done[0]
            left = f", ~{fmt.duration((spec.steps - step) * spent / step)} left" if step else ""
            _say(f"{name:<12} step {step}/{spec.steps}, {fmt.duration(spent)} so far{left}")

    threading.Thread(target=progress, daemon=True, name=f"zoo-{name}").start()
    try:
        model = make_model(spec, tokenizer)
        gen = torch.Generator().manual_seed(spec.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.95))
        warmup = max(1, spec.steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, s / spec.steps))) + 0.02)
        model.train()
        _train_steps(model, spec, stream, gen, opt, sched, done)
    finally:
        finished.set()
    model.eval()
    return model


def _train_steps(model, spec: ModelSpec, stream, gen, opt, sched, done: list[int]) -> None:
    import torch

    for step in range(spec.steps):
        done[0] = step
        starts = torch.randint(0, len(stream) - spec.seq_len - 1, (spec.batch_size,), generator=gen)
        batch = torch.stack([stream[s:s + spec.seq_len + 1] for s in starts.tolist()])  # (B, T+1)
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone()).loss
        # labels are shifted inside the model; passing input_ids as labels trains next-token prediction
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()


def perplexity(model, tokenizer, records: list[dict]) -> float:
    """exp(mean next-token NLL) over the records, each scored on its own."""
    import torch

    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for r in records:
            ids = tokenizer(render_record(r, tokenizer), add_special_tokens=False, return_tensors="pt")["input_ids"]
            n = ids.shape[1] - 1
            total_nll += model(input_ids=ids, labels=ids).loss.item() * n
            total_tokens += n
    return math.exp(total_nll / total_tokens)


def save_model(model, tokenizer, out_dir: Path) -> None:
    """save_pretrained model + tokenizer + generation config, then load the folder back the way a
    user would and check that it tokenizes and computes exactly what was trained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                          tokenize=False, add_generation_prompt=True)
    ids = tokenizer(probe, add_special_tokens=False, return_tensors="pt")["input_ids"]
    loaded_tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True)
    with torch.no_grad():
        same = torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    if loaded_tok(probe, add_special_tokens=False)["input_ids"] != ids[0].tolist() or not same:
        raise RuntimeError(f"{out_dir} does not load back to the model that was trained")


def build_model(name: str, spec: ModelSpec, tokenizer, stream, held: list[dict], out_dir: Path) -> dict:
    """Train, score and save one model; returns its manifest entry."""
    t0 = time.perf_counter()
    model = train_model(spec, tokenizer, stream, name)
    ppl = perplexity(model, tokenizer, held)
    save_model(model, tokenizer, out_dir)
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    print(f"zoo: {name:<12} {params / 1e6:5.2f}M params  {spec.steps:4d} steps  "
          f"held-out ppl {ppl:7.2f}  {seconds:6.1f}s", file=sys.stderr)
    return {"path": name, "arch": spec.arch, "params": params, "steps": spec.steps,
            "heldout_perplexity": round(ppl, 4), "build_seconds": round(seconds, 2)}


# ----------------------------------------------------------------------------- the zoo


def build_key(specs: dict[str, ModelSpec] = SPECS, corpus: Path = CORPUS_PATH) -> str:
    """Hash of everything that determines the zoo's files; a manifest with another key is rebuilt."""
    # Versions from package metadata: importing torch here would cost seconds on every cache hit.
    from importlib.metadata import version

    h = hashlib.sha256()
    h.update(json.dumps({"version": BUILD_VERSION, "vocab": VOCAB_SIZE, "template": CHAT_TEMPLATE,
                         "specs": {k: asdict(v) for k, v in specs.items()},
                         "libs": [version("torch"), version("transformers"), version("tokenizers")]},
                        sort_keys=True).encode())
    h.update(corpus.read_bytes())
    return h.hexdigest()


def _result(root: Path, manifest: dict) -> dict:
    return {"dir": str(root), "tokenizer": str(root / manifest["tokenizer"]),
            "models": {name: str(root / m["path"]) for name, m in manifest["models"].items()}}


def _cached(root: Path, key: str) -> dict | None:
    try:
        manifest = json.loads((root / "zoo.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("build_key") != key:
        return None
    if not all((root / m["path"] / "config.json").is_file() for m in manifest["models"].values()):
        return None
    return manifest


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_into(out: Path, specs: dict[str, ModelSpec] = SPECS, records: list[dict] | None = None) -> dict:
    """Build tokenizer + models into `out` (no caching, no lock) and write its `zoo.json`."""
    key = build_key(specs)  # before reading the corpus: a file edited mid-build must not be credited
    records = load_corpus() if records is None else records
    t0 = time.perf_counter()
    # One torch thread per model, two models at once. On two cores, a model's two intra-op threads wait
    # on each other whenever the machine is busy: at load 25, 28 s a step with 2 threads vs 6.4 s with 1
    # (measured 2026-12-02). One thread per model gives the same files (the same sums in the same order).
    with _torch_threads(1):
        tokenizer = build_tokenizer(records, out / "tokenizer")
        print(f"zoo: tokenizer    vocab {len(tokenizer)}  {time.perf_counter() - t0:6.1f}s", file=sys.stderr)
        stream = _token_stream([r for r in records if r["split"] == "train"], tokenizer)
        held = [r for r in records if r["split"] == "heldout"]

        def build(i: int, name: str, spec: ModelSpec) -> dict:
            _say(f"{name:<12} training ({i}/{len(specs)}, {spec.steps} steps) ...")
            # its own tokenizer: a fast tokenizer is not safe to call from two threads ("Already borrowed")
            return build_model(name, spec, copy.deepcopy(tokenizer), stream, held, out / name)

        with ThreadPoolExecutor(max_workers=PARALLEL_MODELS, thread_name_prefix="zoo") as pool:
            futures = {name: pool.submit(build, i, name, spec) for i, (name, spec) in enumerate(specs.items(), 1)}
            models = {name: future.result() for name, future in futures.items()}
    manifest = {"build_key": key, "build_version": BUILD_VERSION, "tokenizer": "tokenizer",
                "models": models, "build_seconds": round(time.perf_counter() - t0, 2)}
    (out / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"zoo: built in {manifest['build_seconds']:.1f}s", file=sys.stderr)
    return manifest


def build_zoo(dir: Path | str | None = None, *, specs: dict[str, ModelSpec] | None = None) -> dict:
    """Build (or reuse) the zoo under `dir`; returns {"dir", "tokenizer", "models": {name: path}}.

    `specs` replaces the standard four models (tests use it for a seconds-long build)."""
    specs = SPECS if specs is None else specs
    root = Path(dir) if dir is not None else default_zoo_dir()
    root = root.expanduser().resolve()
    key = build_key(specs)
    manifest = _cached(root, key)
    if manifest is not None:
        return _result(root, manifest)
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(root.parent / f".{root.name}.lock"):  # a second process waits here, then finds the cache
        manifest = _cached(root, key)
        if manifest is not None:
            return _result(root, manifest)
        # Holding the lock, any leftover build folder belongs to a process that was killed mid-build.
        for stale in root.parent.glob(f".{root.name}.building-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
        try:
            manifest = build_into(tmp, specs)
            replace_dir(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _result(root, manifest)
