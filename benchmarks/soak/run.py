"""Soak: sustained load through one real gateway process, with faults, for a long time.

    python -m benchmarks.soak.run                      # 15 minutes (the benchmark)
    python -m benchmarks.soak.run --duration 60        # the CI-sized version

Setup: ``--replicas`` simulated replicas (one ``python -m benchmarks.sim`` process, flat step
time, so capacity is exact: replicas * max_num_seqs / ((output_tokens + 1) * step_s) requests
per second) behind ``python -m gateway serve`` (p2c). An open-loop Poisson client in this
process offers ``--load`` (0.8) of that capacity: a mix of streaming and non-streaming chat
requests, a share of which the client abandons mid-way (disconnects); replica 0 restarts at one
third and two thirds of the run (crash, refuse connections, cold start).

Every request ends in exactly one class: ``ok``, ``client_disconnect`` (on purpose), or an
error keyed by what the client saw. An error is *explained* only when it is a stream broken by
a replica restart (an SSE error event ``upstream_disconnected`` on a stream that was in flight
at a restart); every other error is unexplained and fails the run.

Measured: the gateway's RSS and open descriptors once a second (slope after warm-up); at the
end, once traffic stopped, the gateway's in-flight count per replica against each replica's own
count (both must be 0), and the gateway's descriptors by kind (no client connection left, no
file/pipe growth). Prints a table; writes ``benchmarks/results/soak.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from benchmarks.load.report import format_rows
from benchmarks.load.workloads import Arrivals
from benchmarks.soak.processes import (
    FdCensus,
    GatewayProc,
    ProcSample,
    debug_replicas,
    fd_census,
    raise_fd_limit,
    sample_process,
    slope_per_min,
    start_gateway,
    start_replicas,
    stop_all,
)

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
EXPLAINED = "stream_error:upstream_disconnected"


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float = 900.0
    replicas: int = 4
    max_num_seqs: int = 8
    step_s: float = 0.02
    output_tokens: int = 32  # mean; each request draws uniformly in [mean/2, 3*mean/2]
    prompt_tokens: int = 64
    load: float = 0.8
    stream_share: float = 0.5
    disconnect_share: float = 0.05
    restarts: int = 2  # replica 0 restarts this many times, evenly spaced
    restart_listen_delay_s: float = 1.0  # connections refused this long, then...
    restart_load_time_s: float = 1.0  # ...503 while "loading the model"
    warmup_s: float = 10.0
    # After the run, wait this long and count the gateway's sockets again: idle upstream
    # keep-alive connections close after aiohttp's 15 s (checked every 15 s), so ~35 s shows
    # whether every socket opened during the run is gone (0 skips it).
    idle_settle_s: float = 0.0
    seed: int = 0

    @property
    def capacity_rps(self) -> float:
        return self.replicas * self.max_num_seqs / ((self.output_tokens + 1) * self.step_s)

    @property
    def rate_rps(self) -> float:
        return self.load * self.capacity_rps

    def restart_times(self) -> list[float]:
        return [self.duration_s * (i + 1) / (self.restarts + 1) for i in range(self.restarts)]


@dataclass
class Outcome:
    kind: str  # ok | client_disconnect | an error key
    stream: bool
    sent_s: float
    ended_s: float
    explained: bool = False


@dataclass
class SoakResult:
    config: dict[str, Any]
    outcomes: Counter[str] = field(default_factory=Counter)
    errors_explained: Counter[str] = field(default_factory=Counter)
    errors_unexplained: Counter[str] = field(default_factory=Counter)
    samples: list[ProcSample] = field(default_factory=list)
    restarts_at_s: list[float] = field(default_factory=list)
    end_inflight: dict[str, dict[str, int]] = field(default_factory=dict)
    fds_before: FdCensus | None = None
    fds_after: FdCensus | None = None
    fds_idle: FdCensus | None = None
    peak_inflight: int = 0  # the client's, which bounds the gateway's upstream connections
    sent: int = 0
    elapsed_s: float = 0.0
    send_lateness_max_s: float = 0.0

    def steady(self) -> list[ProcSample]:
        warm = float(self.config["warmup_s"])
        return [s for s in self.samples if s.t_s >= warm]

    def second_half(self) -> list[ProcSample]:
        """The samples of the run's second half: a one-off step early on (a burst of
        concurrency growing the allocator's arenas) does not read as a trend here."""
        half = float(self.config["duration_s"]) / 2
        return [s for s in self.samples if s.t_s >= half]

    def summary(self) -> dict[str, Any]:
        steady = self.steady()
        rss = [s.rss_bytes for s in steady] or [0]
        fds = [s.fds for s in steady] or [0]
        leaked = {
            rid: v for rid, v in self.end_inflight.items() if v["gateway"] != 0 or v["replica"] != 0
        }
        return {
            "requests": self.sent,
            "achieved_rps": self.sent / self.elapsed_s if self.elapsed_s else 0.0,
            "outcomes": dict(self.outcomes),
            "errors_explained": dict(self.errors_explained),
            "errors_unexplained": dict(self.errors_unexplained),
            "rss_mb_start": rss[0] / 2**20,
            "rss_mb_end": rss[-1] / 2**20,
            "rss_mb_max": max(rss) / 2**20,
            "rss_slope_mb_per_min": slope_per_min(steady, "rss_bytes") / 2**20,
            "rss_slope_second_half_mb_per_min": slope_per_min(self.second_half(), "rss_bytes")
            / 2**20,
            "fds_min": min(fds),
            "fds_max": max(fds),
            "fds_slope_per_min": slope_per_min(steady, "fds"),
            "fds_before": None if self.fds_before is None else asdict(self.fds_before),
            "fds_after": None if self.fds_after is None else asdict(self.fds_after),
            "fds_idle": None if self.fds_idle is None else asdict(self.fds_idle),
            "peak_inflight": self.peak_inflight,
            "end_inflight": self.end_inflight,
            "inflight_leaks": leaked,
            "send_lateness_max_s": self.send_lateness_max_s,
        }

    def passed(self) -> bool:
        s = self.summary()
        before, after = self.fds_before, self.fds_after
        if before is None or after is None:
            return False
        # Sockets beyond the start: idle upstream keep-alive connections, at most one per request
        # that was in flight at once (plus a scraper/catalog reconnect per replica), never one
        # per request sent; a leak of one per request is orders of magnitude above this bound.
        pooled = after.other_sockets - before.other_sockets
        bound = self.peak_inflight + 2 * int(self.config["replicas"])
        idle_ok = self.fds_idle is None or self.fds_idle.other_sockets <= before.other_sockets + 2
        return (
            not s["errors_unexplained"]
            and not s["inflight_leaks"]
            and after.clients == 0
            and after.non_sockets == before.non_sockets
            and pooled <= bound
            and idle_ok
        )


