"""`preftune demo`: the embedded, offline default — zoo models, bundled prompts, the full flow."""

from __future__ import annotations

import argparse


def demo_spec(workspace: str, zoo: dict, *, evaluator: str = "preftune.judges.builtin:answer_quality",
              max_prompts: int | None = None):
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


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="The whole flow offline on tiny local models and the bundled data.")
    p.add_argument("--workspace", help="Where the run writes (default: ./workspaces/demo).")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from preftune.cli.run import run_flow
    from preftune.zoo import build_zoo

    print("building (or reusing) the offline tiny-model zoo ...", flush=True)
    zoo = build_zoo()
    print(f"zoo ready in {zoo['dir']}", flush=True)
    from preftune.workspace import default_workspace

    workspace = args.workspace or str(default_workspace("demo"))
    return run_flow(demo_spec(workspace, zoo), as_json=args.json)
