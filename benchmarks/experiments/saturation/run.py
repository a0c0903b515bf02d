"""Saturation bounds at 120 % of capacity: where does the overload wait, and what does the client
see? Real gateway processes in front of simulated replicas, over HTTP.

    python -m benchmarks.experiments.saturation [--seeds 3] [--duration-s 20] [--bound queue:2]

Setup: ``--replicas`` simulated A10G / Llama-3.1-8B replicas (``benchmarks.sim``, one process)
with the KV cache scaled down to ``--kv-blocks`` blocks, so a replica fits ~11 requests of the
workload (prompts uniform in 128-512 tokens, outputs exponential with mean 96, at most 384: long
and short generations mixed) and the whole cluster streams about a thousand tokens a second —
little enough that the gateway, the replicas and the load generator (three processes) do not
starve each other. Step times are the A10G profile's, in real time.

1. Capacity: a closed loop at twice the cluster's KV-fitting concurrency through a gateway with
   the bound, every replica running its full batch; the replicas' generated tokens per second
   after a warm-up, over the workload's mean output length, is the capacity in requests/s.
2. Three arms, each with a fresh gateway and fresh replicas per seed (arms interleaved), an
   open-loop Poisson load at ``--load`` x capacity for ``--duration-s``, streaming, p2c:

   * ``no bound``: every request is dispatched at once; the overload queues inside the engines
     (KV full: requests wait in the engine's queue, running ones get preempted);
   * ``bound``: the saturation bound (default ``max_queue_per_replica: 2``: at most two
     requests wait inside an engine); the rest waits in the gateway's buffer and goes to
     whichever replica frees first (late binding);
   * ``bound + max wait``: the same with ``buffer.max_wait_s``: what cannot start in time is
     refused (429 with Retry-After) instead of waiting without limit.

Measured: client TTFT (send to first token) of the requests that succeeded, pooled over seeds
(and each seed's p99, for the run-to-run spread), end-to-end time, refusals, throughput, and
the peaks of the engines' waiting queues and of the gateway's queue (sampled every 200 ms).
At 120 % the backlog grows for as long as the overload lasts in every arm, so absolute TTFTs
depend on ``--duration-s``; arms are compared at equal duration.

Prints a table and writes ``benchmarks/results/saturation.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import random
import signal
import socket
import statistics
import sys
import tempfile
import time
from asyncio.subprocess import PIPE
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from benchmarks.load.openloop import LoadConfig, run_load
from benchmarks.load.report import distribution
from benchmarks.load.workloads import LengthModel, LengthWorkload, Workload
from benchmarks.sim.profiles import get_profile

RESULTS = Path(__file__).resolve().parents[2] / "results" / "saturation.json"
PROFILE = "a10g-llama3-8b"
PROMPT_TOKENS = (128, 512)  # uniform
OUTPUT_MEAN, OUTPUT_MAX = 96, 384  # exponential, clipped: long and short generations mixed
SAMPLE_S = 0.2
WARMUP_S = 6.0
MAX_MODEL_LEN = 2048  # must fit the scaled-down KV cache


@dataclass(frozen=True)
class Arm:
    name: str
    saturation: dict[str, Any] = field(default_factory=dict)
    buffer: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Replicas:
    """``python -m benchmarks.sim`` with N replicas, ready at once."""

    def __init__(self, n: int, kv_blocks: int, seed: int) -> None:
        self.n = n
        self._args = [
            sys.executable, "-m", "benchmarks.sim", "--replicas", str(n), "--profile", PROFILE,
            "--port", "0", "--load-time-s", "0", "--seed", str(seed), "--log-level", "WARNING",
            "--set", f"num_gpu_blocks={kv_blocks}", "--set", f"max_model_len={MAX_MODEL_LEN}",
        ]  # fmt: skip
        self.urls: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Replicas:
        self._proc = await asyncio.create_subprocess_exec(*self._args, stdout=PIPE)
        assert self._proc.stdout is not None
        for _ in range(self.n):
            self.urls.append((await self._proc.stdout.readline()).decode().strip())
        if not all(u.startswith("http://") for u in self.urls):
            raise RuntimeError(f"replicas did not start: {self.urls}")
        return self

    async def __aexit__(self, *_: object) -> None:
        await _stop(self._proc)


class Gateway:
    """``python -m gateway serve`` with one arm's configuration."""

    def __init__(self, urls: Sequence[str], arm: Arm, workdir: Path) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.config = {
            "listen": {"host": "127.0.0.1", "port": self.port},
            "admin": {"host": "127.0.0.1", "port": self.admin_port},
            "replicas": {"urls": list(urls)},
            "policy": {"name": "p2c"},
            "saturation": arm.saturation,
            "buffer": arm.buffer,
            "logging": {"level": "WARNING", "access_log": False},
        }
        self._path = workdir / f"gateway-{arm.name.replace(' ', '-')}.yaml"
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Gateway:
        self._path.write_text(yaml.safe_dump(self.config))
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(self._path)
        )
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                try:
                    admin = f"http://127.0.0.1:{self.admin_port}/debug/replicas"
                    async with http.get(admin) as resp:
                        replicas = (await resp.json())["replicas"]
                    if replicas and all(r["phase"] == "ready" for r in replicas):
                        return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)  # startup poll of a separate process
        raise RuntimeError("the gateway did not become ready")

    async def __aexit__(self, *_: object) -> None:
        await _stop(self._proc)