class _Client:
    """The open-loop client: one task per request, outcomes classified as they end."""

    def __init__(self, cfg: SoakConfig, api: str, model: str, t0: float) -> None:
        self.cfg = cfg
        self.url = api + "/v1/chat/completions"
        self.model = model
        self.t0 = t0
        self.rng = random.Random(f"{cfg.seed}/soak")
        self.outcomes: list[Outcome] = []
        self.inflight = 0
        self.peak_inflight = 0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def body(self, stream: bool) -> bytes:
        mean = self.cfg.output_tokens
        tokens = self.rng.randint(max(1, mean // 2), mean + mean // 2)
        return orjson.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": "soak"}],
                "max_tokens": tokens,
                "ignore_eos": True,
                "stream": stream,
                "sim_prompt_tokens": self.cfg.prompt_tokens,
            }
        )

    async def one(self, http: aiohttp.ClientSession, stream: bool, abandon: bool) -> None:
        sent = self.now()
        self.inflight += 1
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        try:
            kind = await self._request(http, stream, abandon)
        finally:
            self.inflight -= 1
        self.outcomes.append(Outcome(kind, stream, sent, self.now()))

    async def _request(self, http: aiohttp.ClientSession, stream: bool, abandon: bool) -> str:
        body = self.body(stream)
        try:
            async with http.post(
                self.url, data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                if resp.status != 200:
                    return f"http_{resp.status}:{_code(await resp.read())}"
                if not stream:
                    if abandon:
                        return (
                            "client_disconnect"  # leaves before reading: the handler is cancelled
                        )
                    data = orjson.loads(await resp.read())
                    return "ok" if data.get("choices") else "bad_body"
                return await self._read_stream(resp, abandon)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return f"exception:{type(exc).__name__}"

    async def _read_stream(self, resp: aiohttp.ClientResponse, abandon: bool) -> str:
        buf = b""
        events = 0
        async for data in resp.content.iter_any():
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b"data: "):
                    continue
                payload = event[6:]
                if payload == b"[DONE]":
                    return "ok"
                if b'"error"' in payload:
                    return f"stream_error:{_code(payload)}"
                events += 1
                if abandon and events >= 2:
                    return "client_disconnect"  # leaving mid-stream closes the connection
        return "missing_done"

    async def run(self, http: aiohttp.ClientSession, tasks: set[asyncio.Task[None]]) -> float:
        """Send until the duration ends; returns the worst lateness of a send, in seconds."""
        cfg = self.cfg
        worst = 0.0
        for at in Arrivals(cfg.rate_rps).times(cfg.seed):
            if at >= cfg.duration_s:
                break
            while (delay := at - self.now()) > 0:  # noqa: ASYNC110  (a timer may fire early)
                await asyncio.sleep(delay)
            worst = max(worst, self.now() - at)
            stream = self.rng.random() < cfg.stream_share
            abandon = self.rng.random() < cfg.disconnect_share
            task = asyncio.create_task(self.one(http, stream, abandon))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        return worst


