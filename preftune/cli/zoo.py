"""`preftune zoo [--dir DIR] [--json]`: build (or reuse) the offline tiny-model zoo."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "zoo", help="build the offline tiny-model zoo (tokenizer + 4 small models); cached",
        description="Build, with fixed seeds and no network, a BPE tokenizer and four tiny causal LMs "
                    "(tiny-llama, tiny-qwen, tiny-strong, tiny-weak) from the shipped corpus. "
                    "A second call reuses the cached build.")
    p.add_argument("--dir", type=Path, default=None, help="where the zoo lives (default: preftune's cache)")
    p.add_argument("--real", action=argparse.BooleanOptionalAction, default=True,
                   help="also build the real instruct model, SmolLM2-135M-Instruct, from its installed GGUF "
                        "(about a minute the first time; cached)")
    p.add_argument("--json", action="store_true", help='print {"dir", "tokenizer", "models"[, "real"]} as JSON')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from preftune.cli.common import print_json
    from preftune.zoo import build_zoo

    zoo = build_zoo(args.dir)
    real = None
    if args.real:
        from preftune.realmodel import build_real_model

        real = build_real_model()
    if args.json:
        print_json(zoo | ({"real": real} if real else {}))
        return 0
    manifest = json.loads((Path(zoo["dir"]) / "zoo.json").read_text())
    print(f"zoo:       {zoo['dir']}")
    print(f"tokenizer: {zoo['tokenizer']}")
    print(f"{'model':<12} {'arch':<6} {'params':>8} {'held-out ppl':>13}  path")
    for name, path in zoo["models"].items():
        m = manifest["models"][name]
        print(f"{name:<12} {m['arch']:<6} {m['params'] / 1e6:7.2f}M {m['heldout_perplexity']:13.2f}  {path}")
    if real:
        print(f"real model: {real['name']} ({real['arch']}, {real['params'] / 1e6:.1f}M params, vocabulary "
              f"{real['vocab_size']:,}) {real['path']}")
    return 0
