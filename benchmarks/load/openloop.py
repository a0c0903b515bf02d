"""Open-loop (and closed-loop) asyncio load generator for any OpenAI-compatible base URL.

Open loop: requests leave at the times of a seeded Poisson/Gamma arrival process whatever the
server does, so overload shows up as growing latency instead of a slower client. Closed loop:
``concurrency`` workers each send their next request when the previous one ends. Either way it
records, per request, client-side TTFT (send -> first non-empty content chunk), the gaps
between content chunks (ITL), end-to-end latency and output tokens, and classifies failures
(``report.ERROR_KINDS``; a 200 stream that breaks or ends without ``[DONE]`` is a failure).

It must not be the bottleneck, and must prove it: every record carries its planned and actual
send time (the summary's ``send_lateness_s``), and the summary reports the process's own CPU
time and in-flight count. Both come from one injected monotonic clock (``time.perf_counter``
by default; never the event loop's cached clock, which would hide lateness).

One ``ClientSession`` per run, its connector sized for the concurrency (closed loop) or
``max_connections`` (open loop, 0 = unbounded so connection-pool waits never hide in TTFT).
Requests carry ``ignore_eos`` (exact output lengths on vLLM and the simulator) and the
simulator's ``sim_prompt_tokens`` (exact prompt lengths); both can be turned off for servers
that reject unknown fields.

Programmatic use: ``result = await run_load(LoadConfig(...))``. CLI: ``python -m
benchmarks.load.openloop --help``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import aiohttp
import orjson

from benchmarks.load.report import RequestRecord, distribution, summarize
from benchmarks.load.workloads import Arrivals, RequestSpec, Workload

Api = Literal["chat", "completions"]
SIM_PROMPT_TOKENS_FIELD = "sim_prompt_tokens"  # benchmarks/sim/openai_shapes.py
_PROGRESS_INTERVAL_S = 0.5
_LAG_PROBE_S = 0.01


@dataclass(frozen=True)
class LoadConfig:
    """One run. Exactly one of ``rate`` (open loop) and ``concurrency`` (closed loop); at least
    one of ``num_requests`` and ``duration_s`` (whichever ends first stops new sends)."""

    base_url: str
    workload: Workload
    model: str | None = None  # None: the first model the server lists at /v1/models
    api: Api = "chat"
    stream: bool = True
    rate: float | None = None  # requests per second
    burstiness: float = 1.0  # Gamma shape; 1 = Poisson
    concurrency: int | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    seed: int = 0  # arrival process seed (the workload carries its own)
    timeout_s: float = 600.0  # per request, send to last byte
    max_connections: int = 0  # open loop connection pool bound; 0 = unbounded
    ignore_eos: bool = True
    sim_prompt_tokens: bool = True
    progress: bool = False
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False)

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("set exactly one of rate (open loop) and concurrency (closed loop)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None:
            Arrivals(self.rate, self.burstiness)  # validates both
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("set num_requests, duration_s or both")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {self.api!r}")

    @property
    def root_url(self) -> str:
        url = self.base_url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url

    def title(self) -> str:
        mode = (
            f"open loop {self.rate:g} req/s (burstiness {self.burstiness:g})"
            if self.rate is not None
            else f"closed loop, concurrency {self.concurrency}"
        )
        stream = "streaming" if self.stream else "non-streaming"
        return f"{self.workload.name} -> {self.base_url} {self.api} {stream}, {mode}"

    def describe(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "model": self.model,
            "api": self.api,
            "stream": self.stream,
            "workload": self.workload.name,
            "workload_seed": self.workload.seed,
            "mode": "open" if self.rate is not None else "closed",
            "rate": self.rate,
            "burstiness": self.burstiness if self.rate is not None else None,
            "concurrency": self.concurrency,
            "num_requests": self.num_requests,
            "duration_s": self.duration_s,
            "seed": self.seed,
        }


@dataclass
class LoadResult:
    records: list[RequestRecord]
    summary: dict[str, Any]

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """Write ``records.jsonl`` and ``summary.json`` into ``out_dir`` (created)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        records_path = out_dir / "records.jsonl"
        with records_path.open("wb") as fh:
            for rec in self.records:
                fh.write(orjson.dumps(rec.to_json()) + b"\n")
        summary_path = out_dir / "summary.json"
        summary_path.write_bytes(orjson.dumps(self.summary, option=orjson.OPT_INDENT_2) + b"\n")
        return records_path, summary_path


def request_body(
    spec: RequestSpec,
    *,
    model: str,
    api: Api = "chat",
    stream: bool = True,
    ignore_eos: bool = True,
    sim_prompt_tokens: bool = True,
) -> dict[str, Any]:
    """The OpenAI request body for one spec: chat messages or a completions prompt."""
    body: dict[str, Any] = {"model": model, "max_tokens": spec.max_tokens, "stream": stream}
    if api == "chat":
        body["messages"] = spec.messages()
    else:
        body["prompt"] = spec.prompt_text()
    if stream:
        body["stream_options"] = {"include_usage": True}
    if ignore_eos:
        body["ignore_eos"] = True
    if sim_prompt_tokens:
        body[SIM_PROMPT_TOKENS_FIELD] = spec.prompt_tokens
    return body


