"""`preftune train`: one preference-training job (DPO family, LoRA or full).

Its flags are generated from `preftune.job.TrainConfig` (names, types, choices, defaults and help
all come from the model). A sweep writes each job as `jobs/<id>/job.json` and runs
`preftune train --config jobs/<id>/job.json`; flags given beside --config override its fields.
"""

from __future__ import annotations

import argparse
import os

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
    if cfg.devices:  # pinned (by the sweep's placement, or --devices): before torch sees a GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = cfg.devices
    if cfg.processes > 1 and "WORLD_SIZE" not in os.environ:
        _launch_processes(cfg, args.json)  # does not return
    if "TORCHELASTIC_RUN_ID" in os.environ:  # one of torchrun's processes: never outlive it
        from preftune.procs import die_with_parent

        die_with_parent()
    from preftune.tasks.training import run_training

    summary = run_training(cfg)
    if os.environ.get("RANK", "0") != "0":  # launched on several processes: the first one reports
        return 0
    if args.json:
        print_json(summary)
    else:
        acc = summary.get("eval_reward_accuracy")
        print(f"trained {summary['steps']} steps, train loss {summary['train_loss']:.4f}"
              + (f", eval reward accuracy {acc:.3f}" if acc is not None else "")
              + f"; wrote {summary['adapter_dir'] or summary['model_dir']}")
    return 0


def _launch_processes(cfg, as_json: bool) -> None:
    """Re-run this job on `cfg.processes` processes: torchrun takes this process's place (same pid,
    so whoever waits on it, or kills it, has the whole job). The resolved config goes to a file."""
    import sys

    from preftune.files import write_text_atomic
    from preftune.job import train_command

    cfg.out.mkdir(parents=True, exist_ok=True)
    path = cfg.out / "launch.json"
    write_text_atomic(path, cfg.model_dump_json(indent=2) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, train_command(path, cfg.processes, as_json))
