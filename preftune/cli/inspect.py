"""`preftune inspect DATA` — phase 1: validate, measure, dedupe and split a dataset."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from preftune.cli.common import print_json
from preftune.errors import UserError


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inspect", help="validate a dataset, show its statistics, and split it into train/test",
        description="Validate every line of a JSONL dataset (OpenAI/Fireworks pairs, TRL prompt/chosen/"
                    "rejected, or prompts only), remove exact duplicates, count tokens per model, and write "
                    "inspection.json plus data/train.jsonl and data/test.jsonl to the workspace.")
    p.add_argument("data", metavar="DATA", help="the dataset (JSONL); it is only read")
    p.add_argument("--test", metavar="DATA", help="a held-out test set instead of the 80/20 split by prompt")
    p.add_argument("--model", action="append", default=[], metavar="MODEL",
                   help="token statistics with this model's tokenizer and chat template: a local folder or "
                        "a hub id already in the local cache (repeatable)")
    p.add_argument("--max-length", type=int, metavar="N",
                   help="count the examples whose prompt + longer answer exceed N tokens")
    p.add_argument("--workspace", metavar="DIR", help="where to write (default: ./workspaces/<dataset name>)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from preftune.records import DatasetError
    from preftune.tasks.inspect import inspect_dataset

    try:
        report = inspect_dataset(args.data, test_path=args.test, models=args.model,
                                 max_length=args.max_length, workspace=args.workspace)
    except UserError as err:
        if isinstance(err, DatasetError):
            errors, total, lines = err.errors, err.total, err.lines()
        else:
            errors, total, lines = [(err.line, err.message)], 1, [str(err)]
        if args.json:
            print_json({"errors": [{"line": line, "message": msg} for line, msg in errors],
                        "total_errors": total, "path": err.path})
        print(f"preftune inspect: error: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            print(line, file=sys.stderr)
        return err.exit_code
    if args.json:
        print_json(report)
    else:
        print(render_text(report))
    return 0


def _table(stats: dict[str, dict[str, float]]) -> str:
    import pandas as pd

    df = pd.DataFrame(stats).T[["mean", "p50", "p95", "max"]]
    return df.to_string(float_format=lambda v: f"{v:,.1f}", formatters={"max": lambda v: f"{int(v):,}"})


def render_text(r: dict[str, Any]) -> str:
    """The human-readable report."""
    split = r["split"]
    how = (f"hash split, {split['test_percent']}% test" if split["method"] == "hash"
           else f"test set {split['test_source']}")
    out = [
        f"dataset   {r['source']}",
        f"format    {r['format']} ({r['source_format']})   sha256 {r['sha256']}",
        f"examples  {r['examples']:,}   duplicates removed {r['duplicates']:,}   "
        f"train {r['train_examples']:,}   test {r['test_examples']:,}   ({how})",
    ]
    if split.get("overlap_removed"):
        out.append(f"          {split['overlap_removed']:,} training examples dropped: their prompt is in the test set")
    roles = ", ".join(f"{k} {v:,}" for k, v in r["roles"].items() if v)
    out.append(f"turns     mean {r['turns']['mean']}, max {r['turns']['max']}   prompt roles: {roles}   "
               f"with system {r['with_system']:,}   with tools {r['with_tools']:,}")
    if r.get("preferred_longer_share") is not None:
        out.append(f"preferred answer longer (characters): {r['preferred_longer_share']:.1%} of pairs")
    out += ["", "characters", _table(r["chars"])]
    for model, stats in r["token_stats"].items():
        share = stats.get("preferred_longer_share")
        out += ["", f"tokens ({model})", _table({k: v for k, v in stats.items() if isinstance(v, dict)})]
        if share is not None:
            out.append(f"preferred answer longer (tokens): {share:.1%} of pairs")
        if model in r["truncated"]:
            out.append(f"over --max-length {r['max_length']}: {r['truncated'][model]:,} examples would be truncated")
    out += diagnostics_lines(r.get("diagnostics"))
    warnings = r["warnings"] + (r.get("diagnostics") or {}).get("warnings", [])
    if warnings:
        out += [""] + [f"warning: {w}" for w in warnings]
    out += ["", f"wrote {r['workspace']}/inspection.json, data/train.jsonl, data/test.jsonl"]
    return "\n".join(out)


def _name(model: str) -> str:
    return model.rstrip("/").split("/")[-1]


def diagnostics_lines(d: dict | None) -> list[str]:
    """The pair diagnostics (tasks/diagnostics.py) as text lines; their warnings are printed apart."""
    if not d:
        return []
    out = ["", f"diagnostics ({d['source']})"]
    if "preferred_longer" in d:
        longer = d["preferred_longer"]
        tokens = "".join(f"; {s:.1%} (tokens, {_name(m)})" for m, s in longer["tokens"].items() if s is not None)
        out.append(f"  length shortcut: preferred answer longer in {longer['characters']:.1%} of pairs "
                   f"(characters){tokens}")
        c = d["classifier"]
        acc = "too few pairs" if c["accuracy"] is None else f"{c['accuracy']:.1%} held-out accuracy"
        out.append(f"  surface-feature classifier: {acc} ({c['folds']}-fold, {c['pairs']:,} pairs; chance 50%)")
        for model, cut in d["cut"].items():
            out.append(f"  answers cut by --max-length {cut['max_length']} ({_name(model)}): preferred "
                       f"{cut['preferred']:,}, non-preferred {cut['non_preferred']:,}")
        out.append(f"  answers equal up to case and spacing: {d['answers']['identical_normalised']:,} "
                   "(empty and identical answers are refused by validation)")
    n = d["near_duplicates"]
    out.append(f"  near-duplicate prompts across the split: {n['near_duplicates']:,} of {n['train_prompts']:,} "
               f"training prompts (Jaccard ≥ {n['threshold']} to one of {n['test_prompts']:,} held-out)")
    return out
