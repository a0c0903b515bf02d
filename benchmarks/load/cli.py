"""Command line of the open-loop client: ``python -m benchmarks.load.openloop --help``.

    python -m benchmarks.load.openloop --url http://127.0.0.1:8080 --rate 12 --duration 120 \\
        --workload openorca --out benchmarks/results/tmp/run1
    python -m benchmarks.load.openloop --url http://127.0.0.1:8001 --concurrency 16 \\
        --num-requests 500 --workload sharegpt --api completions --no-stream

Prints the summary table; writes ``records.jsonl`` and ``summary.json`` into ``--out``. Exit
code 2 on a bad argument; 0 otherwise, whatever the requests' outcomes (they are in the files).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import uvloop

from benchmarks.load.openloop import SIM_PROMPT_TOKENS_FIELD, LoadConfig, run_load
from benchmarks.load.report import format_table
from benchmarks.load.workloads import WORKLOADS, make_workload


def _parse_params(items: list[str]) -> dict[str, int]:
    params: dict[str, int] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--workload-param wants key=value, got {item!r}")
        try:
            params[key.strip()] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--workload-param {key}: not an integer") from None
    return params


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.load.openloop",
        description="Open-loop (--rate) or closed-loop (--concurrency) load against an "
        "OpenAI-compatible URL; prints a summary table, writes records.jsonl + summary.json.",
    )
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--model", help="model name (default: the first listed at /v1/models)")
    p.add_argument("--api", choices=("chat", "completions"), default="chat")
    p.add_argument("--no-stream", dest="stream", action="store_false")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float, help="open loop: requests per second")
    mode.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    p.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape (1 = Poisson)")
    p.add_argument("--num-requests", type=int)
    p.add_argument("--duration", type=float, dest="duration_s", help="seconds of sending")
    p.add_argument("--workload", default="openorca", choices=sorted(WORKLOADS))
    p.add_argument(
        "--workload-param", action="append", default=[], metavar="KEY=INT",
        help="workload option, e.g. num_groups=4 or max_total_tokens=4096 (repeatable)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seeds the workload and the arrivals")
    p.add_argument("--timeout", type=float, default=600.0, dest="timeout_s")
    p.add_argument("--max-connections", type=int, default=0, help="open loop; 0 = unbounded")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument(
        "--no-sim-fields", dest="sim_prompt_tokens", action="store_false",
        help=f"do not send the simulator's {SIM_PROMPT_TOKENS_FIELD!r} field",
    )  # fmt: skip
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--out", type=Path, help="output directory (default under benchmarks/results/tmp)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        workload = make_workload(args.workload, args.seed, **_parse_params(args.workload_param))
        cfg = LoadConfig(
            base_url=args.url,
            workload=workload,
            model=args.model,
            api=args.api,
            stream=args.stream,
            rate=args.rate,
            burstiness=args.burstiness,
            concurrency=args.concurrency,
            num_requests=args.num_requests,
            duration_s=args.duration_s,
            seed=args.seed,
            timeout_s=args.timeout_s,
            max_connections=args.max_connections,
            ignore_eos=args.ignore_eos,
            sim_prompt_tokens=args.sim_prompt_tokens,
            progress=sys.stderr.isatty() if args.progress is None else args.progress,
        )
    except (ValueError, argparse.ArgumentTypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = uvloop.run(run_load(cfg))
    out = args.out or Path("benchmarks/results/tmp") / time.strftime("openloop-%Y%m%d-%H%M%S")
    records_path, summary_path = result.write(out)
    print(format_table(result.summary, title=cfg.title()))
    print(f"records: {records_path}\nsummary: {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
