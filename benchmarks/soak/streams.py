"""10,000 concurrent, mostly idle streams through one gateway process.

    python -m benchmarks.soak.streams                 # 10,000 streams (or as many as fds allow)
    python -m benchmarks.soak.streams --streams 1000  # quicker

Replicas: ``--replicas`` simulated replicas in one process, each able to run its share of the
streams at once (max_num_seqs, KV and token budget sized for it), with a step time of
``--step`` seconds (default 5): a token reaches each stream only every few seconds, so the
streams are open and idle-ish, as long generations behind slow replicas are. The gateway is
``python -m gateway serve``; the client is this process.

Every stream holds two sockets in the gateway (client + replica), so the gateway needs
2 * streams + a few dozen descriptors. The benchmark raises the soft RLIMIT_NOFILE to the hard
limit for every process; when even that cannot fit the requested streams, it runs as many as
fit and says so (``fd_limited`` in the JSON) rather than failing or pretending.

Phases: baseline (gateway idle, after a few requests) -> open every stream at ``--rate`` per
second -> wait until each has received its first event -> hold ``--hold`` seconds, sampling the
gateway's RSS, descriptors and CPU, and checking a few ordinary requests and ``/metrics`` still
answer -> every client disconnects at once -> wait until the gateway and the replicas both
count zero in flight. Reports memory per stream ((RSS while holding - baseline) / streams).
Prints a table; writes ``benchmarks/results/streams-10k.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from benchmarks.load.report import format_rows
from benchmarks.proxy.accounting import cpu_seconds
from benchmarks.soak.processes import (
    GatewayProc,
    ProcSample,
    debug_replicas,
    fd_census,
    raise_fd_limit,
    sample_process,
    start_gateway,
    start_replicas,
    stop_all,
)

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
FD_MARGIN = 96  # the gateway's own descriptors: listeners, scrapers, catalog, epoll, logs
PROMPT_TOKENS = 16


@dataclass(frozen=True)
class StreamsConfig:
    streams: int = 10_000
    replicas: int = 4
    step_s: float = 5.0
    rate: float = 500.0  # new streams per second
    hold_s: float = 30.0
    seed: int = 0


@dataclass
class StreamsResult:
    config: dict[str, Any]
    requested: int = 0
    streams: int = 0
    fd_limited: bool = False
    fd_hard_limit: int = 0
    opened: int = 0
    first_event: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    open_s: float = 0.0
    baseline: ProcSample | None = None
    holding: list[ProcSample] = field(default_factory=list)
    cpu_s_per_s_holding: float = 0.0
    events_while_holding: int = 0
    probe_latencies_s: list[float] = field(default_factory=list)
    chat_status_holding: int = 0  # an ordinary chat request sent while the streams hold
    gateway_inflight_holding: int = 0
    replicas_inflight_holding: int = 0
    settle_s: float | None = None
    end_inflight: tuple[int, int] = (-1, -1)
    client_sockets_after: int = -1
    listen_overflows: int = -1  # kernel ListenOverflows during the run (whole netns)

    def summary(self) -> dict[str, Any]:
        base = self.baseline
        rss_hold = sum(s.rss_bytes for s in self.holding) / max(1, len(self.holding))
        per_stream = (rss_hold - base.rss_bytes) / self.streams if base and self.streams else 0.0
        return {
            "streams_requested": self.requested,
            "streams": self.streams,
            "fd_limited": self.fd_limited,
            "fd_hard_limit": self.fd_hard_limit,
            "opened": self.opened,
            "first_event": self.first_event,
            "failures": self.failures,
            "open_s": self.open_s,
            "rss_mb_baseline": base.rss_bytes / 2**20 if base else None,
            "rss_mb_holding": rss_hold / 2**20,
            "rss_mb_max": max((s.rss_bytes for s in self.holding), default=0) / 2**20,
            "kb_per_stream": per_stream / 1024,
            "fds_baseline": base.fds if base else None,
            "fds_holding_max": max((s.fds for s in self.holding), default=0),
            "gateway_cpu_cores_holding": self.cpu_s_per_s_holding,
            "events_per_s_holding": self.events_while_holding / self.config["hold_s"],
            "probe_latency_s_max": max(self.probe_latencies_s, default=None),
            "probes": len(self.probe_latencies_s),
            "chat_status_holding": self.chat_status_holding,
            "gateway_inflight_holding": self.gateway_inflight_holding,
            "replicas_inflight_holding": self.replicas_inflight_holding,
            "settle_s": self.settle_s,
            "end_inflight_gateway_replicas": list(self.end_inflight),
            "client_sockets_after": self.client_sockets_after,
            "listen_overflows": self.listen_overflows,
        }

    def passed(self) -> bool:
        return (
            self.first_event == self.streams
            and not self.failures
            and self.gateway_inflight_holding == self.streams
            and self.end_inflight == (0, 0)
            and self.client_sockets_after == 0
            and len(self.probe_latencies_s) > 0
            and self.chat_status_holding == 200
        )


class _Streams:
    """The client side: every stream a task that reads events until told to leave."""

    def __init__(self, url: str, body: bytes) -> None:
        self.url, self.body = url, body
        self.first = 0
        self.events = 0
        self.failures: dict[str, int] = {}
        self.all_first = asyncio.Event()
        self.leave = asyncio.Event()
        self.target = 0

    def _fail(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1

    async def one(self, http: aiohttp.ClientSession) -> None:
        try:
            async with http.post(
                self.url, data=self.body, headers={"Content-Type": "application/json"}
            ) as resp:
                if resp.status != 200:
                    self._fail(f"http_{resp.status}")
                    return
                reader = asyncio.create_task(self._read(resp))
                leave = asyncio.create_task(self.leave.wait())
                done, _ = await asyncio.wait({reader, leave}, return_when=asyncio.FIRST_COMPLETED)
                for t in (reader, leave):
                    t.cancel()
                if reader in done and not reader.cancelled() and reader.exception() is None:
                    self._fail("ended_before_the_hold")  # max_tokens too small for the run
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            errno = getattr(exc, "errno", None)
            self._fail(type(exc).__name__ + (f"[errno {errno}]" if errno else ""))

    async def _read(self, resp: aiohttp.ClientResponse) -> None:
        seen_first = False
        async for chunk in resp.content.iter_any():
            n = chunk.count(b"\n\n")
            self.events += n
            if n and not seen_first:
                seen_first = True
                self.first += 1
                if self.first == self.target:
                    self.all_first.set()


def listen_overflows() -> int:
    """The kernel's TcpExt ListenOverflows counter (accept queues that were full)."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split(), values.split(), strict=True))
            return int(table.get("ListenOverflows", 0))
    return 0


