"""The proxy benchmark's load generator: raw-protocol HTTP/1.1 load (``client``), timed
precisely, with the CPU and RSS of the watched processes (``accounting``) over its window.

Run as its own process (pinned by the orchestrator to the load core), one mode per run, the
result as one JSON object on stdout:

- ``closed``: ``concurrency`` keep-alive connections, each sending its next non-streaming
  request the moment the previous answer ends (max request rate when ``wrk`` is unavailable).
- ``open``: non-streaming requests at seeded Poisson arrival times at ``rate`` per second,
  whatever the server does; latency is measured from the actual send (the schedule's lateness
  is reported) to the last response byte; a new connection is opened when none is idle.
- ``streams``: ``concurrency`` SSE streams kept open back to back, ``events`` per stream,
  ``interval_ms`` apart (0: unpaced). Paced streams start staggered over one stream's length,
  so the window sees a steady state, not a synchronized burst. TTFT is send -> first complete
  event; inter-token gaps are between consecutive content events (events arriving in one read
  count as 0 gaps).
- ``idle``: ``count`` streams opened and left idle after their first event; the RSS growth of
  each watched process divided by ``count``.

Why it is not the bottleneck: no HTTP library, prebuilt request bytes, callback-driven closed
loops (no coroutine per request), one ``perf_counter`` per read, event counting with
``bytes.count``. Its own CPU is reported next to the watched processes'.

Invariants: only the measurement window counts (warm-up and drain excluded); a response that
is not 200, or a stream that ends without ``data: [DONE]``, is an error, never a sample.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import orjson
import uvloop

from benchmarks.proxy.accounting import Watched, Window
from benchmarks.proxy.client import Connection, Exchange, Tally, chat_body, request_bytes

Addr = tuple[str, int]


def summary_ms(values: Sequence[float]) -> dict[str, float | int]:
    """Percentiles (nearest rank) of durations in seconds, reported in milliseconds."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    n = len(ordered)

    def pct(q: float) -> float:
        return ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] * 1000.0

    return {
        "n": n,
        "p50": pct(0.50),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "p999": pct(0.999),
        "max": ordered[-1] * 1000.0,
        "mean": sum(ordered) / n * 1000.0,
    }


class _Driver:
    """Connections to ``addrs`` (spread round-robin), the window, and the exchanges in flight;
    subclasses decide what a completed exchange records and what is sent next."""

    def __init__(self, addrs: Sequence[Addr], body: dict[str, object], watched: Watched) -> None:
        self._addrs = list(addrs)
        self._requests = [request_bytes(h, p, body) for h, p in self._addrs]
        self._next_addr = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._quiet = asyncio.Event()
        self.window = Window(watched)
        self.tally = Tally()
        self.conns: list[Connection] = []
        self.inflight = 0
        self.stopping = False
        self.errors = 0
        self.new_connections = 0

    async def connect(self) -> Connection:
        i = self._next_addr % len(self._addrs)
        self._next_addr += 1
        loop = asyncio.get_running_loop()
        host, port = self._addrs[i]
        _, conn = await loop.create_connection(lambda: Connection(self._done), host, port)
        conn.request = self._requests[i]
        conn.tally = self.tally
        self.conns.append(conn)
        self.new_connections += 1
        return conn

    def spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def send(self, conn: Connection, ex: Exchange) -> None:
        self.inflight += 1
        self._quiet.clear()
        conn.send(conn.request, ex)

    def _done(self, conn: Connection, ex: Exchange) -> None:
        self.inflight -= 1
        self.completed(conn, ex)
        if self.inflight == 0:
            self._quiet.set()

    def completed(self, conn: Connection, ex: Exchange) -> None:
        raise NotImplementedError

    def in_window(self, ex: Exchange) -> bool:
        return self.window.start > 0.0 and self.window.contains(ex.t_send)

    async def measure(self, warmup_s: float, duration_s: float) -> None:
        await asyncio.sleep(warmup_s)
        self.window.open()
        self.tally.counting = True
        await asyncio.sleep(duration_s)
        self.tally.counting = False
        self.window.close()
        self.stopping = True

    async def drain(self, timeout_s: float) -> None:
        """Let exchanges in flight finish (bounded), then close every connection."""
        self.stopping = True
        if self.inflight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._quiet.wait(), timeout_s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in self.conns:
            conn.close()
        await asyncio.gather(*(c.closed for c in self.conns))


