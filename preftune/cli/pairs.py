"""`preftune pairs` — phase 3: delta-learning pairs from a prompts-only dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from preftune.cli.common import print_json
from preftune.cli.flags import add_endpoint_flags, endpoint_from_args


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "pairs", help="make preference pairs from prompts with a strong and a weak model",
        description="For each prompt, the strong model's completion becomes the preferred output and the weak "
                    "model's the non-preferred one (delta learning). Failed, empty, identical and truncated "
                    "completions are filtered out and counted. Writes a new DIR/pairs-<UTC timestamp>.jsonl "
                    "and DIR/provenance.json; the prompts file is only read. A re-run reuses every finished "
                    "request from the cache.")
    p.add_argument("--prompts", required=True, metavar="DATA", help="prompts-only JSONL ({\"messages\": [...]})")
    add_endpoint_flags(p, "strong", required=True,
                       help="the preferred-side model: MODEL@BASE_URL of an OpenAI-compatible API, or a local "
                            "model folder (served automatically, continuously batched)")
    add_endpoint_flags(p, "weak", required=True, help="the non-preferred-side model")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (e.g. WORKSPACE/pairs)")
    p.add_argument("--max-tokens", type=int, default=256, metavar="N", help="completion length cap (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="F", help="sampling temperature (default 0: greedy)")
    p.add_argument("--concurrency", type=int, default=None, metavar="N",
                   help="requests in flight per endpoint (default: what a local server batches, else 16)")
    p.add_argument("--max-retries", type=int, default=6, metavar="N", help="retries per request (default 6)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="seconds per request to a remote endpoint (default 60); a local folder's server "
                        "is waited on while it lives and answers")
    p.add_argument("--keep-truncated", action="store_true",
                   help="keep pairs whose completion stopped at --max-tokens")
    p.add_argument("--json", action="store_true", help="print the provenance as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import contextlib

    from preftune.errors import UserError
    from preftune.records import iter_records
    from preftune.server import ServerError, resolve_endpoints
    from preftune.tasks.pairs import generate_pairs

    if args.concurrency is not None and args.concurrency < 1:
        raise UserError(f"--concurrency must be >= 1, got {args.concurrency}")
    out = Path(args.out)
    for _ in iter_records(args.prompts, expect="prompts"):  # bad input: one line, before any server starts
        pass
    with contextlib.ExitStack() as stack:
        try:
            eps = [endpoint_from_args(args, side) for side in ("strong", "weak")]
            strong, weak = resolve_endpoints(eps, log_dir=out / "logs", stack=stack)
        except ServerError as err:
            raise UserError(str(err).splitlines()[0] + f" (see {out / 'logs'})") from None
        prov = generate_pairs(args.prompts, strong, weak, out, max_tokens=args.max_tokens,
                              temperature=args.temperature, concurrency=args.concurrency,
                              keep_truncated=args.keep_truncated, max_retries=args.max_retries,
                              timeout=args.timeout)
    if args.json:
        print_json(prov)
    else:
        print(render_text(prov))
    if prov["counts"]["pairs"] == 0:  # nothing usable came out: not a success
        reasons = ", ".join(f"{k} {v}" for k, v in prov["counts"]["by_reason"].items() if v)
        print(f"preftune pairs: no usable pair from {prov['counts']['prompts']} prompts ({reasons}); "
              f"see {Path(prov['pairs_file']).parent / 'provenance.json'}", file=sys.stderr)
        return 1
    return 0


def render_text(prov: dict) -> str:
    c = prov["counts"]
    reasons = ", ".join(f"{k} {v}" for k, v in c["by_reason"].items())
    u = prov["usage"]
    lines = [f"pairs     {c['pairs']:,} of {c['prompts']:,} prompts -> {prov['pairs_file']}",
             f"dropped   {c['dropped']:,} ({reasons})"]
    for side in ("strong", "weak"):
        s = u[side]
        lines.append(f"{side:<9} {s['endpoint']}: {s['requests']:,} requests ({s['retries']:,} retries, "
                     f"{s['cache_hits']:,} from cache), {s['prompt_tokens']:,} prompt + "
                     f"{s['completion_tokens']:,} completion tokens")
    lines.append(f"time      {prov['wall_time_s']:.1f} s; provenance in {Path(prov['pairs_file']).parent / 'provenance.json'}")
    return "\n".join(lines)