def _code(raw: bytes) -> str:
    try:
        err = orjson.loads(raw)["error"]
        return str(err.get("code") or err.get("type"))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return "unparsed"


def classify(outcomes: list[Outcome], restarts: list[float], result: SoakResult) -> None:
    for o in outcomes:
        if o.kind in ("ok", "client_disconnect"):
            result.outcomes[o.kind] += 1
            continue
        result.outcomes["error"] += 1
        o.explained = o.kind == EXPLAINED and any(o.sent_s <= t <= o.ended_s for t in restarts)
        (result.errors_explained if o.explained else result.errors_unexplained)[o.kind] += 1


async def _sampler(pid: int, t0: float, out: list[ProcSample], stop: asyncio.Event) -> None:
    while not stop.is_set():
        out.append(sample_process(pid, time.perf_counter() - t0))
        try:
            async with asyncio.timeout(1.0):
                await stop.wait()
        except TimeoutError:
            pass


async def _restarter(
    cfg: SoakConfig, http: aiohttp.ClientSession, url: str, t0: float, at: list[float]
) -> None:
    for when in cfg.restart_times():
        await asyncio.sleep(max(0.0, when - (time.perf_counter() - t0)))
        at.append(time.perf_counter() - t0)
        control = {
            "action": "restart",
            "listen_delay_s": cfg.restart_listen_delay_s,
            "load_time_s": cfg.restart_load_time_s,
        }
        async with http.post(url + "/sim/control", json=control) as resp:
            resp.raise_for_status()


async def _settle(
    http: aiohttp.ClientSession, gw: GatewayProc, urls: list[str], limit_s: float = 20.0
) -> dict[str, dict[str, int]]:
    """Wait until nothing is in flight anywhere; the last counts seen, per replica."""
    counts: dict[str, dict[str, int]] = {}
    deadline = time.perf_counter() + limit_s
    while True:
        counts = {}
        for r in await debug_replicas(http, gw.admin):
            counts[r["id"]] = {"gateway": int(r["inflight"]), "replica": -1}
        for url in urls:
            async with http.get(url + "/sim/state") as resp:
                state = await resp.json()
            counts.setdefault(url.removeprefix("http://"), {"gateway": 0})["replica"] = int(
                state["inflight_requests"]
            )
        if all(v["gateway"] == 0 and v["replica"] == 0 for v in counts.values()):
            return counts
        if time.perf_counter() > deadline:
            return counts
        await asyncio.sleep(0.2)


async def run_soak(cfg: SoakConfig, log_dir: Path) -> SoakResult:
    """``log_dir`` (must exist) receives the processes' logs and the gateway's config."""
    raise_fd_limit()
    derived = {"capacity_rps": cfg.capacity_rps, "rate_rps": cfg.rate_rps}
    result = SoakResult(config={**asdict(cfg), **derived})
    replicas = gateway = None
    try:
        replicas, urls = await start_replicas(
            cfg.replicas, step_s=cfg.step_s, max_num_seqs=cfg.max_num_seqs, log_dir=log_dir,
            seed=cfg.seed,
        )  # fmt: skip
        gateway = await start_gateway(
            urls,
            log_dir=log_dir,
            policy={"name": "p2c"},
            shutdown={"drain_s": 30},
            # Restarts come back fast: probe often so the replica returns within the run.
            health={"probe_interval_s": 0.2, "probe_max_interval_s": 1.0},
        )
        api_port = int(gateway.api.rsplit(":", 1)[1])
        result.fds_before = fd_census(gateway.pid, api_port)
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            async with http.get(gateway.api + "/v1/models") as resp:
                model = (await resp.json())["data"][0]["id"]
            t0 = time.perf_counter()
            stop = asyncio.Event()
            sampler = asyncio.create_task(_sampler(gateway.pid, t0, result.samples, stop))
            restarter = asyncio.create_task(
                _restarter(cfg, http, urls[0], t0, result.restarts_at_s)
            )
            client = _Client(cfg, gateway.api, model, t0)
            tasks: set[asyncio.Task[None]] = set()
            result.send_lateness_max_s = await client.run(http, tasks)
            await asyncio.gather(*list(tasks))
            result.elapsed_s = time.perf_counter() - t0
            await restarter
            stop.set()
            await sampler
            result.sent = len(client.outcomes)
            result.peak_inflight = client.peak_inflight
        async with aiohttp.ClientSession() as http:
            result.end_inflight = await _settle(http, gateway, urls)
        result.fds_after = await _fds_settled(gateway.pid, api_port)
        if cfg.idle_settle_s > 0:
            await asyncio.sleep(cfg.idle_settle_s)
            result.fds_idle = fd_census(gateway.pid, api_port)
        classify(client.outcomes, result.restarts_at_s, result)
    finally:
        await stop_all(gateway, replicas)
    return result


