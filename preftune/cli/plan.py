"""`preftune plan`: what `preftune run` with the same flags would do, without running anything.

It resolves the instruction (flags win), inspects the dataset into a temporary folder, and prints
the resolved spec with each field's source and the plan a person would approve: the job grid and
the cost estimate. No request is sent to any generator or judge, no model is trained and the run's
workspace is not touched; the only request is the planner model's, when `--planner` is given.
Questions the run would ask (no base model: sweep the catalogue?; no evaluator) are shown as such.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from preftune.cli.run import add_spec_arguments, check_resolved, spec_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="Resolve an instruction and show the plan, without running anything.",
                       description="Print the resolved RunSpec (each field's source) and the plan `preftune run` "
                                   "would ask to approve. Sends no request except to --planner.")
    add_spec_arguments(p)
    p.add_argument("--json", action="store_true", help="Print {spec, resolved, unresolved, notes, plan} as JSON.")
    p.set_defaults(func=run)


def build_dry_plan(spec) -> tuple[dict, list[str]]:
    """The plan for `spec` with the run's pending questions left open: (plan, the questions)."""
    from preftune.catalogue import catalogue
    from preftune.server import device_name
    from preftune.spec import evaluator_kind
    from preftune.tasks.inspect import inspect_dataset
    from preftune.tasks.instruction.resolve import plan_rows
    from preftune.tasks.plan import build_plan, job_grid

    unresolved = (spec.instruction_plan or {}).get("unresolved", {})
    questions = [f"{k}: {why}" for k, why in unresolved.items()]
    base_models = list(spec.base_models)
    if not base_models:
        base_models = catalogue()
        questions.append("base models: none given; the run asks whether to sweep the catalogue (the plan below "
                         "assumes it does)")
    kind = evaluator_kind(spec.evaluator, spec.judge, spec.rubric)
    if kind is None:
        kind = "evaluator"  # priced as free: the question may name a judge, whose cost is then added
        questions.append("evaluator: none given; the run asks for a Python evaluator or a judge endpoint "
                         "(evaluation cost below is without a judge)")
    with tempfile.TemporaryDirectory(prefix="preftune-plan-") as tmp:
        inspection = inspect_dataset(spec.dataset, test_path=spec.test_dataset, models=base_models,
                                     max_length=spec.max_length, workspace=tmp)
    if inspection["format"] == "prompts" and (spec.strong is None or spec.weak is None):
        questions.append("generators: the dataset holds prompts only; the run needs --strong and --weak")
    plan = build_plan(spec, inspection, job_grid(spec, base_models), kind,
                      "gpu" if device_name() == "cuda" else "cpu", resolved=plan_rows(spec) if spec.instruction else None)
    if kind == "evaluator" and not spec.evaluator:
        plan["evaluator"]["summary"] = "not given: the run asks for a Python evaluator or a judge endpoint."
    return plan, questions


def run(args: argparse.Namespace) -> int:
    from preftune.cli.common import print_json
    from preftune.records import validate_files
    from preftune.tasks.plan import plan_markdown

    spec = spec_from_args(args)
    check_resolved(spec)
    validate_files(spec.dataset, spec.test_dataset)  # bad data: one line, exit 2
    plan, questions = build_dry_plan(spec)
    resolution = spec.instruction_plan or {}
    if args.json:
        print_json({"spec": spec.model_dump(mode="json", exclude={"instruction_plan"}),
                    "planner": resolution.get("planner"),
                    "resolved": plan["instruction"]["fields"] if "instruction" in plan else None,
                    "unresolved": resolution.get("unresolved", {}), "notes": resolution.get("notes", []),
                    "questions": questions, "plan": plan})
        return 0
    for note in resolution.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print(plan_markdown(plan))
    if questions:
        print("The run will ask:")
        for q in questions:
            print(f"- {q}")
    print("\nNothing was run. Start it with the same flags: preftune run ...")
    return 0