async def _stop(proc: asyncio.subprocess.Process | None) -> None:
    if proc is None or proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 15)
    except TimeoutError:
        proc.kill()
        await proc.wait()


@dataclass
class Peaks:
    engine_waiting: int = 0  # max over samples of the largest replica queue
    engine_waiting_sum: int = 0  # max over samples of all replicas' queued requests
    gateway_queued: int = 0
    preemptions: int = 0
    samples: int = 0


async def _sample(replicas: Sequence[str], admin_port: int, peaks: Peaks) -> None:
    """Every SAMPLE_S: each replica's engine queue and the gateway's buffer."""
    metrics = f"http://127.0.0.1:{admin_port}/metrics"
    async with aiohttp.ClientSession() as http:
        while True:
            states = []
            for url in replicas:
                async with http.get(f"{url}/sim/state") as resp:
                    states.append(await resp.json())
            async with http.get(metrics) as resp:
                text = await resp.text()
            queued = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("kvgate_requests_queued{")
            )
            waiting = [int(s["waiting"]) for s in states]
            peaks.engine_waiting = max(peaks.engine_waiting, max(waiting))
            peaks.engine_waiting_sum = max(peaks.engine_waiting_sum, sum(waiting))
            peaks.gateway_queued = max(peaks.gateway_queued, int(queued))
            peaks.preemptions = sum(int(s["preemptions"]) for s in states)
            peaks.samples += 1
            await asyncio.sleep(SAMPLE_S)


@dataclass(frozen=True, slots=True)
class _MixedLengths(LengthModel):
    """Uniform prompts, exponential outputs: the spread of generation lengths is what makes a
    replica's queue drain at its own pace, and early binding costly."""

    def sample(self, rng: random.Random) -> tuple[int, int]:
        output = min(OUTPUT_MAX, max(8, round(rng.expovariate(1.0 / OUTPUT_MEAN))))
        return rng.randint(*PROMPT_TOKENS), output


def _workload(seed: int) -> Workload:
    return LengthWorkload("mixed", _MixedLengths(), seed)


async def _measure_capacity(
    args: argparse.Namespace, bound: dict[str, Any], batch: int, workdir: Path
) -> float:
    """Requests per second the cluster sustains: tokens generated per second at saturation
    (the replicas' own counters, after a warm-up, so long requests still running at the end
    count for what they generated) over the workload's mean output length."""
    arm = Arm("calibration", saturation=bound)
    async with (
        Replicas(args.replicas, args.kv_blocks, args.seed) as reps,
        Gateway(reps.urls, arm, workdir) as gw,
        aiohttp.ClientSession() as http,
    ):
        load = asyncio.create_task(
            run_load(
                LoadConfig(
                    base_url=f"{gw.url}/v1",
                    workload=_workload(args.seed),
                    concurrency=2 * batch * args.replicas,
                    duration_s=WARMUP_S + args.calibration_s,
                    seed=args.seed,
                )
            )
        )
        await asyncio.sleep(WARMUP_S)
        t0, g0 = time.monotonic(), await _generated(http, reps.urls)
        await asyncio.sleep(args.calibration_s)
        t1, g1 = time.monotonic(), await _generated(http, reps.urls)
        await load
    specs = itertools.islice(_workload(args.seed + 1), 20_000)
    mean_output = statistics.fmean(spec.max_tokens for spec in specs)
    return (g1 - g0) / (t1 - t0) / mean_output