async def _fds_settled(pid: int, port: int, limit_s: float = 5.0) -> FdCensus:
    """The census once the gateway has closed every client connection (they closed first)."""
    deadline = time.perf_counter() + limit_s
    while True:
        census = fd_census(pid, port)
        if census.clients == 0 or time.perf_counter() > deadline:
            return census
        await asyncio.sleep(0.1)


def print_table(result: SoakResult, out: Any = sys.stdout) -> None:
    s = result.summary()
    c = result.config
    rows = [
        ("duration", f"{result.elapsed_s:.0f} s"),
        ("replicas x max_num_seqs", f"{c['replicas']} x {c['max_num_seqs']}"),
        ("capacity / offered", f"{c['capacity_rps']:.1f} / {c['rate_rps']:.1f} req/s"),
        ("requests sent", f"{s['requests']} ({s['achieved_rps']:.1f} req/s)"),
        ("ok", str(s["outcomes"].get("ok", 0))),
        ("client disconnects (on purpose)", str(s["outcomes"].get("client_disconnect", 0))),
        ("errors explained (restart)", _counts(s["errors_explained"])),
        ("errors unexplained", _counts(s["errors_unexplained"])),
        ("replica restarts at", ", ".join(f"{t:.0f} s" for t in result.restarts_at_s) or "-"),
        ("gateway RSS start / end / max", _rss(s)),
        ("gateway RSS slope (after warm-up)", f"{s['rss_slope_mb_per_min']:+.3f} MB/min"),
        ("gateway RSS slope (second half)", f"{s['rss_slope_second_half_mb_per_min']:+.3f} MB/min"),
        ("gateway fds min / max", f"{s['fds_min']} / {s['fds_max']}"),
        ("gateway fds slope", f"{s['fds_slope_per_min']:+.2f} /min"),
        ("fds before (clients/sockets/other)", _census(s["fds_before"])),
        ("fds after  (clients/sockets/other)", _census(s["fds_after"])),
        ("fds after idle (clients/sockets/other)", _census(s["fds_idle"])),
        ("peak requests in flight", str(s["peak_inflight"])),
        ("in-flight left (gateway / replicas)", _inflight(s["end_inflight"])),
        ("worst send lateness", f"{1000 * s['send_lateness_max_s']:.1f} ms"),
        ("verdict", "PASS" if result.passed() else "FAIL"),
    ]
    print(format_rows(rows), file=out)


def _rss(s: dict[str, Any]) -> str:
    return f"{s['rss_mb_start']:.1f} / {s['rss_mb_end']:.1f} / {s['rss_mb_max']:.1f} MB"


def _counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "0"


def _census(c: dict[str, int] | None) -> str:
    return "-" if c is None else f"{c['clients']} / {c['other_sockets']} / {c['non_sockets']}"


def _inflight(end: dict[str, dict[str, int]]) -> str:
    g = sum(v["gateway"] for v in end.values())
    r = sum(v["replica"] for v in end.values())
    return f"{g} / {r}"


def write_json(result: SoakResult, path: Path) -> None:
    doc = {
        "benchmark": "soak",
        "config": result.config,
        "summary": result.summary(),
        "passed": result.passed(),
        "restarts_at_s": result.restarts_at_s,
        "samples": [asdict(s) for s in result.samples],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak.run", description=__doc__)
    d = SoakConfig()
    p.add_argument("--duration", type=float, default=d.duration_s, help="seconds of load")
    p.add_argument("--replicas", type=int, default=d.replicas)
    p.add_argument("--load", type=float, default=d.load, help="share of capacity offered")
    p.add_argument("--restarts", type=int, default=d.restarts)
    p.add_argument("--idle-settle", type=float, default=35.0, help="0 skips the idle census")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    p.add_argument("--log-dir", type=Path, default=RESULTS / "tmp" / "soak")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = SoakConfig(
        duration_s=args.duration,
        replicas=args.replicas,
        load=args.load,
        restarts=args.restarts,
        seed=args.seed,
        warmup_s=min(30.0, args.duration / 6),
        idle_settle_s=args.idle_settle,
    )
    args.log_dir.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(run_soak(cfg, args.log_dir))
    print_table(result)
    write_json(result, args.out)
    print(f"wrote {args.out}")
    return 0 if result.passed() else 1


if __name__ == "__main__":
    sys.exit(main())
