"""`preftune demo`: the embedded, offline default — zoo models, bundled prompts, the full flow.

`preftune demo --real` runs the same flow on the zoo's one real instruct model,
SmolLM2-135M-Instruct (`preftune.realmodel`): it is the base model and the strong generator
(preferred answers); the weak generator (non-preferred answers) is the tiny zoo model `tiny-weak`,
whose answers are short rambling word salad — an unambiguous "worse" side, so the pairs carry a
clear preference without a second real model (none other is available offline).
"""

from __future__ import annotations

import argparse

EVALUATOR = "preftune.judges.builtin:answer_quality"


def demo_spec(workspace: str, zoo: dict, *, evaluator: str = EVALUATOR, max_prompts: int | None = None):
    from preftune.endpoint import Endpoint
    from preftune.paths import EXAMPLES_DIR
    from preftune.spec import RunSpec

    models = zoo["models"]
    return RunSpec(
        dataset=str(EXAMPLES_DIR / "prompts.jsonl"), workspace=workspace,
        base_models=[models["tiny-llama"], models["tiny-qwen"]], betas=[0.1, 0.5],
        strong=Endpoint(model=models["tiny-strong"]), weak=Endpoint(model=models["tiny-weak"]),
        evaluator=evaluator, max_pair_prompts=160, pair_max_tokens=48,
        # The tiny weak generator often loops until max_tokens under greedy decoding: that rambling
        # answer is the non-preferred side delta learning wants, so truncated pairs are kept.
        keep_truncated=True, eval_max_new_tokens=48, max_length=192,
        max_eval_prompts=max_prompts or 60, epochs=2, batch_size=8, lr=1e-3,
        max_concurrent_jobs=2, target_win_rate=None, auto_approve_max_usd=0.0)


def real_demo_spec(workspace: str, zoo: dict, real: dict, *, evaluator: str = EVALUATOR, prompts: int = 40,
                   betas: tuple[float, ...] = (0.1, 0.5), pair_max_tokens: int = 96,
                   eval_max_new_tokens: int = 0, deploy: bool = True):
    """The flow on the real model: base = strong generator = SmolLM2-135M-Instruct, weak = tiny-weak.

    Sized for two CPU cores: `prompts` bundled prompts (80/20 split), answers of up to 96 tokens (most
    end before it: 32 cut most of them mid-sentence, and the evaluation's fitted limit follows them),
    one LoRA epoch per beta on 192-token sequences (the chat template's system prompt alone is ~30 tokens)."""
    from preftune.endpoint import Endpoint
    from preftune.paths import EXAMPLES_DIR
    from preftune.spec import RunSpec

    return RunSpec(
        dataset=str(EXAMPLES_DIR / "prompts.jsonl"), workspace=workspace,
        base_models=[real["path"]], betas=list(betas),
        strong=Endpoint(model=real["path"]), weak=Endpoint(model=zoo["models"]["tiny-weak"]),
        evaluator=evaluator, max_pair_prompts=prompts, pair_max_tokens=pair_max_tokens,
        # The weak side rambles to max_tokens (the non-preferred answer wanted); a strong answer cut at
        # max_tokens is still fluent English, so truncated pairs are kept here too.
        keep_truncated=True, eval_max_new_tokens=eval_max_new_tokens, max_length=192,
        max_eval_prompts=prompts, epochs=1, batch_size=4, lr=5e-4,
        max_concurrent_jobs=1, target_win_rate=None, deploy=deploy, auto_approve_max_usd=0.0)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="The whole flow offline on tiny local models and the bundled data.")
    p.add_argument("--workspace", help="Where the run writes (default: ./workspaces/demo, or demo-real).")
    p.add_argument("--real", action="store_true",
                   help="Run on the real instruct model SmolLM2-135M-Instruct (base and strong generator; the "
                   "weak generator is a tiny zoo model). About 4 minutes on two quiet CPU cores (4 min 06 s measured).")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Loading torch, transformers and prefect takes seconds quiet and a minute under load: say so first.
    print("preftune demo: loading torch, transformers and prefect ...", flush=True)
    from preftune.cli.common import ticking
    from preftune.cli.run import run_flow
    from preftune.workspace import default_workspace
    from preftune.zoo import build_zoo

    print("building (or reusing) the offline tiny-model zoo ...", flush=True)
    zoo = build_zoo()
    print(f"zoo ready in {zoo['dir']}", flush=True)
    if not args.real:
        workspace = args.workspace or str(default_workspace("demo"))
        return run_flow(demo_spec(workspace, zoo), as_json=args.json)
    from preftune.realmodel import build_real_model

    with ticking("building (or reusing) the real model SmolLM2-135M-Instruct (converting its GGUF once, ~30 s)"):
        real = build_real_model()
    print(f"real model ready in {real['path']}", flush=True)
    workspace = args.workspace or str(default_workspace("demo-real"))
    return run_flow(real_demo_spec(workspace, zoo, real), as_json=args.json)
