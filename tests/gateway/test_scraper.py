"""MetricsScraper against real in-process aiohttp replicas serving real-format pages."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from benchmarks.sim.server import ReplicaSettings
from gateway import scrape_http
from gateway.config import MetricNamesConfig, ScraperConfig
from gateway.discovery.base import DiscoveredReplica
from gateway.engine_metrics import EngineSample
from gateway.pool import ReplicaPool
from gateway.scraper import MetricsScraper, ScrapeObserver
from policies.base import is_fresh
from policies.types import ReplicaId
from tests.benchmarks.conftest import StartReplicas

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "metrics"
VLLM = (FIXTURES / "vllm-v0-0.4.3.txt").read_text()
NIM = (FIXTURES / "nim-llm-1.0.0-llama-3.1-8b.txt").read_text()
SGLANG = (FIXTURES / "sglang-docs-2024-llama-3.1-8b.txt").read_text()
TGI = (FIXTURES / "handmade-tgi-3.txt").read_text()
VLLM_V1 = (FIXTURES / "handmade-vllm-v1-0.11-dp2.txt").read_text()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class PageReplica:
    """A replica serving one metrics page at ``path``; 404 elsewhere. Switchable failures."""

    def __init__(self, text: str, path: str = "/metrics") -> None:
        self.text = text
        self.path = path
        self.status = 200
        self.gzip = False  # compress even though the scraper asks for identity
        self.hang: asyncio.Event | None = None  # set: requests wait on it
        self.hits: dict[str, int] = {}
        self.app = web.Application()
        self.app.router.add_get("/{tail:.*}", self._handle)

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        if self.hang is not None:
            await self.hang.wait()
        if request.path != self.path:
            return web.Response(status=404)
        if self.gzip:
            body = gzip.compress(self.text.encode())
            headers = {"Content-Encoding": "gzip", "Content-Type": "text/plain"}
            return web.Response(status=self.status, body=body, headers=headers)
        return web.Response(status=self.status, text=self.text, content_type="text/plain")


Serve = Callable[[PageReplica], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[tuple[TestServer, PageReplica]] = []

    async def start(replica: PageReplica) -> str:
        server = TestServer(replica.app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append((server, replica))
        return str(server.make_url("")).rstrip("/")

    yield start
    for server, replica in servers:
        if replica.hang is not None:
            replica.hang.set()
        await server.close()


def make_pool(urls: dict[str, str]) -> ReplicaPool:
    pool = ReplicaPool(max_metrics_age_s=1.0)
    for name, url in urls.items():
        pool.add(ReplicaId(name), url, phase="ready", models=["m"], now=0.0)
    return pool


def sample_of(pool: ReplicaPool, name: str) -> tuple[int | None, int | None, float | None]:
    s = pool.state(ReplicaId(name))
    return s.queue_depth, s.running, s.kv_usage


@pytest.fixture
async def scrapers() -> AsyncIterator[list[MetricsScraper]]:
    made: list[MetricsScraper] = []
    yield made
    for s in made:
        await s.close()


def scraper_for(
    pool: ReplicaPool,
    made: list[MetricsScraper],
    clock: Callable[[], float],
    on_result: ScrapeObserver | None = None,
    **cfg: object,
) -> MetricsScraper:
    config = ScraperConfig(**{"interval_s": 0.25, "timeout_s": 0.2, **cfg})  # type: ignore[arg-type]
    s = MetricsScraper(pool, config, clock=clock, on_result=on_result)
    made.append(s)
    return s


async def test_detects_each_engine_and_nim_path(
    serve: Serve, scrapers: list[MetricsScraper]
) -> None:
    nim = PageReplica(NIM, path="/v1/metrics")
    urls = {
        "vllm": await serve(PageReplica(VLLM)),
        "nim": await serve(nim),
        "sglang": await serve(PageReplica(SGLANG)),
        "v1": await serve(PageReplica(VLLM_V1)),
    }
    pool = make_pool(urls)
    clock = Clock()
    scraper = scraper_for(pool, scrapers, clock)
    await scraper.scrape_once()
    assert sample_of(pool, "vllm") == (0, 0, 0.0)
    assert sample_of(pool, "nim") == (0, 1, 0.0002848191398461977)
    assert sample_of(pool, "sglang") == (2826, 162, 0.28)
    assert sample_of(pool, "v1") == (7, 11, 0.72)
    engines = {name: pool.engine(ReplicaId(name)) for name in urls}
    assert engines == {"vllm": "vllm-v0", "nim": "nim", "sglang": "sglang", "v1": "vllm-v1"}
    assert pool.state(ReplicaId("vllm")).scraped_at == clock.now
    # The NIM path is learned: the second round goes straight to /v1/metrics.
    await scraper.scrape_once()
    assert nim.hits == {"/metrics": 1, "/v1/metrics": 2}
    assert scraper.errors == {}


async def test_failed_scrape_keeps_last_values_which_go_stale(
    serve: Serve, scrapers: list[MetricsScraper], caplog: pytest.LogCaptureFixture
) -> None:
    replica = PageReplica(SGLANG)
    pool = make_pool({"a": await serve(replica)})
    clock = Clock()
    results: list[tuple[ReplicaId, str | None]] = []
    scraper = scraper_for(pool, scrapers, clock, lambda r, reason, _d: results.append((r, reason)))
    await scraper.scrape_once()
    scraped_at = clock.now

    replica.status = 500
    caplog.set_level(logging.INFO, logger="gateway.scraper")
    for _ in range(3):
        clock.now += 0.5
        await scraper.scrape_once()
    state = pool.state(ReplicaId("a"))
    assert (state.queue_depth, state.kv_usage, state.scraped_at) == (2826, 0.28, scraped_at)
    assert pool.scrape_error(ReplicaId("a")) == ("http_status", clock.now)
    assert not is_fresh(pool.view(clock.now), state)  # 1.5 s old > max_metrics_age_s
    assert scraper.errors == {"http_status": 3}
    assert results == [(ReplicaId("a"), None)] + [(ReplicaId("a"), "http_status")] * 3

    replica.status = 200
    await scraper.scrape_once()
    assert is_fresh(pool.view(clock.now), pool.state(ReplicaId("a")))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # one per transition, none per tick
    assert "failing: http_status" in messages[0]
    assert "recovered after 3 failures" in messages[1]


async def test_hanging_replica_times_out_without_delaying_others(
    serve: Serve, scrapers: list[MetricsScraper]
) -> None:
    hung = PageReplica(VLLM)
    hung.hang = asyncio.Event()
    pool = make_pool({"hung": await serve(hung), "ok": await serve(PageReplica(SGLANG))})
    durations: dict[str, float] = {}
    scraper = scraper_for(
        pool,
        scrapers,
        time.monotonic,
        lambda r, reason, d: durations.__setitem__(f"{r}:{reason}", d),
        interval_s=0.5,
        timeout_s=0.3,
    )
    started = time.monotonic()
    await scraper.scrape_once()
    elapsed = time.monotonic() - started
    assert set(durations) == {"hung:timeout", "ok:None"}
    assert durations["ok:None"] < 0.25  # finished long before the hung replica's timeout
    assert 0.3 <= elapsed < 0.5  # the round ends at the timeout, inside the interval
    assert sample_of(pool, "ok") == (2826, 162, 0.28)
    assert pool.state(ReplicaId("hung")).scraped_at is None
    assert scraper.errors == {"timeout": 1}


async def test_unreachable_and_unknown_pages_are_counted(
    serve: Serve, scrapers: list[MetricsScraper]
) -> None:
    closed = TestServer(web.Application(), host="127.0.0.1", port=0)
    await closed.start_server()
    dead_url = str(closed.make_url("")).rstrip("/")
    await closed.close()  # nothing listens there any more: connection refused
    pool = make_pool({"dead": dead_url, "odd": await serve(PageReplica("foo_total 3\n"))})
    scraper = scraper_for(pool, scrapers, Clock())
    await scraper.scrape_once()
    assert scraper.errors == {"connection": 1, "unknown_engine": 1}
    assert pool.scrape_error(ReplicaId("odd"))[0] == "unknown_engine"
    assert sample_of(pool, "dead") == (None, None, None)


async def test_missing_signal_is_unknown_and_logged_once(
    serve: Serve, scrapers: list[MetricsScraper], caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool({"tgi": await serve(PageReplica(TGI))})
    scraper = scraper_for(pool, scrapers, Clock())
    caplog.set_level(logging.INFO, logger="gateway.scraper")
    for _ in range(3):
        await scraper.scrape_once()
    assert sample_of(pool, "tgi") == (3, 5, None)
    assert [r.getMessage() for r in caplog.records] == [
        "replica tgi (engine tgi) does not expose kv_usage; treated as unknown"
    ]


async def test_config_overrides_engine_path_and_names(
    serve: Serve, scrapers: list[MetricsScraper]
) -> None:
    custom = PageReplica(TGI + "my_kv_ratio 0.5\n", path="/custom/metrics")
    pool = make_pool({"a": await serve(custom)})
    scraper = scraper_for(
        pool,
        scrapers,
        Clock(),
        engine="tgi",
        metrics_path="/custom/metrics",
        metric_names=MetricNamesConfig(kv_usage="my_kv_ratio"),
    )
    await scraper.scrape_once()
    assert sample_of(pool, "a") == (3, 5, 0.5)
    assert custom.hits == {"/custom/metrics": 1}


async def test_oversized_page_is_refused(
    serve: Serve, scrapers: list[MetricsScraper], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scrape_http, "MAX_PAGE_BYTES", 1000)
    pool = make_pool({"big": await serve(PageReplica(VLLM))})
    scraper = scraper_for(pool, scrapers, Clock())
    await scraper.scrape_once()
    assert scraper.errors == {"too_large": 1}


async def test_compressed_page_is_read(serve: Serve, scrapers: list[MetricsScraper]) -> None:
    replica = PageReplica(SGLANG)
    replica.gzip = True
    pool = make_pool({"a": await serve(replica)})
    scraper = scraper_for(pool, scrapers, Clock())
    await scraper.scrape_once()
    assert sample_of(pool, "a") == (2826, 162, 0.28)


async def test_removed_replica_is_forgotten(serve: Serve, scrapers: list[MetricsScraper]) -> None:
    pool = make_pool({"a": await serve(PageReplica(VLLM)), "b": await serve(PageReplica(VLLM))})
    scraper = scraper_for(pool, scrapers, Clock())
    await scraper.scrape_once()
    pool.remove(ReplicaId("a"))
    await scraper.scrape_once()
    assert scraper.tracked_replicas() == {ReplicaId("b")}


async def test_run_keeps_a_fixed_cadence_with_an_injected_sleep(
    serve: Serve, scrapers: list[MetricsScraper]
) -> None:
    pool = make_pool({"a": await serve(PageReplica(VLLM))})
    clock = Clock()
    delays: list[float] = []
    three_rounds = asyncio.Event()

    async def fake_sleep(delay: float) -> None:
        delays.append(delay)
        clock.now += delay
        if len(delays) == 3:
            three_rounds.set()
            await asyncio.Event().wait()  # park until cancelled

    config = ScraperConfig(interval_s=0.25, timeout_s=0.2)
    scraper = MetricsScraper(pool, config, clock=clock, sleep=fake_sleep)
    scrapers.append(scraper)
    task = asyncio.create_task(scraper.run())
    await asyncio.wait_for(three_rounds.wait(), timeout=2.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert scraper.rounds == 3
    assert delays == [0.25, 0.25, 0.25]  # the fake clock does not move during a scrape


# -- phases: starting replicas are not scraped -----------------------------------------------


async def test_starting_replicas_are_not_scraped_until_ready(
    serve: Serve, scrapers: list[MetricsScraper]
) -> None:
    # A cold start answers 503 (or refuses connections) for minutes: scraping it would count a
    # scrape error every round of every scale-up. Ejected and draining replicas are scraped.
    # So is a draining one that never was ready (an endpoint discovered already terminating).
    names = ("ready", "starting", "ejected", "draining", "never-ready")
    replicas = {name: PageReplica(SGLANG) for name in names}
    replicas["starting"].status = replicas["never-ready"].status = 503
    pool = ReplicaPool(max_metrics_age_s=1.0)
    for name, replica in replicas.items():
        phase = {"starting": "starting", "never-ready": "draining"}.get(name, "ready")
        pool.add(ReplicaId(name), await serve(replica), phase=phase, models=["m"], now=0.0)
    assert pool.eject(ReplicaId("ejected"), 0.0)
    pool.set_phase(ReplicaId("draining"), "draining", 0.0)
    clock = Clock()
    results: list[tuple[ReplicaId, str | None]] = []
    scraper = scraper_for(pool, scrapers, clock, lambda r, reason, _d: results.append((r, reason)))
    for _ in range(3):
        clock.now += 0.25
        await scraper.scrape_once()
    assert replicas["starting"].hits == replicas["never-ready"].hits == {}
    assert {n: r.hits for n, r in replicas.items() if n not in ("starting", "never-ready")} == {
        "ready": {"/metrics": 3},
        "ejected": {"/metrics": 3},
        "draining": {"/metrics": 3},
    }
    assert scraper.errors == {}
    assert sorted(set(results)) == [(ReplicaId(n), None) for n in ("draining", "ejected", "ready")]
    assert pool.scrape_error(ReplicaId("starting")) == (None, None)
    assert pool.state(ReplicaId("starting")).scraped_at is None
    assert scraper.tracked_replicas() == {ReplicaId(n) for n in ("ready", "ejected", "draining")}

    replicas["starting"].status = 200  # the model is loaded; the catalog promotes it
    assert pool.promote(ReplicaId("starting"), clock.now)
    await scraper.scrape_once()  # without run(): scraped from the next round
    assert replicas["starting"].hits == {"/metrics": 1}
    assert sample_of(pool, "starting") == (2826, 162, 0.28)
    assert scraper.errors == {}


async def test_run_scrapes_a_replica_as_soon_as_it_turns_ready(
    serve: Serve, scrapers: list[MetricsScraper]
) -> None:
    ready, starting = PageReplica(VLLM), PageReplica(SGLANG)
    pool = ReplicaPool(max_metrics_age_s=1.0)
    pool.add(ReplicaId("ready"), await serve(ready), phase="ready", models=["m"], now=0.0)
    pool.add(ReplicaId("starting"), await serve(starting))
    clock = Clock()
    first_round_done = asyncio.Event()
    scraped = asyncio.Event()

    async def park(_delay: float) -> None:
        first_round_done.set()
        await asyncio.Event().wait()  # no second round: only an at-once scrape can reach it

    def on_result(replica: ReplicaId, reason: str | None, _duration: float) -> None:
        if replica == "starting" and reason is None:
            scraped.set()

    config = ScraperConfig(interval_s=0.25, timeout_s=0.2)
    scraper = MetricsScraper(pool, config, clock=clock, sleep=park, on_result=on_result)
    scrapers.append(scraper)
    task = asyncio.create_task(scraper.run())
    try:
        await asyncio.wait_for(first_round_done.wait(), timeout=2.0)
        assert (ready.hits, starting.hits) == ({"/metrics": 1}, {})
        pool.set_models(ReplicaId("starting"), ["m"])  # a change, but still starting
        assert pool.promote(ReplicaId("starting"), clock.now)
        await asyncio.wait_for(scraped.wait(), timeout=2.0)
        assert sample_of(pool, "starting") == (2826, 162, 0.28)
        assert scraper.rounds == 1  # scraped between rounds, not by one
        assert starting.hits == {"/metrics": 1}
        assert scraper.errors == {}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_replica_starting_again_is_forgotten_then_scraped_afresh(
    serve: Serve, scrapers: list[MetricsScraper], caplog: pytest.LogCaptureFixture
) -> None:
    # Discovery sends a replica back to starting (not ready in Kubernetes, a new address): its
    # scrapes pause, and once ready again it is scraped at its current address.
    old, new = PageReplica(SGLANG), PageReplica(VLLM)
    old.status = 500
    rid = ReplicaId("a")
    pool = ReplicaPool(max_metrics_age_s=1.0)
    pool.set_members("static", [DiscoveredReplica(name=rid, url=await serve(old), ready=True)])
    clock = Clock()
    assert pool.promote(rid, clock.now)
    scraper = scraper_for(pool, scrapers, clock)
    await scraper.scrape_once()
    assert scraper.errors == {"http_status": 1}

    caplog.set_level(logging.INFO, logger="gateway.scraper")
    caplog.clear()
    pool.set_members("static", [DiscoveredReplica(name=rid, url=await serve(new), ready=True)])
    assert pool.state(rid).phase == "starting"
    for _ in range(2):
        await scraper.scrape_once()
    assert scraper.tracked_replicas() == frozenset()
    assert (old.hits, new.hits) == ({"/metrics": 1}, {})
    assert scraper.errors == {"http_status": 1}
    assert [r.getMessage() for r in caplog.records] == [
        "metrics scrape of replica a paused while it starts again, after 1 failures (http_status)"
    ]

    assert pool.promote(rid, clock.now)
    await scraper.scrape_once()
    assert (old.hits, new.hits) == ({"/metrics": 1}, {"/metrics": 1})
    assert pool.engine(rid) == "vllm-v0"
    assert sample_of(pool, "a") == (0, 0, 0.0)


async def test_scrapes_the_replica_simulator(
    start_replicas: StartReplicas, scrapers: list[MetricsScraper]
) -> None:
    flavours = ("vllm-v0", "vllm-v1", "nim", "sglang")
    sims = [
        (await start_replicas(1, ReplicaSettings.fast(flavour=f), seed=i))[0]
        for i, f in enumerate(flavours)
    ]
    pool = make_pool({f: sim.url for f, sim in zip(flavours, sims, strict=True)})
    scraper = scraper_for(pool, scrapers, Clock())
    await scraper.scrape_once()
    assert scraper.errors == {}
    for f in flavours:
        assert pool.engine(ReplicaId(f)) == f
        assert sample_of(pool, f) == (0, 0, 0.0)  # idle, and every signal known


async def test_overlapping_rounds_share_connections_safely(
    start_replicas: StartReplicas, scrapers: list[MetricsScraper]
) -> None:
    # Rounds reuse each replica's kept-alive connection; two rounds reading one stream at once
    # used to fail with "readuntil() called while another coroutine is already waiting".
    sims = await start_replicas(3, ReplicaSettings.fast())
    pool = make_pool({f"r{i}": sim.url for i, sim in enumerate(sims)})
    scraper = scraper_for(pool, scrapers, Clock())
    await scraper.scrape_once()  # opens the kept-alive connections the next rounds share
    await asyncio.gather(*(scraper.scrape_once() for _ in range(8)))
    assert scraper.errors == {}
    assert scraper.rounds == 9


# -- the scraper's HTTP/1.1 client against raw servers with exact bytes ----------------------

PAGE = "vllm:num_requests_waiting 4\nvllm:num_requests_running 2\nvllm:gpu_cache_usage_perc 0.5\n"


def _chunked(body: str) -> bytes:
    data = body.encode()
    return (
        b"".join(
            b"%x;ext=1\r\n%s\r\n" % (len(data[i : i + 20]), data[i : i + 20])
            for i in range(0, len(data), 20)
        )
        + b"0\r\nX-Trailer: 1\r\n\r\n"
    )


RAW_RESPONSES = {
    "content_length": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(PAGE) + PAGE.encode(),
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(PAGE),
    "close_delimited": b"HTTP/1.0 200 OK\r\n\r\n" + PAGE.encode(),
    "interim_100": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n"
    % len(PAGE)
    + PAGE.encode(),
}


async def raw_server(
    response: bytes, *, close_after: bool
) -> tuple[asyncio.Server, str, list[int]]:
    """Answers each request with ``response``; optionally closes every connection after it,
    like a replica whose keep-alive timeout expired. Returns the server, URL and a list that
    counts accepted connections."""
    accepted: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(response)
                await writer.drain()
                if close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", accepted


@pytest.mark.parametrize("kind", RAW_RESPONSES)
async def test_http_body_framings(kind: str, scrapers: list[MetricsScraper]) -> None:
    close_delimited = kind == "close_delimited"
    server, url, accepted = await raw_server(RAW_RESPONSES[kind], close_after=close_delimited)
    async with server:
        pool = make_pool({"a": url})
        scraper = scraper_for(pool, scrapers, Clock())
        for _ in range(3):
            await scraper.scrape_once()
        assert scraper.errors == {}
        assert sample_of(pool, "a") == (4, 2, 0.5)
        # Keep-alive unless the response ends with the connection (HTTP/1.0, no length).
        assert len(accepted) == (3 if close_delimited else 1)


async def test_idle_connection_closed_by_the_replica_is_retried(
    scrapers: list[MetricsScraper],
) -> None:
    server, url, accepted = await raw_server(RAW_RESPONSES["content_length"], close_after=True)
    async with server:
        pool = make_pool({"a": url})
        scraper = scraper_for(pool, scrapers, Clock())
        for _ in range(3):
            await scraper.scrape_once()
        assert scraper.errors == {}  # the stale keep-alive connection is not a failure
        assert len(accepted) == 3


@pytest.mark.parametrize(
    "response",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 abc\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    ],
    ids=["not_http", "bad_status", "bad_length"],
)
async def test_malformed_responses_are_protocol_errors(
    response: bytes, scrapers: list[MetricsScraper]
) -> None:
    server, url, _ = await raw_server(response, close_after=False)
    async with server:
        pool = make_pool({"a": url})
        scraper = scraper_for(pool, scrapers, Clock())
        await scraper.scrape_once()
        assert scraper.errors == {"protocol": 1}


def test_engine_sample_shape_is_stable() -> None:
    assert EngineSample.__slots__ == ("engine", "queue_depth", "running", "kv_usage")