async def _generated(http: aiohttp.ClientSession, urls: Sequence[str]) -> int:
    total = 0
    for url in urls:
        async with http.get(f"{url}/sim/state") as resp:
            total += int((await resp.json())["generation_tokens"])
    return total


async def _run_arm(
    arm: Arm, rate: float, seed: int, args: argparse.Namespace, workdir: Path
) -> Run:
    peaks = Peaks()
    async with (
        Replicas(args.replicas, args.kv_blocks, seed) as reps,
        Gateway(reps.urls, arm, workdir) as gw,
    ):
        sampler = asyncio.create_task(_sample(reps.urls, gw.admin_port, peaks))
        try:
            result = await run_load(
                LoadConfig(
                    base_url=f"{gw.url}/v1",
                    workload=_workload(seed),
                    rate=rate,
                    duration_s=args.duration_s,
                    seed=seed,
                    timeout_s=300.0,
                )
            )
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
    ok = [r for r in result.records if r.ok]
    return Run(
        seed=seed,
        ttft_s=[r.ttft_s for r in ok if r.ttft_s is not None],
        e2e_s=[r.e2e_s for r in ok if r.e2e_s is not None],
        total=len(result.records),
        errors=result.summary["requests"]["errors"],
        requests_per_s=result.summary["throughput"]["requests_per_s"],
        peaks=peaks,
        client_cpu_util=result.summary["client"]["cpu_util"],
    )


@dataclass
class Run:
    """One arm at one seed."""

    seed: int
    ttft_s: list[float]
    e2e_s: list[float]
    total: int
    errors: dict[str, int]
    requests_per_s: float
    peaks: Peaks
    client_cpu_util: float


def _pooled(arm: Arm, runs: Sequence[Run]) -> dict[str, Any]:
    """One arm over every seed: pooled distributions, per-seed p99s, peaks over all runs."""
    ttft = [x for r in runs for x in r.ttft_s]
    errors: dict[str, int] = {}
    for r in runs:
        for kind, n in r.errors.items():
            errors[kind] = errors.get(kind, 0) + n
    return {
        "arm": arm.name,
        "saturation": arm.saturation,
        "buffer": arm.buffer,
        "requests": {"total": sum(r.total for r in runs), "ok": len(ttft), "errors": errors},
        "ttft_s": distribution(ttft),
        "ttft_p99_per_seed_s": [distribution(r.ttft_s)["p99"] for r in runs],
        "e2e_s": distribution([x for r in runs for x in r.e2e_s]),
        "requests_per_s": statistics.fmean(r.requests_per_s for r in runs),
        "peaks": {
            "engine_waiting_sum": max(r.peaks.engine_waiting_sum for r in runs),
            "engine_waiting_one_replica": max(r.peaks.engine_waiting for r in runs),
            "gateway_queued": max(r.peaks.gateway_queued for r in runs),
            "preemptions": sum(r.peaks.preemptions for r in runs),
        },
        "client_cpu_util_max": max(r.client_cpu_util for r in runs),
    }


def _table(rows: Sequence[dict[str, Any]], rate: float, capacity: float, seeds: int) -> str:
    head = (
        f"{'arm':<22} {'ok':>5} {'refused':>7} {'TTFT p50':>9} {'p90':>6} {'p99':>6} "
        f"{'max':>6} {'p99 per seed':>16} {'e2e p99':>7} {'req/s':>6} {'eng q':>5} {'gw q':>5} "
        f"{'preempt':>7}"
    )
    lines = [
        f"offered {rate:.2f} req/s = load x capacity {capacity:.2f} req/s, {seeds} seed(s) "
        "pooled; TTFT and e2e in s; queues are peaks",
        head,
        "-" * len(head),
    ]

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    for r in rows:
        t, req, p = r["ttft_s"], r["requests"], r["peaks"]
        per_seed = " ".join(f(x) for x in r["ttft_p99_per_seed_s"])
        lines.append(
            f"{r['arm']:<22} {req['ok']:>5} {req['total'] - req['ok']:>7} {f(t['p50']):>9} "
            f"{f(t['p90']):>6} {f(t['p99']):>6} {f(t['max']):>6} {per_seed:>16} "
            f"{f(r['e2e_s']['p99']):>7} {r['requests_per_s']:>6.2f} "
            f"{p['engine_waiting_sum']:>5} {p['gateway_queued']:>5} {p['preemptions']:>7}"
        )
    return "\n".join(lines)