async def _inflight(
    http: aiohttp.ClientSession, gw: GatewayProc, urls: list[str]
) -> tuple[int, int]:
    gateway = sum(int(r["inflight"]) for r in await debug_replicas(http, gw.admin))
    replicas = 0
    for url in urls:
        async with http.get(url + "/sim/state") as resp:
            replicas += int((await resp.json())["inflight_requests"])
    return gateway, replicas


async def _probe(http: aiohttp.ClientSession, gw: GatewayProc) -> float:
    """The gateway's own answers while the streams hold: ``GET /v1/models`` (API port) and a
    ``/metrics`` scrape (admin port), timed together. (A chat request is sent once at the end
    of the hold: its latency is the slow replicas' step time, not the gateway's.)"""
    started = time.perf_counter()
    async with http.get(gw.api + "/v1/models") as resp:
        await resp.read()
        resp.raise_for_status()
    async with http.get(gw.admin + "/metrics") as resp:
        await resp.read()
        resp.raise_for_status()
    return time.perf_counter() - started


async def _chat(http: aiohttp.ClientSession, gw: GatewayProc, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "p"}], "max_tokens": 1}
    async with http.post(gw.api + "/v1/chat/completions", json=body) as resp:
        await resp.read()
        return resp.status


async def run_streams(cfg: StreamsConfig, log_dir: Path) -> StreamsResult:
    hard = raise_fd_limit()
    n = min(cfg.streams, (hard - FD_MARGIN) // 2)
    result = StreamsResult(config=asdict(cfg), requested=cfg.streams, streams=n,
                           fd_limited=n < cfg.streams, fd_hard_limit=hard)  # fmt: skip
    per_replica = math.ceil(n / cfg.replicas) + 8
    # Long enough to outlast opening (with slack for a slow machine) and holding.
    tokens = math.ceil((2 * n / cfg.rate + cfg.hold_s + 60) / cfg.step_s)
    blocks_per_seq = math.ceil((PROMPT_TOKENS + tokens) / 16) + 1
    sims = gw = None
    try:
        # KV for every stream at once, and never below max_model_len (the profile requires it).
        blocks = max(per_replica * blocks_per_seq + 64, 1100)
        sims, urls = await start_replicas(
            cfg.replicas,
            step_s=cfg.step_s,
            max_num_seqs=per_replica,
            log_dir=log_dir,
            num_gpu_blocks=blocks,
            seed=cfg.seed,
            extra={"max_num_batched_tokens": max(8192, per_replica * PROMPT_TOKENS * 2)},
        )
        gw = await start_gateway(urls, log_dir=log_dir, policy={"name": "least_request"})
        api_port = int(gw.api.rsplit(":", 1)[1])
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            async with http.get(gw.api + "/v1/models") as resp:
                model = (await resp.json())["data"][0]["id"]
            for _ in range(3):  # warm: imports, first connections
                await _probe(http, gw)
                await _chat(http, gw, model)
            result.baseline = sample_process(gw.pid, 0.0)
            body = orjson.dumps({
                "model": model, "messages": [{"role": "user", "content": "hold"}],
                "max_tokens": tokens, "ignore_eos": True, "stream": True,
                "sim_prompt_tokens": PROMPT_TOKENS,
            })  # fmt: skip
            overflows = listen_overflows()
            client = _Streams(gw.api + "/v1/chat/completions", body)
            client.target = n
            started = time.perf_counter()
            tasks = []
            for i in range(n):
                tasks.append(asyncio.create_task(client.one(http)))
                await asyncio.sleep(max(0.0, started + (i + 1) / cfg.rate - time.perf_counter()))
            result.opened = n
            try:
                async with asyncio.timeout(cfg.step_s * 4 + 60):
                    await client.all_first.wait()
            except TimeoutError:
                pass
            result.open_s = time.perf_counter() - started
            result.listen_overflows = listen_overflows() - overflows
            result.first_event = client.first
            result.gateway_inflight_holding, result.replicas_inflight_holding = await _inflight(
                http, gw, urls
            )
            await _hold(cfg, http, gw, model, client, result)
            client.leave.set()  # every client disconnects at once
            await asyncio.gather(*tasks)
            result.failures = dict(client.failures)
        left = time.perf_counter()
        async with aiohttp.ClientSession() as http:
            while True:
                result.end_inflight = await _inflight(http, gw, urls)
                if result.end_inflight == (0, 0) or time.perf_counter() - left > 120:
                    break
                await asyncio.sleep(0.2)
        result.settle_s = time.perf_counter() - left if result.end_inflight == (0, 0) else None
        result.client_sockets_after = fd_census(gw.pid, api_port).clients
    finally:
        await stop_all(gw, sims)
    return result


async def _hold(
    cfg: StreamsConfig,
    http: aiohttp.ClientSession,
    gw: GatewayProc,
    model: str,
    client: _Streams,
    result: StreamsResult,
) -> None:
    t0 = time.perf_counter()
    cpu0, events0 = cpu_seconds([gw.pid]), client.events
    while (elapsed := time.perf_counter() - t0) < cfg.hold_s:
        result.holding.append(sample_process(gw.pid, elapsed))
        if len(result.holding) % 5 == 1:
            result.probe_latencies_s.append(await _probe(http, gw))
        await asyncio.sleep(1.0)
    result.chat_status_holding = await _chat(http, gw, model)
    result.cpu_s_per_s_holding = (cpu_seconds([gw.pid]) - cpu0) / (time.perf_counter() - t0)
    result.events_while_holding = client.events - events0


def print_table(result: StreamsResult, out: Any = sys.stdout) -> None:
    s = result.summary()
    limited = f" (fd-limited: hard RLIMIT_NOFILE {s['fd_hard_limit']})" if s["fd_limited"] else ""
    probe = s["probe_latency_s_max"]
    rows = [
        ("streams requested / run", f"{s['streams_requested']} / {s['streams']}{limited}"),
        ("opened / got first event", f"{s['opened']} / {s['first_event']} in {s['open_s']:.0f} s"),
        ("failures", ", ".join(f"{k}={v}" for k, v in s["failures"].items()) or "0"),
        ("in flight while holding (gateway / replicas)",
         f"{s['gateway_inflight_holding']} / {s['replicas_inflight_holding']}"),
        ("gateway RSS baseline / holding / max",
         f"{s['rss_mb_baseline']:.1f} / {s['rss_mb_holding']:.1f} / {s['rss_mb_max']:.1f} MB"),
        ("memory per stream", f"{s['kb_per_stream']:.1f} KB"),
        ("gateway fds baseline / holding max", f"{s['fds_baseline']} / {s['fds_holding_max']}"),
        ("gateway CPU while holding", f"{s['gateway_cpu_cores_holding']:.2f} cores"),
        ("SSE events delivered while holding", f"{s['events_per_s_holding']:.0f} /s"),
        ("/v1/models + /metrics while holding", f"{s['probes']}, slowest "
         f"{'-' if probe is None else f'{1000 * probe:.0f} ms'}"),
        ("a chat request while holding", f"HTTP {s['chat_status_holding']}"),
        ("all disconnect: back to 0 in flight in",
         "-" if s["settle_s"] is None else f"{s['settle_s']:.1f} s"),
        ("left in flight (gw / replicas)", "{} / {}".format(*s["end_inflight_gateway_replicas"])),
        ("client sockets left in the gateway", str(s["client_sockets_after"])),
        ("accept-queue overflows while opening", str(s["listen_overflows"])),
        ("verdict", "PASS" if result.passed() else "FAIL"),
    ]  # fmt: skip
    print(format_rows(rows), file=out)


def write_json(result: StreamsResult, path: Path) -> None:
    doc = {
        "benchmark": "streams",
        "config": result.config,
        "summary": result.summary(),
        "passed": result.passed(),
        "holding_samples": [asdict(s) for s in result.holding],
        "probe_latencies_s": result.probe_latencies_s,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak.streams", description=__doc__)
    d = StreamsConfig()
    p.add_argument("--streams", type=int, default=d.streams)
    p.add_argument("--replicas", type=int, default=d.replicas)
    p.add_argument("--step", type=float, default=d.step_s, help="seconds between tokens")
    p.add_argument("--rate", type=float, default=d.rate, help="new streams per second")
    p.add_argument("--hold", type=float, default=d.hold_s)
    p.add_argument("--out", type=Path, default=RESULTS / "streams-10k.json")
    p.add_argument("--log-dir", type=Path, default=RESULTS / "tmp" / "streams")
    args = p.parse_args(argv)
    cfg = StreamsConfig(args.streams, args.replicas, args.step, args.rate, args.hold)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(run_streams(cfg, args.log_dir))
    print_table(result)
    write_json(result, args.out)
    print(f"wrote {args.out}")
    return 0 if result.passed() else 1


if __name__ == "__main__":
    sys.exit(main())
