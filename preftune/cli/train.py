"""`preftune train`: one preference-training job (DPO family, LoRA or full).

Its flags are generated from `preftune.job.TrainConfig` (names, types, choices, defaults and help
all come from the model). A sweep writes each job as `jobs/<id>/job.json` and runs
`preftune train --config jobs/<id>/job.json`; flags given beside --config override its fields.
"""

from __future__ import annotations

import argparse

# Operational fields that are set by the flags below (or by the sweep), not by hand-made options.
_SKIP = {"progress"}


def add_parser(subparsers) -> None:
    from preftune.cli.flags import add_model_flags
    from preftune.job import TrainConfig

    p = subparsers.add_parser(
        "train", help="train one preference-tuning job (DPO, IPO, hinge, SimPO, ORPO; LoRA or full)",
        description="Train a base model on preference pairs. Re-running the same command resumes an "
        "interrupted job from its last checkpoint; a finished job is not run again.")
    p.add_argument("--config", metavar="JOB_JSON", help="a job file (as the sweep writes jobs/<id>/job.json); "
                   "flags given beside it override its fields")
    add_model_flags(p, TrainConfig, skip=_SKIP)
    p.add_argument("--json", action="store_true", help="print summary.json")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace, progress: bool):
    from preftune.cli.flags import build, given
    from preftune.errors import UserError
    from preftune.files import read_json
    from preftune.job import TrainConfig

    data: dict = {}
    if args.config:
        try:
            data = read_json(args.config)
        except FileNotFoundError:
            raise UserError("job file not found", path=args.config) from None
        except ValueError as err:
            raise UserError(f"not a JSON job file ({err})", path=args.config) from None
    data |= given(args, TrainConfig, _SKIP) | {"progress": progress}
    return build(TrainConfig, data, where=f"{args.config}: " if args.config else "")


def run(args: argparse.Namespace) -> int:
    from preftune.cli.common import is_tty, print_json
    from preftune.records import load_pairs

    cfg = config_from_args(args, progress=is_tty())
    # Validate the data before importing torch/transformers (seconds): bad input fails at once.
    for path in filter(None, (cfg.data, cfg.eval_data)):
        if path.is_file():
            load_pairs(path)
    from preftune.tasks.training import run_training

    summary = run_training(cfg)
    if args.json:
        print_json(summary)
    else:
        acc = summary.get("eval_reward_accuracy")
        print(f"trained {summary['steps']} steps, train loss {summary['train_loss']:.4f}"
              + (f", eval reward accuracy {acc:.3f}" if acc is not None else "")
              + f"; wrote {summary['adapter_dir'] or summary['model_dir']}")
    return 0