def _bound(spec: str, batch: int) -> dict[str, Any]:
    """``queue:N`` | ``inflight:N`` | ``kv:RATIO`` as a ``saturation`` config section."""
    kind, _, value = spec.partition(":")
    if kind == "queue":
        return {"max_queue_per_replica": int(value or 2)}
    if kind == "inflight":
        return {"max_inflight_per_replica": int(value or batch)}
    if kind == "kv":
        return {"max_kv_usage": float(value or 0.9)}
    raise SystemExit(f"--bound {spec!r}: expected queue:N, inflight:N or kv:RATIO")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.saturation")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--kv-blocks", type=int, default=300, help="KV blocks per replica (16 tokens)")
    p.add_argument("--load", type=float, default=1.2, help="offered load / measured capacity")
    p.add_argument("--duration-s", type=float, default=20.0, help="arrivals per arm")
    p.add_argument("--calibration-s", type=float, default=10.0)
    p.add_argument("--max-wait-s", type=float, default=2.0, help="for the third arm")
    p.add_argument(
        "--bound",
        default="queue:2",
        help="the saturation bound: queue:N (max_queue_per_replica), inflight:N, kv:RATIO",
    )
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=1, help="runs per arm, seeds seed, seed+1, ...")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    profile = get_profile(PROFILE, num_gpu_blocks=args.kv_blocks, max_model_len=MAX_MODEL_LEN)
    mean_tokens = sum(PROMPT_TOKENS) / 2 + OUTPUT_MEAN
    batch = math.floor(args.kv_blocks * profile.block_size / mean_tokens)  # mean KV-fitting
    bound = _bound(args.bound, batch)
    arms = [
        Arm("no bound"),
        Arm("bound", saturation=bound),
        Arm(f"bound + {args.max_wait_s:g} s max wait", bound, {"max_wait_s": args.max_wait_s}),
    ]
    with tempfile.TemporaryDirectory(prefix="kvgate-saturation-") as tmp:
        workdir = Path(tmp)
        started = time.monotonic()
        capacity = await _measure_capacity(args, bound, batch, workdir)
        rate = args.load * capacity
        print(
            f"capacity {capacity:.2f} req/s ({args.replicas} replicas, batch {batch}); "
            f"offering {rate:.2f} req/s for {args.duration_s:g} s per arm",
            flush=True,
        )
        runs: dict[str, list[Run]] = {arm.name: [] for arm in arms}
        for seed in range(args.seed, args.seed + args.seeds):  # arms interleaved per seed
            for arm in arms:
                run = await _run_arm(arm, rate, seed, args, workdir)
                runs[arm.name].append(run)
                p99 = distribution(run.ttft_s)["p99"]
                print(f"  seed {seed}, {arm.name}: TTFT p99 {p99:.2f} s", flush=True)
    rows = [_pooled(arm, runs[arm.name]) for arm in arms]
    table = _table(rows, rate, capacity, args.seeds)
    print(table)
    return {
        "experiment": "saturation",
        "command": "python -m benchmarks.experiments.saturation " + " ".join(sys.argv[1:]),
        "setup": {
            "replicas": args.replicas,
            "profile": PROFILE,
            "kv_blocks": args.kv_blocks,
            "workload": {
                "prompt_tokens_uniform": PROMPT_TOKENS,
                "output_tokens_exponential_mean": OUTPUT_MEAN,
                "output_tokens_max": OUTPUT_MAX,
            },
            "policy": "p2c",
            "bound": bound,
            "mean_kv_fitting_batch": batch,
            "load": args.load,
            "duration_s": args.duration_s,
            "seeds": list(range(args.seed, args.seed + args.seeds)),
            "cpus": os.cpu_count(),
        },
        "capacity_rps": capacity,
        "offered_rps": rate,
        "arms": rows,
        "table": table.splitlines(),
        "wall_s": time.monotonic() - started,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result = asyncio.run(_main(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {args.out}")
    return 0
