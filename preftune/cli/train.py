"""`preftune train`: one preference-training job (DPO family, LoRA or full)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train one preference-tuning job (DPO, IPO, hinge, SimPO, ORPO; LoRA or full)",
        description="Train a base model on preference pairs. Re-running the same command resumes an "
        "interrupted job from its last checkpoint; a finished job is not run again.")
    p.add_argument("--data", required=True, help="training pairs (JSONL, any pair format `inspect` accepts)")
    p.add_argument("--model", required=True, help="base model: a local Hugging Face model folder")
    p.add_argument("--out", required=True, help="job folder (metrics.jsonl, summary.json, adapter/)")
    p.add_argument("--eval-data", help="held-out pairs for the final eval loss and reward accuracy")
    p.add_argument("--loss", default="dpo", choices=["dpo", "ipo", "hinge", "simpo", "orpo"])
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--normalize-by-length", action="store_true", help="divide log-ratios by completion length")
    p.add_argument("--reference-free", action="store_true", help="DPO without a reference model")
    p.add_argument("--rpo-alpha", type=float, default=0.0, help="weight of an NLL term on the preferred answer")
    p.add_argument("--simpo-gamma", type=float, default=0.0, help="SimPO target margin")
    p.add_argument("--orpo-lambda", type=float, default=0.1, help="ORPO odds-ratio weight")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-target", default="all-linear", help="'all-linear' or e.g. 'q_proj,v_proj'")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-prompt-length", type=int)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--scheduler", default="linear", choices=["linear", "cosine"])
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--ref-cache", help="shared reference log-prob cache folder")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N optimizer steps")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print summary.json")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace, progress: bool):
    from pydantic import ValidationError

    from preftune.errors import UserError
    from preftune.tasks.training.config import TrainConfig

    fields = dict(
        data=args.data, eval_data=args.eval_data, model=args.model, out=args.out, loss_type=args.loss,
        beta=args.beta, normalize_by_length=args.normalize_by_length, reference_free=args.reference_free,
        rpo_alpha=args.rpo_alpha, simpo_gamma=args.simpo_gamma, orpo_lambda=args.orpo_lambda,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_target=args.lora_target, full=args.full, lr=args.lr, epochs=args.epochs,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length,
        max_prompt_length=args.max_prompt_length, warmup_ratio=args.warmup_ratio, scheduler=args.scheduler,
        max_grad_norm=args.max_grad_norm, seed=args.seed, gradient_checkpointing=args.gradient_checkpointing,
        ref_cache=args.ref_cache, log_every=args.log_every, save_every=args.save_every,
        num_threads=args.threads, progress=progress)
    try:
        return TrainConfig(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        name = ".".join(str(p) for p in first["loc"])
        flag = {"loss_type": "loss", "num_threads": "threads"}.get(name, name).replace("_", "-")
        message = first["msg"].removeprefix("Value error, ")
        raise UserError(f"--{flag}: {message}" if name else message) from None


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
