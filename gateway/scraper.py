"""MetricsScraper: keeps every replica's scraped load signals current.

One task (``run``) scrapes the replicas once per ``interval_s``. Each round scrapes them
concurrently in one ``asyncio.TaskGroup``, each under its own ``timeout_s`` (< interval_s, checked
by the config), so a hanging replica costs its own scrape and never delays the others' or the
next round.

Invariants:

* The scraper is the only writer of scraped values, through ``pool.apply_scrape`` and
  ``pool.scrape_failed``. A failed scrape leaves the last values in place with their
  ``scraped_at``: policies see them age and, past ``max_metrics_age_s``, treat them as unknown.
* Replicas in phase ``starting`` are not scraped: a cold start (model loading for minutes)
  refuses connections or answers 503, and the catalog already probes it on a backoff, so
  scraping it would only count scrape errors (and page whoever alerts on them) on every
  scale-up. Ready, ejected and draining replicas are scraped every round, except a draining
  one that never was ready (discovered already terminating, or removed while still loading).
  A replica that turns ready is scraped at once while ``run`` is active (woken by
  ``pool.changes``, under the round lock, not counted as a round), else in the next round:
  until its first scrape, policies only have its gateway in-flight count. A replica sent back
  to ``starting`` is forgotten (connection, path, engine, failure streak): it is a new life,
  possibly at a new address.
* The engine flavour and metrics path are learned per replica from what it serves (config
  may pin either): ``/metrics`` first, ``/v1/metrics`` (NIM) on a 404; the working path and the
  detected engine are remembered until the replica fails in a way that suggests it changed.
* Logs record transitions, not ticks: ok → failing and failing → ok (or → paused, when a
  failing replica goes back to starting) once each, and a signal a replica does not expose once
  per replica. Every failure is counted by reason (``errors``, and the ``on_result`` callback for
  the exporter).
* Failure reasons are a bounded set (``REASONS``): usable as a metric label.
* One kept-alive HTTP/1.1 connection per replica, through ``ScrapeConnection``
  (``gateway/scrape_http.py``) rather than aiohttp's client, because scraping shares the event
  loop with the proxy and aiohttp costs ~3x the CPU per scrape (benchmarks/routing_core.py).
  Scrapes of one replica never overlap: rounds and at-once scrapes all hold ``_round_lock``.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway import scrape_http
from gateway.config import ScraperConfig
from gateway.engine_metrics import (
    EngineSample,
    MetricNames,
    custom_names,
    detect_engine,
    names_for,
    parse_engine_metrics,
)
from gateway.pool import ReplicaPool
from gateway.scrape_http import ScrapeConnection, ScrapeError
from policies.types import ReplicaId

logger = logging.getLogger(__name__)

DEFAULT_PATH = "/metrics"
NIM_PATH = "/v1/metrics"  # NIM for LLMs serves its metrics here

REASONS = (
    "timeout",
    "connection",
    "http_status",
    "too_large",
    "unknown_engine",
    "bad_encoding",
    "protocol",
    "error",
)

# (replica, failure reason or None on success, duration in seconds)
ScrapeObserver = Callable[[ReplicaId, str | None, float], None]


@dataclass(slots=True)
class _Target:
    """What the scraper has learned about one replica."""

    connection: ScrapeConnection | None = None  # kept alive between scrapes
    path: str | None = None  # the metrics path known to work
    names: MetricNames | None = None  # resolved name table (detected or configured)
    failing: str | None = None  # reason of the current failure streak
    failures: int = 0  # length of the current failure streak
    reported_missing: set[str] = field(default_factory=set)


class MetricsScraper:
    def __init__(
        self,
        pool: ReplicaPool,
        config: ScraperConfig,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_result: ScrapeObserver | None = None,
    ) -> None:
        self._pool = pool
        self._config = config
        self._clock = clock
        self._sleep = sleep
        self._on_result = on_result
        self._targets: dict[ReplicaId, _Target] = {}
        # Starting replicas the last round skipped: the ones to scrape at once when they turn
        # ready, instead of waiting up to interval_s for the next round.
        self._held: set[ReplicaId] = set()
        self._fixed = self._configured_names(config)
        self.errors: Counter[str] = Counter()  # failures by reason, since start
        self.rounds = 0
        # One round at a time: rounds share each replica's kept-alive connection, and two
        # readers on one stream corrupt both. A caller of scrape_once() while run() is active
        # (tests, an on-demand refresh) waits for the current round, then gets a fresh one.
        self._round_lock = asyncio.Lock()

    @staticmethod
    def _configured_names(config: ScraperConfig) -> MetricNames | None:
        """The name table when config pins the engine; None means detect per replica."""
        if config.engine == "auto":
            return None
        return _overlay(names_for(config.engine), config)

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Scrape every ``interval_s`` until cancelled. Rounds start on a fixed cadence; between
        them, a replica that turns ready is scraped at once."""
        interval = self._config.interval_s
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._scrape_when_ready())
            while True:
                started = self._clock()
                await self.scrape_once()
                await self._sleep(max(0.0, interval - (self._clock() - started)))

    async def _scrape_when_ready(self) -> None:
        """Scrape held replicas as soon as they turn ready: their first requests are routed on
        the gateway's in-flight count alone until their engine signals are known.

        ``pool.changes`` fires on every phase change (and membership or admission change), so a
        wake-up costs one look at the held replicas. Nothing is missed: the check after the
        last scrape and the next ``wait`` have no ``await`` between them.
        """
        while True:
            await self._pool.changes.wait()
            if not self._turned_ready():
                continue  # most changes: no need to wait for a round in progress
            async with self._round_lock:
                while ready := self._turned_ready():
                    self._held.difference_update(ready)
                    await self._scrape_all(ready)

    def _turned_ready(self) -> list[ReplicaId]:
        pool = self._pool
        return [r for r in self._held if r in pool and pool.state(r).phase == "ready"]

    def tracked_replicas(self) -> frozenset[ReplicaId]:
        """Replicas the scraper currently remembers a path, engine or failure streak for."""
        return frozenset(self._targets)

    async def close(self) -> None:
        """Close every kept-alive connection (the task itself is cancelled by its owner)."""
        for target in self._targets.values():
            if target.connection is not None:
                target.connection.close()

    # -- one round -------------------------------------------------------------------------

    async def scrape_once(self) -> None:
        """Scrape every current member not starting once, concurrently; returns when all are
        done."""
        async with self._round_lock:
            await self._round()

    async def _round(self) -> None:
        pool = self._pool
        ids = pool.ids()
        scraped = [r for r in ids if _scraped(pool, r)]
        self._held = set(ids).difference(scraped)
        for replica in self._targets.keys() - set(scraped):
            self._forget(replica)
        await self._scrape_all(scraped)
        self.rounds += 1

    async def _scrape_all(self, replicas: list[ReplicaId]) -> None:
        async with asyncio.TaskGroup() as tg:
            for replica in replicas:
                tg.create_task(self._scrape_replica(replica))

    def _forget(self, replica: ReplicaId) -> None:
        """Drop what was learned about a replica that left the pool or is starting again."""
        target = self._targets.pop(replica)
        if target.connection is not None:
            target.connection.close()
        if target.failing is not None and replica in self._held:
            logger.info(
                "metrics scrape of replica %s paused while it starts again, after %d failures (%s)",
                replica,
                target.failures,
                target.failing,
            )

    async def _scrape_replica(self, replica: ReplicaId) -> None:
        if replica not in self._pool:  # removed since the round started
            return
        started = self._clock()
        target = self._targets.get(replica)
        if target is None:
            target = self._targets[replica] = _Target()
        try:
            async with asyncio.timeout(self._config.timeout_s):
                sample = await self._fetch_sample(replica, target)
        except TimeoutError:
            reason, detail = "timeout", "no answer within timeout_s"
        except ScrapeError as exc:
            reason, detail = exc.reason, str(exc)
        except (OSError, asyncio.IncompleteReadError) as exc:
            reason, detail = "connection", f"{type(exc).__name__}: {exc}"
        except (ValueError, asyncio.LimitOverrunError) as exc:
            reason, detail = "protocol", f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # one replica's surprise must not end the round for all
            reason, detail = "error", repr(exc)
        else:
            self._succeeded(replica, target, sample)
            self._report(replica, None, started)
            return
        self._failed(replica, target, reason, detail)
        self._report(replica, reason, started)

    async def _fetch_sample(self, replica: ReplicaId, target: _Target) -> EngineSample:
        if target.connection is None:
            target.connection = ScrapeConnection(self._pool.url(replica))
        paths = self._paths(target)
        for i, path in enumerate(paths):
            status, headers, body = await target.connection.get(path)
            if status == 404 and i + 1 < len(paths):
                continue
            if status != 200:
                target.path = None  # maybe a different engine now: probe again next time
                raise ScrapeError("http_status", f"GET {path} returned {status}")
            target.path = path
            coding = headers.get("content-encoding", "identity").lower()
            try:
                if coding in ("gzip", "deflate"):  # sent despite Accept-Encoding: identity
                    body = zlib.decompressobj(wbits=47).decompress(body, scrape_http.MAX_PAGE_BYTES)
                elif coding != "identity":
                    raise ScrapeError("bad_encoding", f"GET {path}: Content-Encoding {coding}")
                text = body.decode("utf-8")
            except (UnicodeDecodeError, zlib.error) as exc:
                raise ScrapeError("bad_encoding", f"GET {path}: {exc}") from exc
            return self._parse(text, target)
        raise AssertionError("unreachable: the last path either returns or raises")

    def _paths(self, target: _Target) -> tuple[str, ...]:
        if self._config.metrics_path is not None:
            return (self._config.metrics_path,)
        if target.path is not None:
            return (target.path,)
        if self._config.engine == "nim":
            return (NIM_PATH,)
        return (DEFAULT_PATH, NIM_PATH)

    def _parse(self, text: str, target: _Target) -> EngineSample:
        names = self._fixed or target.names
        if names is None:
            engine = detect_engine(text)
            names = _overlay(None if engine is None else names_for(engine), self._config)
            if names is None:
                raise ScrapeError("unknown_engine", "page has no known engine metric names")
        sample = parse_engine_metrics(text, names=names)
        # Keep a detected table only while it finds something: a replica whose page stops
        # matching (upgraded engine, different server behind the URL) is re-detected.
        found = (sample.queue_depth, sample.running, sample.kv_usage) != (None, None, None)
        target.names = names if found else None
        return sample

    # -- outcomes --------------------------------------------------------------------------

    def _succeeded(self, replica: ReplicaId, target: _Target, sample: EngineSample) -> None:
        self._pool.apply_scrape(replica, sample, self._clock())
        if target.failing is not None:
            logger.info(
                "metrics scrape of replica %s recovered after %d failures (%s)",
                replica,
                target.failures,
                target.failing,
            )
            target.failing = None
            target.failures = 0
        missing = [
            signal
            for signal, value in (
                ("queue_depth", sample.queue_depth),
                ("running", sample.running),
                ("kv_usage", sample.kv_usage),
            )
            if value is None and signal not in target.reported_missing
        ]
        if missing:
            target.reported_missing.update(missing)
            logger.warning(
                "replica %s (engine %s) does not expose %s; treated as unknown",
                replica,
                sample.engine,
                ", ".join(missing),
            )

    def _failed(self, replica: ReplicaId, target: _Target, reason: str, detail: str) -> None:
        self.errors[reason] += 1
        self._pool.scrape_failed(replica, reason, self._clock())
        if target.failing is None:
            logger.warning("metrics scrape of replica %s failing: %s (%s)", replica, reason, detail)
        elif target.failing != reason:
            logger.warning(
                "metrics scrape of replica %s still failing, now: %s (%s)", replica, reason, detail
            )
        target.failing = reason
        target.failures += 1

    def _report(self, replica: ReplicaId, reason: str | None, started: float) -> None:
        if self._on_result is not None:
            self._on_result(replica, reason, self._clock() - started)


def _scraped(pool: ReplicaPool, replica: ReplicaId) -> bool:
    """Not starting, and not draining without ever having been ready in this life (an endpoint
    discovered already terminating, or one removed while it was still loading)."""
    state = pool.state(replica)
    if state.phase == "starting":
        return False
    return state.phase != "draining" or state.ready_since is not None


def _overlay(base: MetricNames | None, config: ScraperConfig) -> MetricNames | None:
    """``base`` with the config's custom metric names applied (None: nothing to read)."""
    custom = config.metric_names
    if custom is None or not (custom.queue_depth or custom.running or custom.kv_usage):
        return base
    return custom_names(
        base, waiting=custom.queue_depth, running=custom.running, kv_usage=custom.kv_usage
    )