class _ClosedLoop(_Driver):
    """Every connection sends its next request as soon as the previous answer ends."""

    def __init__(self, addrs: Sequence[Addr], body: dict[str, object], watched: Watched) -> None:
        super().__init__(addrs, body, watched)
        self.latencies: list[float] = []
        self.ttft: list[float] = []
        self.gaps: list[float] = []
        self.streams_done = 0

    def start(self, conn: Connection) -> None:
        if self.stopping or not conn.usable:
            return
        ex = Exchange()
        if self.window.start > 0.0 and self.window.end == 0.0:
            ex.gaps = []
        self.send(conn, ex)

    def completed(self, conn: Connection, ex: Exchange) -> None:
        if self.in_window(ex):
            if ex.ok:
                self.latencies.append(ex.t_end - ex.t_send)
                if ex.content:
                    self.streams_done += 1
                    self.ttft.append(ex.t_first - ex.t_send)
                    if ex.gaps:
                        self.gaps.extend(ex.gaps)
            else:
                self.errors += 1
        if self.stopping:
            return
        if conn.usable:
            self.start(conn)
        else:  # the server closed it: keep the concurrency
            self.spawn(self._replace())

    async def _replace(self) -> None:
        self.start(await self.connect())


async def run_closed(
    addrs: Sequence[Addr], *, concurrency: int, warmup_s: float, duration_s: float, watched: Watched
) -> dict[str, Any]:
    driver = _ClosedLoop(addrs, chat_body(stream=False), watched)
    for conn in [await driver.connect() for _ in range(concurrency)]:
        driver.start(conn)
    await driver.measure(warmup_s, duration_s)
    await driver.drain(5.0)
    n = len(driver.latencies)
    return {
        "mode": "closed",
        "concurrency": concurrency,
        "requests": n,
        "errors": driver.errors,
        "rps": n / (driver.window.end - driver.window.start),
        "latency_ms": summary_ms(driver.latencies),
        **driver.window.report(),
    }


async def run_streams(
    addrs: Sequence[Addr],
    *,
    concurrency: int,
    events: int,
    interval_ms: float,
    warmup_s: float,
    duration_s: float,
    watched: Watched,
) -> dict[str, Any]:
    body = chat_body(stream=True, events=events, interval_ms=interval_ms)
    driver = _ClosedLoop(addrs, body, watched)
    conns = [await driver.connect() for _ in range(concurrency)]
    loop = asyncio.get_running_loop()
    stream_s = events * interval_ms / 1000.0
    for i, conn in enumerate(conns):
        # Paced streams start spread over one stream's length: a steady state, not a burst.
        loop.call_later(stream_s * i / concurrency, driver.start, conn)
    await driver.measure(warmup_s, duration_s)
    await driver.drain(stream_s + 10.0)
    wall = driver.window.end - driver.window.start
    return {
        "mode": "streams",
        "concurrency": concurrency,
        "events_per_stream": events,
        "interval_ms": interval_ms,
        "streams": driver.streams_done,
        "errors": driver.errors,
        "events": driver.tally.events,
        "events_per_s": driver.tally.events / wall,
        "ttft_ms": summary_ms(driver.ttft),
        "gap_ms": summary_ms(driver.gaps),
        **driver.window.report(),
    }


class _OpenLoop(_Driver):
    def __init__(self, addrs: Sequence[Addr], body: dict[str, object], watched: Watched) -> None:
        super().__init__(addrs, body, watched)
        self.idle: list[Connection] = []
        self.latencies: list[float] = []
        self.lateness: list[float] = []

    def completed(self, conn: Connection, ex: Exchange) -> None:
        if self.in_window(ex):
            if ex.ok:
                self.latencies.append(ex.t_end - ex.t_send)
            else:
                self.errors += 1
        if conn.usable:
            self.idle.append(conn)

    async def send_at(self, scheduled: float) -> None:
        conn = self.idle.pop() if self.idle else await self.connect()
        ex = Exchange()
        self.send(conn, ex)
        if self.in_window(ex):
            self.lateness.append(ex.t_send - scheduled)


