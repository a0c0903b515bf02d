"""Start N simulated replicas on consecutive ports and serve them until SIGINT/SIGTERM.

    python -m benchmarks.sim --replicas 8 --profile a10g-llama3-8b --engine vllm-v1 --port 8001

Prints one URL per line once every replica has its port (they may still be cold-starting:
``--load-time-s 0`` makes them ready at once), then serves until SIGINT/SIGTERM and stops
cleanly. Faults are injected at run time with ``POST <url>/sim/control`` (see ``faults``).
Exit code 2 on a bad argument (unknown profile, unknown profile field, bad value).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import get_args

import uvloop

from benchmarks.sim.exposition import Flavour
from benchmarks.sim.profiles import PROFILES, get_profile
from benchmarks.sim.server import ReplicaSettings, run_replicas


def _override(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    value: object
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    else:
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                value = raw
    return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sim", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--replicas", type=int, default=1, help="how many replicas (default 1)")
    parser.add_argument("--profile", default="a10g-llama3-8b", choices=sorted(PROFILES))
    parser.add_argument("--engine", default="vllm-v1", choices=get_args(Flavour))
    parser.add_argument("--port", type=int, default=8001, help="first port; 0 = free ports")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", default=None, help="served model name (default: the profile's)")
    parser.add_argument("--load-time-s", type=float, default=None, help="default: the profile's")
    parser.add_argument("--listen-delay-s", type=float, default=0.0)
    parser.add_argument("--output-tokens-mean", type=float, default=256.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--api-key",
        default=None,
        help="as vLLM's --api-key: /v1 routes answer 401 without 'Authorization: Bearer <key>'",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        type=_override,
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override one profile field, e.g. --set num_gpu_blocks=1800 (repeatable)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error("--replicas must be >= 1")
    if args.port != 0 and not 0 < args.port + args.replicas - 1 < 65536:
        parser.error("--port out of range")
    try:
        get_profile(args.profile, **dict(args.overrides))
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    return args


async def serve(args: argparse.Namespace) -> None:
    settings = ReplicaSettings(
        profile=args.profile,
        profile_overrides=dict(args.overrides),
        flavour=args.engine,
        model=args.model,
        host=args.host,
        listen_delay_s=args.listen_delay_s,
        load_time_s=args.load_time_s,
        output_tokens_mean=args.output_tokens_mean,
        api_key=args.api_key,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    base_port = args.port or None
    async with run_replicas(args.replicas, settings, seed=args.seed, base_port=base_port) as reps:
        for replica in reps:
            print(replica.url, flush=True)
        await stop.wait()
    logging.getLogger(__name__).info("stopped %d replicas", len(reps))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        uvloop.run(serve(args))
    except OSError as exc:  # typically: a port is already in use
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
