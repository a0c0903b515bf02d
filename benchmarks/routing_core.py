"""Routing-core benchmark: policy decision time, metrics-page parse time, scraper CPU.

``python -m benchmarks.routing_core [--quick]`` prints three tables and writes
``benchmarks/results/routing-core.json``.

1. Decision time per request of every policy at 8, 128 and 1,024 replicas (goal for p2c: under
   5 µs and flat in the number of replicas). Views are built once, as the pool caches them;
   one row also times ``ReplicaPool.view`` + ``choose``, the router's real path.
2. Parse time of realistic vLLM pages (the simulator's vLLM >= 0.10 page, ~31 KB, and the
   captured vLLM 0.4.3 page, ~13 KB): ``parse_engine_metrics`` against prometheus_client's
   parser (full parse, then the same three signals picked out).
3. Scraper CPU: N replica stubs serving the ~31 KB page over HTTP/1.1 keep-alive from a separate
   process (so their CPU is not counted), one ``MetricsScraper`` on uvloop scraping them every
   interval for a while (250 ms, the default, and 100 ms); CPU is this process's user+system
   time, which on loopback includes the kernel's TCP work for both directions of our sends.
   Goal: 200 replicas every 250 ms under a third of a core.

Figures depend on the machine and on what else runs on it; the JSON records both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.sim.exposition import render_metrics
from benchmarks.sim.profiles import get_profile
from benchmarks.sim.stats import EngineStats
from gateway.config import ScraperConfig
from gateway.engine_metrics import names_for, parse_engine_metrics
from gateway.pool import ReplicaPool
from gateway.scraper import MetricsScraper
from policies.hashing import prefix_block_hashes
from policies.registry import SIMULATION_POLICY_NAMES, make_policy
from policies.types import Dispatched, PoolView, ReplicaId, ReplicaState, RequestInfo

RESULTS = Path(__file__).resolve().parent / "results" / "routing-core.json"
SIZES = (8, 128, 1024)
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CAPTURE = (
    Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "metrics" / "vllm-v0-0.4.3.txt"
)


# -- 1. decision time ------------------------------------------------------------------------


def _view(n: int, rng: random.Random) -> PoolView:
    now = 1000.0
    replicas = tuple(
        ReplicaState(
            id=ReplicaId(f"replica-{i:04d}"),
            models=frozenset({MODEL}),
            ready_since=0.0,
            queue_depth=rng.randrange(0, 20),
            running=rng.randrange(0, 64),
            kv_usage=rng.random(),
            scraped_at=now - rng.random() * 0.25,
            inflight_at_scrape=rng.randrange(0, 8),
        )
        for i in range(n)
    )
    inflight = {r.id: rng.randrange(0, 16) for r in replicas}
    return PoolView(now=now, replicas=replicas, inflight=inflight, max_metrics_age_s=1.0)


def _requests(count: int, rng: random.Random) -> list[RequestInfo]:
    # 32 shared system prompts with random tails: what prefix affinity is for.
    prompts = [f"system prompt {k} " * 40 for k in range(32)]
    return [
        RequestInfo(
            seq=i,
            model=MODEL,
            prefix_hashes=prefix_block_hashes(
                MODEL, rng.choice(prompts) + str(rng.random()) * 8, 256, 16
            ),
        )
        for i in range(count)
    ]


def _time_choose(name: str, view: PoolView, reqs: list[RequestInfo], repeats: int) -> float:
    policy = make_policy(name, simulation=True)
    if name == "prefix_affinity":
        for req in reqs[: len(reqs) // 2]:
            policy.observe(Dispatched(view.replicas[req.seq % len(view.replicas)].id, req, 0.0))
    choose = policy.choose
    rng = random.Random(1)
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for req in reqs:
            choose(view, req, rng)
        best = min(best, (time.process_time() - start) / len(reqs))
    return best * 1e6


def _time_pool_path(n: int, reqs: list[RequestInfo], repeats: int) -> float:
    """ReplicaPool.view + p2c.choose, as ``Router.pick`` does it (without the metric writes)."""
    pool = ReplicaPool(max_metrics_age_s=1.0)
    rng = random.Random(2)
    for i in range(n):
        rid = ReplicaId(f"replica-{i:04d}")
        pool.add(rid, f"http://127.0.0.1:{10000 + i}", phase="ready", models=[MODEL], now=0.0)
    policy = make_policy("p2c")
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for req in reqs:
            policy.choose(pool.view(1.0), req, rng)
        best = min(best, (time.process_time() - start) / len(reqs))
    return best * 1e6


def bench_decisions(quick: bool) -> dict[str, dict[str, float]]:
    rng = random.Random(0)
    reqs = _requests(2000 if quick else 10000, rng)
    repeats = 3 if quick else 7
    out: dict[str, dict[str, float]] = {}
    for n in SIZES:
        view = _view(n, rng)
        for name in SIMULATION_POLICY_NAMES:
            scan = name in ("least_request", "oracle", "round_robin", "prefix_affinity")
            subset = reqs[: len(reqs) // 10] if scan and n >= 1024 else reqs
            out.setdefault(name, {})[str(n)] = _time_choose(name, view, subset, repeats)
        out.setdefault("p2c via pool.view", {})[str(n)] = _time_pool_path(n, reqs, repeats)
    return out


# -- 2. parse time ---------------------------------------------------------------------------


def realistic_page() -> str:
    stats = EngineStats(
        profile=get_profile("a10g-llama3-8b"),
        start_unix_s=1.7589602188135e09,
        num_running=37,
        num_waiting=12,
        kv_usage=0.6342,
    )
    return render_metrics(stats, "vllm-v1", MODEL)


def _prometheus_client_parse(text: str) -> tuple[float | None, float | None, float | None]:
    wanted = {
        "vllm:num_requests_waiting": 0,
        "vllm:num_requests_running": 1,
        "vllm:kv_cache_usage_perc": 2,
        "vllm:gpu_cache_usage_perc": 2,
    }
    found: list[float | None] = [None, None, None]
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            slot = wanted.get(s.name)
            if slot is not None and found[slot] is None:
                found[slot] = s.value
    return found[0], found[1], found[2]


def _per_call_us(fn: Callable[[], object], budget_s: float) -> float:
    """Median CPU time per call over batches of calls (CPU time: other processes on the
    machine inflate wall time, not this)."""
    fn()
    batch = 20
    samples: list[float] = []
    deadline = time.process_time() + budget_s
    while time.process_time() < deadline or len(samples) < 5:
        t0 = time.process_time()
        for _ in range(batch):
            fn()
        samples.append((time.process_time() - t0) / batch)
    return statistics.median(samples) * 1e6


def bench_parse(quick: bool) -> dict[str, dict[str, float]]:
    budget = 0.5 if quick else 2.0
    out: dict[str, dict[str, float]] = {}
    for label, text, engine in (
        ("sim vllm-v1 page", realistic_page(), "vllm-v1"),
        ("captured vllm 0.4.3 page", CAPTURE.read_text(), "vllm-v0"),
    ):
        names = names_for(engine)
        ours = _per_call_us(partial(parse_engine_metrics, text, names=names), budget)
        detect = _per_call_us(partial(parse_engine_metrics, text), budget)
        theirs = _per_call_us(partial(_prometheus_client_parse, text), budget)
        out[label] = {
            "bytes": float(len(text.encode())),
            "kvgate_us": ours,
            "kvgate_with_detection_us": detect,
            "prometheus_client_us": theirs,
            "speedup": theirs / ours,
        }
    return out


# -- 3. scraper CPU --------------------------------------------------------------------------


class _StubProtocol(asyncio.Protocol):
    """A replica stub: answers every HTTP/1.1 request on a keep-alive connection with one
    precomputed ``200 OK`` metrics response. Far cheaper than an aiohttp app, so that the
    stubs' process keeps up and the measurement is the scraper's."""

    def __init__(self, response: bytes) -> None:
        self._response = response
        self._buffer = b""
        self._transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        requests = self._buffer.count(b"\r\n\r\n")  # GETs carry no body
        if requests and self._transport is not None:
            self._buffer = self._buffer[self._buffer.rfind(b"\r\n\r\n") + 4 :]
            self._transport.write(self._response * requests)


def _serve_stubs(n: int, page: bytes, ports: Any, stop: Any) -> None:
    """Child process: n replica stubs, one listening socket each, serving ``page``."""
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
        b"Content-Length: %d\r\n\r\n" % len(page)
    ) + page

    async def main() -> None:
        loop = asyncio.get_running_loop()
        servers = [
            await loop.create_server(lambda: _StubProtocol(response), "127.0.0.1", 0)
            for _ in range(n)
        ]
        for server in servers:
            ports.put(server.sockets[0].getsockname()[1])
        # The stop flag is a multiprocessing.Event, which has no asyncio side: wait in a thread.
        await asyncio.to_thread(stop.wait)
        for server in servers:
            server.close()

    import uvloop

    uvloop.run(main())


async def _scrape_for(urls: list[str], interval_s: float, duration_s: float) -> dict[str, float]:
    pool = ReplicaPool(max_metrics_age_s=1.0)
    for i, url in enumerate(urls):
        pool.add(ReplicaId(f"replica-{i:04d}"), url, phase="ready", models=[MODEL], now=0.0)
    config = ScraperConfig(interval_s=interval_s, timeout_s=interval_s * 0.8)
    scraper = MetricsScraper(pool, config, clock=time.monotonic)
    try:
        await scraper.scrape_once()  # connect and detect before measuring
        cpu0, wall0, rounds0 = time.process_time(), time.monotonic(), scraper.rounds
        task = asyncio.create_task(scraper.run())
        await asyncio.sleep(duration_s)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        rounds = scraper.rounds - rounds0
        errors = dict(scraper.errors)
    finally:
        await scraper.close()
    n = len(urls)
    return {
        "replicas": float(n),
        "interval_s": interval_s,
        "wall_s": wall,
        "rounds": float(rounds),
        "rounds_expected": wall / interval_s,
        "cpu_s": cpu,
        "core_fraction": cpu / wall,
        "cpu_us_per_scrape": cpu / max(1, rounds * n) * 1e6,
        "cpu_per_replica_per_s": cpu / wall / n,
        "errors": float(sum(errors.values())),
    }


def bench_scraper(
    replicas: int, intervals: list[float], duration_s: float
) -> list[dict[str, float]]:
    page = realistic_page().encode()
    ctx = mp.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_serve_stubs, args=(replicas, page, ports, stop), daemon=True)
    child.start()
    results = []
    try:
        urls = [f"http://127.0.0.1:{ports.get(timeout=60)}" for _ in range(replicas)]
        import uvloop

        for interval in intervals:
            result = uvloop.run(_scrape_for(urls, interval, duration_s))
            result["page_bytes"] = float(len(page))
            results.append(result)
    finally:
        stop.set()
        child.join(timeout=10)
        if child.is_alive():
            child.terminate()
    return results


# -- report ----------------------------------------------------------------------------------


def _print_tables(results: dict[str, Any]) -> None:
    print("\nDecision time per request (µs of CPU, best of repeats)")
    print(f"{'policy':<22}" + "".join(f"{n:>10}" for n in SIZES))
    for name, row in results["decision_us"].items():
        print(f"{name:<22}" + "".join(f"{row[str(n)]:>10.2f}" for n in SIZES))
    print("\nParse time per page (µs of CPU, median)")
    print(f"{'page':<28}{'bytes':>8}{'kvgate':>10}{'+detect':>10}{'prom_client':>13}{'speedup':>9}")
    for label, row in results["parse"].items():
        print(
            f"{label:<28}{row['bytes']:>8.0f}{row['kvgate_us']:>10.1f}"
            f"{row['kvgate_with_detection_us']:>10.1f}{row['prometheus_client_us']:>13.1f}"
            f"{row['speedup']:>8.0f}x"
        )
    for s in results.get("scraper", []):
        print(
            f"\nScraper: {s['replicas']:.0f} replicas every {s['interval_s'] * 1000:.0f} ms for "
            f"{s['wall_s']:.1f} s: {s['rounds']:.0f}/{s['rounds_expected']:.1f} rounds, "
            f"{s['core_fraction'] * 100:.1f}% of one core, {s['cpu_us_per_scrape']:.0f} µs CPU "
            f"per scrape ({s['page_bytes'] / 1024:.0f} KB page), errors {s['errors']:.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (CI smoke)")
    parser.add_argument("--replicas", type=int, default=200)
    parser.add_argument(
        "--intervals", default="0.25,0.1", help="scrape intervals to measure, seconds"
    )
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--no-scraper", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
        },
        "decision_us": bench_decisions(args.quick),
        "parse": bench_parse(args.quick),
    }
    if not args.no_scraper:
        duration = min(args.duration, 3.0) if args.quick else args.duration
        replicas = min(args.replicas, 50) if args.quick else args.replicas
        intervals = [float(x) for x in args.intervals.split(",")]
        results["scraper"] = bench_scraper(replicas, intervals, duration)
    _print_tables(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
