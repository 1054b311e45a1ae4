"""`preftune run`: the whole flow from the command line, every RunSpec field as a flag."""

from __future__ import annotations

import argparse
import sys

from preftune.errors import UserError

# Flags built by hand: list fields (repeatable flags), the endpoints and the headless approval. Every
# other RunSpec field gets a generated flag (preftune/cli/flags.py), the job fields included.
_NESTED = {"losses", "strong", "weak", "judge", "planner", "auto_approve_max_usd", "base_models", "betas", "dataset"}
# The flag a list field is given with, for error messages.
_LIST_FLAGS = {"betas": "--beta", "losses": "--loss", "base_models": "--base-model"}


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    from preftune.cli.flags import add_endpoint_flags, add_model_flags
    from preftune.spec import RunSpec

    parser.add_argument("--dataset", default=None,
                        help="JSONL dataset: preference pairs or prompts only (or name it in --instruction).")
    parser.add_argument("--base-model", dest="base_models", action="append", default=None,
                        help="Base model folder or cached id (repeat). None: the catalogue.")
    parser.add_argument("--beta", dest="betas", type=float, action="append", default=None, help="Repeat to sweep.")
    parser.add_argument("--loss", dest="losses", action="append", default=None,
                        help="dpo|ipo|hinge|simpo|orpo, optionally with options: "
                        "'dpo:normalize_by_length=true,rpo_alpha=0.5' (repeat to sweep).")
    for role in ("strong", "weak", "judge"):
        add_endpoint_flags(parser, role, help=f"{role} model: MODEL@BASE_URL, or a local model folder preftune serves.")
    add_endpoint_flags(parser, "planner", prices=False,
                       help="MODEL@BASE_URL of an OpenAI-compatible model that reads --instruction (structured "
                       "output); without it the offline parser reads it.")
    add_model_flags(parser, RunSpec, skip=_NESTED)
    parser.add_argument("--yes", action="store_true",
                        help="Approve by itself when the high estimate is within --max-cost-usd.")
    parser.add_argument("--max-cost-usd", type=float, default=0.0, help="Limit for --yes (default $0).")


def _value(text: str) -> bool | float:
    low = text.strip().lower()
    if low in ("true", "yes", "false", "no"):
        return low in ("true", "yes")
    return float(low)


def _loss(text: str) -> dict:
    """'dpo' or 'dpo:normalize_by_length=true,rpo_alpha=0.5' → a LossOptions' fields."""
    name, _, opts = text.partition(":")
    out: dict = {"loss_type": name}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = _value(value)
        except ValueError:
            raise UserError(f"--loss {text!r}: {key.strip()} needs a number or true/false") from None
    return out


def explicit_from_args(args: argparse.Namespace) -> dict:
    """The RunSpec fields the flags give (only what was typed), --instruction excluded."""
    from preftune.cli.flags import endpoint_from_args, given
    from preftune.spec import RunSpec

    data: dict = given(args, RunSpec, _NESTED | {"instruction"})
    if args.dataset:
        data["dataset"] = args.dataset
    if args.base_models:
        data["base_models"] = args.base_models
    if args.betas:
        data["betas"] = args.betas
    if args.losses:
        data["losses"] = [_loss(x) for x in args.losses]
    for role in ("strong", "weak", "judge"):
        if getattr(args, role):
            data[role] = endpoint_from_args(args, role)
    if args.yes:
        data["auto_approve_max_usd"] = args.max_cost_usd
    return data


def spec_from_args(args: argparse.Namespace):
    """The RunSpec the flags describe; with --instruction, resolved from it (flags win)."""
    from preftune.cli.flags import build, endpoint_from_args
    from preftune.spec import RunSpec

    data = explicit_from_args(args)
    planner = endpoint_from_args(args, "planner")
    if not args.instruction:
        if planner is not None:
            raise UserError("--planner reads an --instruction: give one")
        if "dataset" not in data:
            raise UserError("give --dataset (or an --instruction that names one)")
        return build(RunSpec, data, names=_LIST_FLAGS)
    build(RunSpec, {**data, "instruction": args.instruction}, names=_LIST_FLAGS)  # bad flags: named as flags
    from preftune.tasks.instruction.resolve import resolve

    return resolve(args.instruction, data, planner=planner)


