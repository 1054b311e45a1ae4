"""`preftune evaluate`: phase 5 on its own — completions for the base and each candidate on held-out
prompts, scored by a Python evaluator or a pairwise LLM judge; writes DIR/scores.json."""

from __future__ import annotations

import argparse
from typing import Any

from preftune.cli.flags import add_endpoint_flags, endpoint_from_args
from preftune.errors import UserError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="score base vs candidates on held-out prompts (judge or evaluator)",
                       description=__doc__)
    p.add_argument("--test", required=True, metavar="DATA", help="held-out JSONL (pairs or prompts only)")
    p.add_argument("--base", required=True, metavar="MODEL", help="base model folder, or MODEL@BASE_URL")
    p.add_argument("--candidate", action="append", default=[], metavar="NAME=ADAPTER_DIR",
                   help="a candidate: LoRA adapter folder on the base (or MODEL@BASE_URL); repeatable")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--evaluator", metavar="ID",
                     help="Python evaluator package.module:function or file.py:function "
                          "(bundled: judges.builtin:answer_quality)")
    how.add_argument("--rubric", metavar="TEXT", help="rubric text for the pairwise judge")
    how.add_argument("--auto-rubric", action="store_true",
                     help="the judge writes a rubric from training pairs (--train); the default without "
                          "--evaluator/--rubric")
    add_endpoint_flags(p, "judge", help="OpenAI-compatible judge endpoint, MODEL@BASE_URL")
    p.add_argument("--train", metavar="DATA", help="training pairs the auto rubric is written from")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (scores.json, completions/, ...)")
    p.add_argument("--max-new-tokens", type=int, default=0, metavar="N",
                   help="max tokens per answer; 0 (default): fitted to the held-out preferred answers (their p90 "
                        "in the base model's tokens, 16-512)")
    p.add_argument("--max-prompts", type=int, default=200, metavar="N", help="use the first N test prompts")
    p.add_argument("--judge-concurrency", type=int, default=16, metavar="N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print scores.json to stdout")
    p.set_defaults(func=run)


def _candidates(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        name, sep, target = value.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise UserError(f"--candidate {value!r}: expected NAME=ADAPTER_DIR")
        if name in out:
            raise UserError(f"--candidate {name!r} given twice")
        out[name.strip()] = target.strip()
    return out


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _print_table(scores: dict) -> None:
    models = scores["models"]
    if scores["mode"] == "evaluator":
        print(f"{'model':<20} {'n':>5} {'mean':>7} {'95% CI':>17} {'errors':>7}")
        for name, m in models.items():
            ci = f"[{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}]"
            print(f"{name:<20} {m['n']:>5} {_fmt(m['mean_score']):>7} {ci:>17} {m['errors']:>7}")
        cal = scores.get("judge_validity") or {}
        if cal.get("judgments_valid"):
            print(f"evaluator agreement with {cal.get('labels', 'the')} labels: {_fmt(cal['agreement'])} "
                  f"[{_fmt(cal.get('agreement_ci_low'))}, {_fmt(cal.get('agreement_ci_high'))}]; longer answer "
                  f"wins: {_fmt(cal.get('length_baseline'))}")
    else:
        print(f"{'candidate':<20} {'n':>5} {'W/T/L/inv':>15} {'win rate':>9} {'95% CI':>17} {'LC':>7}")
        for name, m in models.items():
            wtl = f"{m['wins']}/{m['ties']}/{m['losses']}/{m['invalid']}"
            ci = f"[{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}]"
            print(f"{name:<20} {m['n']:>5} {wtl:>15} {_fmt(m['win_rate']):>9} {ci:>17} "
                  f"{_fmt(m['lc_win_rate']):>7}")
        cal = scores.get("judge_validity") or {}
        print(f"judge agreement with {cal.get('labels', 'the')} labels: {_fmt(scores['judge_agreement'])} "
              f"[{_fmt(cal.get('agreement_ci_low'))}, {_fmt(cal.get('agreement_ci_high'))}]; longer answer wins: "
              f"{_fmt(cal.get('length_baseline'))}; position consistency: {_fmt(scores['position_consistency'])}")
    sel = scores.get("selection") or {}
    print(f"selection: {sel.get('verdict', '?')}; recommended: {sel.get('recommended') or 'none'}")
    for w in scores["warnings"]:
        print(f"warning: {w}")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from preftune.cli.common import print_json
    from preftune.judges.evaluators import trust_command_line
    from preftune.tasks.evaluate import EvalConfig, load_test, run_evaluation
    from preftune.tasks.evaluate_checks import token_limit_for

    if args.max_new_tokens < 0 or args.max_prompts < 1:
        raise UserError("--max-new-tokens must be at least 0 and --max-prompts at least 1")
    trust_command_line(args.evaluator)  # the owner's own flag: it may name any file
    judge = endpoint_from_args(args, "judge")
    if judge is not None and judge.is_local:
        raise UserError(f"--judge {args.judge!r}: expected MODEL@BASE_URL of an OpenAI-compatible API")
    cfg = EvalConfig(test_data=Path(args.test), base_model=args.base, candidates=_candidates(args.candidate),
                     out_dir=Path(args.out), evaluator=args.evaluator, rubric=args.rubric,
                     auto_rubric=args.auto_rubric, train_data=Path(args.train) if args.train else None,
                     judge=judge, max_prompts=args.max_prompts,
                     max_new_tokens=args.max_new_tokens or token_limit_for(
                         args.base, load_test(Path(args.test), args.max_prompts)[1])["value"],
                     judge_concurrency=max(1, args.judge_concurrency), seed=args.seed)
    scores = run_evaluation(cfg)
    if args.json:
        print_json(scores)
    else:
        _print_table(scores)
        print(f"wrote {Path(args.out) / 'scores.json'}")
    return 0
