"""Benchmark: CPU cost of serving the talk's workload from one simulator process in real time.

    python -m benchmarks.sim.speed_live [--replicas 8] [--rate 13] [--duration-s 30]

Starts ``python -m benchmarks.sim`` (8 ``a10g-llama3-8b`` replicas, vllm-v1, ready at once) as a
child process, and drives it from this process - a separate one, so the load generator's CPU
is not counted - with an open-loop Poisson stream of the talk's workload (``openorca``: input
16-1600 tokens, mean ~540; output 16-1600, mean ~415; streaming ``/v1/completions`` with
``ignore_eos``), each request sent to a uniformly random replica (what a Kubernetes Service
does), while scraping every replica's ``/metrics`` every ``--scrape-interval-s`` like a gateway.

The simulator's CPU (user + system, from /proc) is measured over the window after
``--warmup-s`` (the cluster fills up: a request lives ~20 s at this load). Goal: < 0.5 core.
Prints a table and writes ``benchmarks/results/sim-speed-live.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import uvloop

from benchmarks.load.report import format_rows
from benchmarks.load.workloads import Arrivals, make_workload
from benchmarks.proxy.accounting import cpu_times

GOAL_CORES = 0.5
RESULTS = Path(__file__).resolve().parents[1] / "results" / "sim-speed-live.json"


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    failed: int = 0
    tokens: int = 0  # SSE token events received
    inflight: int = 0
    scrapes: int = 0
    max_lateness_s: float = 0.0  # how late the generator sent, worst case
    ttft_s: list[float] = field(default_factory=list)


async def _one(http: aiohttp.ClientSession, url: str, body: bytes, tally: Tally) -> None:
    tally.inflight += 1
    start = time.perf_counter()
    try:
        async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            if r.status != 200:
                tally.failed += 1
                return
            first = True
            tail = b""
            async for chunk in r.content.iter_any():
                if first:
                    tally.ttft_s.append(time.perf_counter() - start)
                    first = False
                tally.tokens += chunk.count(b"data: ")  # one per token, plus one [DONE]
                tail = (tail + chunk)[-16:]
            if tail.endswith(b"[DONE]\n\n"):
                tally.completed += 1
            else:
                tally.failed += 1
    except aiohttp.ClientError:
        tally.failed += 1
    finally:
        tally.inflight -= 1


async def _scrape(http: aiohttp.ClientSession, urls: list[str], interval: float, t: Tally) -> None:
    while True:
        for url in urls:
            async with http.get(url + "/metrics") as resp:
                await resp.read()
                t.scrapes += 1
        await asyncio.sleep(interval)


async def _generate(
    http: aiohttp.ClientSession, urls: list[str], args: argparse.Namespace, tally: Tally
) -> set[asyncio.Task[None]]:
    rng = random.Random(args.seed)
    workload = iter(make_workload("openorca", seed=args.seed, max_total_tokens=16_384))
    tasks: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter()
    end = args.warmup_s + args.duration_s
    for offset in Arrivals(args.rate).times(args.seed):
        if offset >= end:
            break
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tally.max_lateness_s = max(tally.max_lateness_s, time.perf_counter() - t0 - offset)
        spec = next(workload)
        body = orjson.dumps(
            {
                "model": args.model,
                "prompt": spec.prompt_text(),
                "max_tokens": spec.max_tokens,
                "ignore_eos": True,
                "stream": True,
            }
        )
        url = rng.choice(urls) + "/v1/completions"
        task = asyncio.create_task(_one(http, url, body, tally))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        tally.sent += 1
    return tasks


def _start_sim(args: argparse.Namespace) -> tuple[subprocess.Popen[str], list[str]]:
    cmd = [
        sys.executable, "-m", "benchmarks.sim", "--replicas", str(args.replicas),
        "--profile", "a10g-llama3-8b", "--engine", "vllm-v1", "--port", "0",
        "--load-time-s", "0", "--log-level", "WARNING", "--seed", str(args.seed),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    urls = [proc.stdout.readline().strip() for _ in range(args.replicas)]
    if not all(u.startswith("http://") for u in urls):
        proc.kill()
        raise RuntimeError(f"the simulator did not start: {urls}")
    return proc, urls


async def run(args: argparse.Namespace) -> dict[str, object]:
    proc, urls = _start_sim(args)
    sim = [proc.pid]
    tally = Tally()
    samples: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.get(urls[0] + "/v1/models") as resp:
                args.model = (await resp.json())["data"][0]["id"]
            scraper = asyncio.create_task(_scrape(http, urls, args.scrape_interval_s, tally))
            generator = asyncio.create_task(_generate(http, urls, args, tally))
            await asyncio.sleep(args.warmup_s)
            cpu0, wall0 = cpu_times(sim), time.perf_counter()
            prev_cpu, prev_wall = sum(cpu0), wall0
            tokens0 = tally.tokens
            while time.perf_counter() - wall0 < args.duration_s:
                await asyncio.sleep(1.0)
                c, w = cpu_times(sim), time.perf_counter()
                samples.append((sum(c) - prev_cpu) / (w - prev_wall))
                prev_cpu, prev_wall = sum(c), w
            cpu1, wall1 = cpu_times(sim), time.perf_counter()
            tokens = tally.tokens - tokens0
            inflight = tally.inflight
            states = []
            for url in urls:
                async with http.get(url + "/sim/state") as resp:
                    states.append(await resp.json())
            scraper.cancel()
            pending = await generator
            for task in pending:
                task.cancel()
            await asyncio.gather(scraper, *pending, return_exceptions=True)
    finally:
        proc.terminate()
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -9
    window = wall1 - wall0
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    cores = (user + system) / window
    ttft = sorted(tally.ttft_s)
    return {
        "replicas": args.replicas,
        "profile": "a10g-llama3-8b",
        "flavour": "vllm-v1",
        "workload": "openorca (input mean ~540, output mean ~415), streaming, Poisson",
        "rate_req_s": args.rate,
        "warmup_s": args.warmup_s,
        "window_s": round(window, 2),
        "scrape_interval_s": args.scrape_interval_s,
        "sim_cpu_cores": round(cores, 4),
        "sim_cpu_user_s": round(user, 3),
        "sim_cpu_system_s": round(system, 3),
        "sim_cpu_cores_max_1s": round(max(samples), 4) if samples else None,
        "sim_cpu_cores_median_1s": round(statistics.median(samples), 4) if samples else None,
        "goal_cores": GOAL_CORES,
        "meets_goal": cores < GOAL_CORES,
        "tokens_streamed_in_window": tokens,
        "tokens_per_s": round(tokens / window, 1),
        "requests_sent": tally.sent,
        "requests_completed": tally.completed,
        "requests_failed": tally.failed,
        "inflight_at_end": inflight,
        "metrics_scrapes": tally.scrapes,
        "client_ttft_p50_s": round(ttft[len(ttft) // 2], 3) if ttft else None,
        "client_ttft_p99_s": round(ttft[int(len(ttft) * 0.99)], 3) if ttft else None,
        "generator_max_lateness_s": round(tally.max_lateness_s, 4),
        "replica_running": [s["running"] for s in states],
        "replica_waiting": [s["waiting"] for s in states],
        "replica_kv_usage": [round(s["kv_usage"], 3) for s in states],
        "replica_preemptions": [s["preemptions"] for s in states],
        "sim_step_lag_mean_s": round(statistics.mean(s["step_lag_mean_s"] for s in states), 5),
        "sim_step_lag_max_s": round(max(s["step_lag_max_s"] for s in states), 4),
        "sim_exit_code": code,
    }


def _table(result: dict[str, object]) -> str:
    rows = [
        ("simulator CPU (cores, mean over window)", result["sim_cpu_cores"]),
        ("  user / system seconds", f"{result['sim_cpu_user_s']} / {result['sim_cpu_system_s']}"),
        ("  max 1 s sample / median 1 s sample", f"{result['sim_cpu_cores_max_1s']} / "
         f"{result['sim_cpu_cores_median_1s']}"),
        ("goal", f"< {GOAL_CORES} core: {'met' if result['meets_goal'] else 'NOT met'}"),
        ("window (s) after warm-up (s)", f"{result['window_s']} after {result['warmup_s']}"),
        ("rate (req/s), replicas", f"{result['rate_req_s']}, {result['replicas']}"),
        ("tokens streamed per second (SSE events)", result["tokens_per_s"]),
        ("requests sent / completed / failed / in flight at end",
         f"{result['requests_sent']} / {result['requests_completed']} / "
         f"{result['requests_failed']} / {result['inflight_at_end']}"),
        ("/metrics scrapes", result["metrics_scrapes"]),
        ("client TTFT p50 / p99 (s)",
         f"{result['client_ttft_p50_s']} / {result['client_ttft_p99_s']}"),
        ("load generator max lateness (s)", result["generator_max_lateness_s"]),
        ("per replica running at end", result["replica_running"]),
        ("per replica waiting at end", result["replica_waiting"]),
        ("per replica KV usage at end", result["replica_kv_usage"]),
        ("per replica preemptions (total)", result["replica_preemptions"]),
        ("engine step wake-up lag mean / max (s)",
         f"{result['sim_step_lag_mean_s']} / {result['sim_step_lag_max_s']}"),
        ("simulator exit code after SIGTERM", result["sim_exit_code"]),
    ]  # fmt: skip
    return format_rows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--rate", type=float, default=13.0)
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=15.0)
    parser.add_argument("--scrape-interval-s", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = uvloop.run(run(args))
    print(_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