def check_resolved(spec) -> None:
    """A run cannot start on what the instruction left open and no question of the run can settle:
    the dataset, the generators of a prompts-only dataset; headless (--yes), a base model it named
    that nothing matches (a person would be asked)."""
    plan = spec.instruction_plan or {}
    open_ = {k: v for k, v in plan.get("unresolved", {}).items() if k not in ("base_models", "evaluator")}
    if spec.auto_approve_max_usd is not None and "base_models" in plan.get("unresolved", {}):
        open_["base_models"] = plan["unresolved"]["base_models"]  # headless: a person would be asked
    if not spec.dataset and "dataset" not in open_:
        open_["dataset"] = "the instruction names no dataset"
    if open_:
        flags = ", ".join(_LIST_FLAGS.get(k) or f"--{k.replace('_', '-')}" for k in open_)
        raise UserError(f"{'; '.join(open_.values())}: give {flags} (or say it in the instruction)")


def run_flow(spec, *, as_json: bool) -> int:
    from preftune.cli.common import print_json
    from preftune.errors import run_outcome
    from preftune.flows.pipeline import preference_learning

    check_workspace_free(spec)
    state = preference_learning(spec, return_state=True)
    outcome = run_outcome(state.result(raise_on_failure=False))
    if isinstance(outcome, BaseException):  # a crash, or bad input (a UserError: one line, exit 2)
        raise outcome
    if outcome["status"] == "refused":  # another live run holds the workspace (it got there first)
        raise UserError(outcome["reason"])
    if as_json:
        print_json(outcome)
    else:
        print_outcome(outcome)
    return EXIT_CODES.get(outcome["status"], 1)


# The CLI's exit code for each outcome (the flow run's Prefect state says the same: completed →
# Completed, failed → Failed, rejected → Cancelled). A refused run (workspace in use) is exit 2.
EXIT_CODES = {"completed": 0, "failed": 1, "rejected": 3}


def check_workspace_free(spec) -> None:
    """Refuse at once, before a flow run exists, when a live run holds the workspace or it is not this
    user's alone."""
    from preftune.files import LockHeld, exclusive
    from preftune.workspace import Workspace, in_use_message

    ws = Workspace(spec.workspace_path()).checked()
    if not ws.lock.exists():
        return
    try:
        with exclusive(ws.lock, {}):
            pass
    except LockHeld as held:
        raise UserError(in_use_message(ws.root, held.holder)) from None


def print_outcome(outcome: dict) -> None:
    print(f"run {outcome['status']}" + (f": {outcome['reason']}" if outcome.get("reason") else ""))
    print(f"workspace: {outcome['workspace']}")
    if outcome.get("report"):
        print(f"report:    {outcome['report']}")
    ep = outcome.get("endpoint")
    if ep:
        print(f"endpoint:  {ep['base_url']}  (model {ep['model']})")
        print(f"still running: the deployed model's server at {ep['base_url']}; stop it with "
              f"`preftune deploy --stop --workspace {outcome['workspace']}`")


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="Run the seven-phase flow on a dataset.",
                       description="Run the flow against the Prefect API in PREFECT_API_URL (or an ephemeral one).")
    add_spec_arguments(p)
    p.add_argument("--json", action="store_true", help="Print the outcome as JSON.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from preftune.backends import check_local_backend
    from preftune.judges.evaluators import trust_command_line
    from preftune.records import validate_files

    trust_command_line(getattr(args, "evaluator", None))  # the owner's own flag (a form cannot reach this)
    spec = spec_from_args(args)
    check_resolved(spec)
    validate_files(spec.dataset, spec.test_dataset)  # bad data is one line and exit 2 before any flow run exists
    check_local_backend()  # PREFTUNE_LOCAL_SERVER=vllm without vLLM: one line, before anything is asked
    if not spec.base_models:
        print("no --base-model given: the run will ask to confirm a sweep over the catalogue", file=sys.stderr)
    return run_flow(spec, as_json=args.json)