async def run_open(
    addrs: Sequence[Addr],
    *,
    rate: float,
    warmup_s: float,
    duration_s: float,
    seed: int,
    watched: Watched,
    prewarm: int = 16,
) -> dict[str, Any]:
    driver = _OpenLoop(addrs, chat_body(stream=False), watched)
    driver.idle = [await driver.connect() for _ in range(prewarm)]
    driver.new_connections = 0
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    measuring = loop.create_task(driver.measure(warmup_s, duration_s))
    t = time.perf_counter()
    end = t + warmup_s + duration_s
    while t < end:
        delay = t - time.perf_counter()
        if delay > 0.0:
            await asyncio.sleep(delay)
        if driver.idle:
            await driver.send_at(t)
        else:  # connecting must not hold up the schedule
            driver.spawn(driver.send_at(t))
        t += rng.expovariate(rate)
    await measuring
    await driver.drain(5.0)
    n = len(driver.latencies)
    return {
        "mode": "open",
        "rate": rate,
        "requests": n,
        "errors": driver.errors,
        "achieved_rps": n / (driver.window.end - driver.window.start),
        "new_connections": driver.new_connections,
        "latency_ms": summary_ms(driver.latencies),
        "send_lateness_ms": summary_ms(driver.lateness),
        **driver.window.report(),
    }


class _Idle(_Driver):
    def completed(self, conn: Connection, ex: Exchange) -> None:
        if not self.stopping:
            self.errors += 1


async def run_idle(
    addrs: Sequence[Addr], *, count: int, settle_s: float, watched: Watched
) -> dict[str, Any]:
    """RSS growth per open idle stream of every watched process."""
    body = chat_body(stream=True, events=2)
    body["bench_hold"] = True
    driver = _Idle(addrs, body, watched)
    before = watched.rss()
    loop = asyncio.get_running_loop()
    driver.tally.wanted = count
    driver.tally.waiter = loop.create_future()
    for start in range(0, count, 64):
        batch = await asyncio.gather(*(driver.connect() for _ in range(min(64, count - start))))
        for conn in batch:
            driver.send(conn, Exchange())
    await asyncio.wait_for(driver.tally.waiter, timeout=30.0)
    await asyncio.sleep(settle_s)
    after = watched.rss()
    await driver.drain(0.0)
    return {
        "mode": "idle",
        "streams": count,
        "errors": driver.errors,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "bytes_per_stream": {k: (after[k] - before[k]) / count for k in before},
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="proxy benchmark load generator (one JSON line out)")
    p.add_argument("mode", choices=("closed", "open", "streams", "idle"))
    p.add_argument("--target", required=True, help="host:port[,host:port...] (round-robin)")
    p.add_argument("--watch", action="append", default=[], help="name=pid (with descendants)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rate", type=float, default=1500.0)
    p.add_argument("--events", type=int, default=100)
    p.add_argument("--interval-ms", type=float, default=20.0)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--duration-s", type=float, default=5.0)
    p.add_argument("--settle-s", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=1)
    return p


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    addrs = [(h, int(p)) for h, _, p in (a.rpartition(":") for a in args.target.split(","))]
    watched = Watched.parse(args.watch)
    timing = {"warmup_s": args.warmup_s, "duration_s": args.duration_s, "watched": watched}
    if args.mode == "closed":
        return await run_closed(addrs, concurrency=args.concurrency, **timing)
    if args.mode == "open":
        return await run_open(addrs, rate=args.rate, seed=args.seed, **timing)
    if args.mode == "streams":
        return await run_streams(
            addrs,
            concurrency=args.concurrency,
            events=args.events,
            interval_ms=args.interval_ms,
            **timing,
        )
    return await run_idle(addrs, count=args.count, settle_s=args.settle_s, watched=watched)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result = uvloop.run(_main(args))
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