async def discover_model(session: aiohttp.ClientSession, root_url: str) -> str:
    async with session.get(f"{root_url}/v1/models") as resp:
        resp.raise_for_status()
        data = orjson.loads(await resp.read())
    models = data.get("data") or []
    if not models:
        raise RuntimeError(f"{root_url}/v1/models lists no model")
    return str(models[0]["id"])


class _StreamError(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class _Run:
    """The mutable state of one run: records, in-flight accounting, progress."""

    def __init__(self, cfg: LoadConfig, session: aiohttp.ClientSession, model: str) -> None:
        self.cfg, self.session, self.model = cfg, session, model
        self.clock = cfg.clock
        path = "/v1/chat/completions" if cfg.api == "chat" else "/v1/completions"
        self.url = cfg.root_url + path
        self.records: list[RequestRecord] = []
        self.t0 = self.clock()
        self.deadline = None if cfg.duration_s is None else self.t0 + cfg.duration_s
        self.sent = 0
        self.done = 0
        self.failed = 0
        self.inflight = 0
        self.inflight_max = 0
        self._inflight_area = 0.0
        self._inflight_since = self.t0

    def specs(self) -> Iterator[RequestSpec]:
        return islice(iter(self.cfg.workload), self.cfg.num_requests)

    def _track(self, delta: int) -> None:
        now = self.clock()
        self._inflight_area += self.inflight * (now - self._inflight_since)
        self._inflight_since = now
        self.inflight += delta
        self.inflight_max = max(self.inflight_max, self.inflight)

    def inflight_mean(self, end: float) -> float:
        area = self._inflight_area + self.inflight * (end - self._inflight_since)
        return area / (end - self.t0) if end > self.t0 else 0.0

    async def one(self, spec: RequestSpec, scheduled: float | None) -> None:
        cfg = self.cfg
        body = orjson.dumps(
            request_body(
                spec,
                model=self.model,
                api=cfg.api,
                stream=cfg.stream,
                ignore_eos=cfg.ignore_eos,
                sim_prompt_tokens=cfg.sim_prompt_tokens,
            )
        )
        rec = RequestRecord(spec.index, spec.prompt_tokens, spec.max_tokens, spec.group)
        self.records.append(rec)
        self._track(+1)
        self.sent += 1
        sent = self.clock()
        rec.scheduled_s = None if scheduled is None else scheduled - self.t0
        rec.sent_s = sent - self.t0
        started = False
        try:
            async with self.session.post(
                self.url, data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                started = True
                rec.status = resp.status
                if resp.status != 200:
                    await resp.read()
                    rec.error = f"http_{resp.status}"
                elif self.cfg.stream:
                    await self._read_stream(resp, rec, sent)
                else:
                    self._read_body(orjson.loads(await resp.read()), rec)
            rec.e2e_s = self.clock() - sent
            rec.ok = rec.error is None
        except _StreamError as exc:
            rec.error = exc.kind
        except (TimeoutError, aiohttp.ServerTimeoutError):
            rec.error = "timeout"
        except orjson.JSONDecodeError:
            rec.error = "bad_response"
        except (aiohttp.ClientError, OSError):
            rec.error = "disconnect" if started else "connect"
        finally:
            self._track(-1)
            self.done += 1
            self.failed += not rec.ok

    def _read_body(self, obj: Any, rec: RequestRecord) -> None:
        try:
            rec.output_tokens = int(obj["usage"]["completion_tokens"])
        except (KeyError, TypeError, ValueError):
            raise _StreamError("bad_response") from None

    async def _read_stream(
        self, resp: aiohttp.ClientResponse, rec: RequestRecord, sent: float
    ) -> None:
        clock, itl, chat = self.clock, rec.itl_s, self.cfg.api == "chat"
        buf = b""
        last = 0.0
        usage_tokens: int | None = None
        done = False
        async for data in resp.content.iter_any():
            # One timestamp per network read: events that arrived together are one observation.
            now = clock()
            buf += data.replace(b"\r\n", b"\n") if b"\r" in data else data
            if b"\n\n" not in buf:
                continue
            *events, buf = buf.split(b"\n\n")
            for event in events:
                for payload in _data_lines(event):
                    if payload == b"[DONE]":
                        done = True
                        continue
                    obj = orjson.loads(payload)
                    if not isinstance(obj, dict):
                        raise _StreamError("bad_response")
                    if "error" in obj:
                        raise _StreamError("stream_error")
                    choices = obj.get("choices")
                    if choices:
                        c = choices[0]
                        text = (c.get("delta") or {}).get("content") if chat else c.get("text")
                        if text:
                            if rec.output_tokens == 0:
                                rec.ttft_s = now - sent
                            else:
                                itl.append(now - last)
                            last = now
                            rec.output_tokens += 1  # content chunks; usage overrides at the end
                    usage = obj.get("usage")
                    if usage:
                        usage_tokens = usage.get("completion_tokens")
        if isinstance(usage_tokens, int):
            rec.output_tokens = usage_tokens
        if not done:
            raise _StreamError("missing_done")

    async def open_loop(self, tg: asyncio.TaskGroup) -> None:
        assert self.cfg.rate is not None
        times = Arrivals(self.cfg.rate, self.cfg.burstiness).times(self.cfg.seed)
        for spec, offset in zip(self.specs(), times, strict=False):
            at = self.t0 + offset
            if self.deadline is not None and at >= self.deadline:
                break
            # Not polling: asyncio may fire a timer up to its clock resolution early, and a send
            # before its scheduled time would make lateness negative.
            while (delay := at - self.clock()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(delay)
            tg.create_task(self.one(spec, at))

    async def closed_loop(self) -> None:
        assert self.cfg.concurrency is not None
        specs = self.specs()

        async def worker() -> None:
            for spec in specs:  # shared iterator: each spec goes to exactly one worker
                if self.deadline is not None and self.clock() >= self.deadline:
                    return
                await self.one(spec, None)

        async with asyncio.TaskGroup() as tg:
            for _ in range(self.cfg.concurrency):
                tg.create_task(worker())

    async def progress(self) -> None:
        total = self.cfg.num_requests
        try:
            while True:
                await asyncio.sleep(_PROGRESS_INTERVAL_S)
                self._print_progress(total)
        finally:
            self._print_progress(total)
            sys.stderr.write("\n")

    def _print_progress(self, total: int | None) -> None:
        elapsed = self.clock() - self.t0
        target = f"/{total}" if total is not None else ""
        limit = f"/{self.cfg.duration_s:.0f}" if self.cfg.duration_s is not None else ""
        sys.stderr.write(
            f"\r[openloop] {elapsed:6.1f}{limit} s  sent {self.sent}{target}  done {self.done}"
            f"  failed {self.failed}  in flight {self.inflight}   "
        )
        sys.stderr.flush()


async def run_load(cfg: LoadConfig) -> LoadResult:
    """Run one load test to completion and return every record plus the summary."""
    limit = cfg.concurrency if cfg.concurrency is not None else cfg.max_connections
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s, sock_connect=min(10.0, cfg.timeout_s))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        model = cfg.model or await discover_model(session, cfg.root_url)
        # One-time setup (the prompt corpus) must not count as the first request's lateness.
        next(iter(cfg.workload)).prompt_text()
        lags: list[float] = []
        with _quiet_gc():
            cpu0, switches0 = (
                time.process_time(),
                resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw,
            )
            run = _Run(cfg, session, model)
            side = [asyncio.create_task(_probe_loop_lag(cfg.clock, lags))]
            if cfg.progress:
                side.append(asyncio.create_task(run.progress()))
            try:
                if cfg.rate is not None:
                    async with asyncio.TaskGroup() as tg:
                        await run.open_loop(tg)
                else:
                    await run.closed_loop()
            finally:
                for task in side:
                    task.cancel()
                await asyncio.gather(*side, return_exceptions=True)
            end = cfg.clock()
            cpu = time.process_time() - cpu0
            switches = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - switches0
    wall = end - run.t0
    client = {
        "cpu_s": cpu,
        "cpu_util": cpu / wall if wall > 0 else 0.0,
        "loop_lag_s": distribution(lags, qs=(50, 99)),
        # Preempted by the OS while runnable: lateness with these high is CPU contention.
        "involuntary_context_switches": switches,
        "inflight_max": run.inflight_max,
        "inflight_mean": run.inflight_mean(end),
        "connection_limit": limit,
    }
    records = sorted(run.records, key=lambda r: r.index)
    config = {**cfg.describe(), "model": model}
    summary = summarize(records, duration_s=wall, extra={"config": config, "client": client})
    return LoadResult(records, summary)


async def _probe_loop_lag(clock: Callable[[], float], lags: list[float]) -> None:
    """How late a short timer fires: separates a busy client loop from a slow server."""
    while True:
        start = clock()
        await asyncio.sleep(_LAG_PROBE_S)
        lags.append(max(0.0, clock() - start - _LAG_PROBE_S))


@contextlib.contextmanager
def _quiet_gc() -> Iterator[None]:
    """Fewer, cheaper collections during a run; the process's settings are restored after.

    Measured: with default thresholds, collections of the run's own records and buffers
    paused the loop for tens of milliseconds at 200 req/s, which showed up as send lateness.
    Setup objects are frozen out of the collector's view and the young generation is
    collected 50x less often (cycles are rare here; memory grows by at most that batch).
    """
    old = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(max(old[0], 50_000), old[1], old[2])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


def _data_lines(event: bytes) -> Iterator[bytes]:
    """The ``data:`` payloads of one SSE event (almost always exactly one line)."""
    if event.startswith(b"data: ") and b"\n" not in event:
        yield event[6:]
        return
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            yield line[5:].lstrip(b" ")


if __name__ == "__main__":
    from benchmarks.load.cli import main

    sys.exit(main())
