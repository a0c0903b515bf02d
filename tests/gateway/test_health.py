"""Replica health: readiness probes with backoff, passive ejection, half-open readmission and
the maximum ejection share — the state machine on a fake clock, then live against real
servers (a counting health endpoint, simulated replicas behind the gateway)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.catalog import ModelCatalog
from gateway.config import HealthConfig
from gateway.discovery.base import DiscoveredReplica
from gateway.health import HealthTracker
from gateway.pool import ReplicaPool
from policies.types import ReplicaId
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import StartGateway, wait_pool

A, B, C, D = (ReplicaId(f"{c}:1") for c in "abcd")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _setup(
    *ids: ReplicaId, ready: bool = True, **health: Any
) -> tuple[ReplicaPool, HealthTracker, FakeClock]:
    """A pool whose replicas discovery admits, a tracker, and its clock; ``ready`` replicas
    have passed their probe and listed model "m"."""
    clock = FakeClock()
    pool = ReplicaPool(max_metrics_age_s=1.0)
    tracker = HealthTracker(pool, HealthConfig(**health), clock=clock)
    pool.set_members("test", [DiscoveredReplica(rid, f"http://{rid}", ready=True) for rid in ids])
    for rid in ids if ready else ():
        tracker.probe_result(rid, True)
        pool.set_models(rid, ["m"])
        tracker.models_listed(rid)
    return pool, tracker, clock


def _phases(pool: ReplicaPool) -> dict[str, str]:
    return {rid: pool.state(rid).phase for rid in pool.ids()}


def test_a_starting_replica_is_probed_at_once_then_with_capped_doubling() -> None:
    pool, tracker, clock = _setup(A, ready=False, probe_interval_s=0.5, probe_max_interval_s=3.0)
    (a,) = pool.ids()
    assert tracker.due() == [a]
    probed_at = []
    while clock.now < 20.0:
        if tracker.due():
            probed_at.append(clock.now)
            tracker.probe_result(a, False)
        clock.now = round(clock.now + 0.25, 2)
    gaps = [round(b - x, 2) for x, b in itertools.pairwise(probed_at)]
    assert gaps[:4] == [0.5, 1.0, 2.0, 3.0]  # doubling from probe_interval_s...
    assert set(gaps[3:]) == {3.0}  # ...then capped: a loading replica is not hammered
    assert tracker.next_due_at() == probed_at[-1] + 3.0
    assert pool.state(a).phase == "starting"


def test_ready_needs_a_passing_probe_and_a_model_list() -> None:
    pool, tracker, clock = _setup(A, ready=False)
    (a,) = pool.ids()
    clock.now = 1.0
    pool.set_models(a, ["m"])
    tracker.models_listed(a)
    assert pool.state(a).phase == "starting"  # lists models, but its health probe never passed
    clock.now = 2.0
    tracker.probe_result(a, True)
    state = pool.state(a)
    assert (state.phase, state.ready_since) == ("ready", 2.0)
    assert tracker.due() == []  # ready replicas are judged by their requests, not probed


def test_probe_and_models_wait_for_discovery_to_admit_the_replica() -> None:
    pool, tracker, clock = _setup(ready=False)
    pool.set_members("test", [DiscoveredReplica(A, "http://a:1", ready=False)])
    (a,) = pool.ids()
    tracker.probe_result(a, True)
    pool.set_models(a, ["m"])
    tracker.models_listed(a)
    assert pool.state(a).phase == "starting"  # Kubernetes says not ready yet
    clock.now = 3.0
    pool.set_members("test", [DiscoveredReplica(A, "http://a:1", ready=True)])
    tracker.due()  # the catalog's loop runs this when the pool changes
    assert (pool.state(a).phase, pool.state(a).ready_since) == ("ready", 3.0)
    # Sent back to starting by discovery: it must pass a probe again before taking traffic.
    pool.set_members("test", [DiscoveredReplica(A, "http://a:1", ready=False)])
    pool.set_members("test", [DiscoveredReplica(A, "http://a:1", ready=True)])
    assert pool.state(a).phase == "starting"
    assert tracker.due() == [a]
    assert pool.state(a).phase == "starting"
    tracker.probe_result(a, True)
    assert pool.state(a).phase == "ready"


def test_consecutive_failures_eject_and_the_ejection_time_doubles_to_its_cap() -> None:
    pool, tracker, clock = _setup(
        A, B, consecutive_failures=3, base_ejection_s=2.0, max_ejection_s=5.0
    )
    a = pool.ids()[0]
    for ok in (False, False, True, False, False):  # a success resets the count
        tracker.request_result(a, ok)
    assert pool.state(a).phase == "ready"
    tracker.request_result(a, False)
    assert pool.state(a).phase == "ejected"
    assert tracker.due() == [] and tracker.next_due_at() == 2.0
    durations = []
    for _ in range(4):  # the half-open probe keeps failing: 2, 4, then capped at 5
        start = clock.now
        clock.now = tracker.next_due_at() or 0.0
        durations.append(clock.now - start)
        assert tracker.due() == [a]
        tracker.probe_result(a, False)
        assert pool.state(a).phase == "ejected"
    assert durations == [2.0, 4.0, 5.0, 5.0]


def test_half_open_readmits_on_probation_and_one_failure_ejects_again() -> None:
    pool, tracker, clock = _setup(A, B, consecutive_failures=2, base_ejection_s=1.0)
    a = pool.ids()[0]
    tracker.request_result(a, False)
    tracker.request_result(a, False)
    assert pool.state(a).phase == "ejected"
    clock.now = 0.5
    tracker.probe_result(a, True)  # an early answer does not shorten the ejection
    assert pool.state(a).phase == "ejected"
    clock.now = 1.0
    tracker.probe_result(a, True)
    assert (pool.state(a).phase, pool.state(a).ready_since) == ("ready", 1.0)  # slow start again
    assert tracker.status(a).probation
    tracker.request_result(a, False)  # on probation: one failure is enough
    assert pool.state(a).phase == "ejected"
    assert tracker.next_due_at() == 3.0  # the second ejection in a row: 2 x base
    clock.now = 3.0
    tracker.probe_result(a, True)
    tracker.request_result(a, True)  # probation passed
    assert not tracker.status(a).probation
    tracker.request_result(a, False)
    assert pool.state(a).phase == "ready"  # back to needing consecutive_failures in a row


def test_the_ejection_streak_restarts_after_max_ejection_s_in_service() -> None:
    pool, tracker, clock = _setup(
        A, B, consecutive_failures=1, base_ejection_s=1.0, max_ejection_s=8.0
    )
    a = pool.ids()[0]
    tracker.request_result(a, False)
    clock.now = 1.0
    tracker.probe_result(a, True)
    tracker.request_result(a, True)
    clock.now = 2.0  # 1 s in service: still the same streak
    tracker.request_result(a, False)
    assert tracker.next_due_at() == 2.0 + 2.0
    clock.now = 4.0
    tracker.probe_result(a, True)
    tracker.request_result(a, True)
    clock.now = 12.0  # 8 s in service: a new streak
    tracker.request_result(a, False)
    assert tracker.next_due_at() == 12.0 + 1.0


@pytest.mark.parametrize(
    ("replicas", "percent", "ejectable"),
    [
        (4, 50, 2),
        (4, 10, 1),  # Envoy: one may always be ejected
        (1, 10, 1),
        (5, 60, 3),
        (3, 100, 3),
    ],
    ids=["half-of-4", "at-least-one", "single", "60pct-of-5", "all"],
)
def test_never_more_than_the_max_ejection_share(
    replicas: int, percent: int, ejectable: int
) -> None:
    ids = [ReplicaId(f"r{i}:1") for i in range(replicas)]
    pool, tracker, _ = _setup(*ids, consecutive_failures=1, max_ejection_percent=percent)
    for rid in pool.ids():
        tracker.request_result(rid, False)
    assert list(_phases(pool).values()).count("ejected") == ejectable


def test_starting_and_draining_replicas_do_not_count_in_the_share() -> None:
    pool, tracker, _ = _setup(A, B, consecutive_failures=1, max_ejection_percent=50)
    pool.set_members(
        "test",
        [DiscoveredReplica(r, f"http://{r}", ready=True) for r in (A, B, C)]
        + [DiscoveredReplica(D, "http://d:1", ready=True, terminating=True)],
    )
    assert _phases(pool) == {A: "ready", B: "ready", C: "starting", D: "draining"}
    tracker.request_result(pool.ids()[0], False)
    tracker.request_result(pool.ids()[1], False)  # 2 of 2 serving: over 50 %
    assert _phases(pool) == {A: "ejected", B: "ready", C: "starting", D: "draining"}


def test_zero_consecutive_failures_disables_ejection() -> None:
    pool, tracker, _ = _setup(A, consecutive_failures=0)
    for _ in range(20):
        tracker.request_result(pool.ids()[0], False)
    assert _phases(pool) == {A: "ready"}


# -- live ------------------------------------------------------------------------------------


class _HealthEndpoint:
    """A real server with a health endpoint that counts probes and loads for a while."""

    def __init__(self, path: str = "/health") -> None:
        self.path = path
        self.healthy = asyncio.Event()
        self.probes: list[float] = []
        self.app = web.Application()
        self.app.router.add_get(path, self._health)
        self.app.router.add_get("/v1/models", self._models)

    async def _health(self, _request: web.Request) -> web.Response:
        self.probes.append(asyncio.get_running_loop().time())
        return web.Response(status=200 if self.healthy.is_set() else 503)

    async def _models(self, _request: web.Request) -> web.Response:
        if not self.healthy.is_set():
            return web.Response(status=503)
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})


@pytest.fixture
async def catalog_for() -> AsyncIterator[Any]:
    tasks: list[asyncio.Task[None]] = []
    catalogs: list[ModelCatalog] = []

    async def start(url: str, **health: Any) -> tuple[ReplicaPool, ModelCatalog]:
        loop = asyncio.get_running_loop()
        cfg = HealthConfig(**health)
        pool = ReplicaPool(max_metrics_age_s=1.0)
        tracker = HealthTracker(pool, cfg, clock=loop.time)
        catalog = ModelCatalog(
            pool,
            refresh_interval_s=5.0,
            refresh_timeout_s=1.0,
            clock=loop.time,
            health=tracker,
            probe_path=cfg.probe_path,
            probe_timeout_s=cfg.probe_timeout_s,
        )
        catalogs.append(catalog)
        pool.set_members("test", [DiscoveredReplica("r:1", url, ready=True)])
        tasks.append(asyncio.create_task(catalog.run()))
        return pool, catalog

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for catalog in catalogs:
        await catalog.close()


async def test_probes_back_off_on_a_loading_replica_and_it_turns_ready_promptly(
    aiohttp_server: Any, catalog_for: Any
) -> None:
    endpoint = _HealthEndpoint()
    server = await aiohttp_server(endpoint.app)
    loop = asyncio.get_running_loop()
    started = loop.time()
    pool, _ = await catalog_for(
        f"http://127.0.0.1:{server.port}", probe_interval_s=0.05, probe_max_interval_s=0.4
    )
    loop.call_later(1.5, endpoint.healthy.set)  # "loads its model" for 1.5 s
    await wait_pool(pool, lambda: pool.state(pool.ids()[0]).phase == "ready", limit_s=3.0)
    ready_after = loop.time() - started
    # Probes at 0, .05, .15, .35, .75, 1.15, 1.55: seven, not the 30 a fixed 50 ms would send.
    assert len(endpoint.probes) <= 9
    assert 1.5 <= ready_after < 1.5 + 0.4 + 0.3  # within one capped interval of being healthy


async def test_nim_health_path_is_found_after_a_404(aiohttp_server: Any, catalog_for: Any) -> None:
    endpoint = _HealthEndpoint("/v1/health/ready")
    endpoint.healthy.set()
    server = await aiohttp_server(endpoint.app)
    pool, _ = await catalog_for(f"http://127.0.0.1:{server.port}")
    await wait_pool(pool, lambda: pool.state(pool.ids()[0]).phase == "ready")
    assert len(endpoint.probes) == 1


async def test_a_crashed_replica_is_ejected_without_failing_clients_and_readmitted(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    a, b = await start_replicas(2)
    server = await start_gateway(
        [a.url, b.url],
        health={"consecutive_failures": 2, "base_ejection_s": 0.3, "probe_interval_s": 0.05},
    )
    pool = server.gateway.pool
    rid_a = next(r for r in pool.ids() if pool.url(r) == a.url)
    await a.crash()
    url = f"http://127.0.0.1:{server.port}/v1/completions"
    req = {"model": a.model, "prompt": "x", "max_tokens": 2}
    async with aiohttp.ClientSession() as http:
        for _ in range(6):  # round robin: a's turns fail to connect and are retried on b
            async with http.post(url, json=req) as resp:
                assert resp.status == 200
        assert pool.state(rid_a).phase == "ejected"
        assert server.gateway.health.status(rid_a).ejections == 1
        await a.restart(listen_delay_s=0.0, load_time_s=0.0)
        await wait_pool(pool, lambda: pool.state(rid_a).phase == "ready", limit_s=3.0)
        assert server.gateway.health.status(rid_a).probation
        seen = a.requests_seen
        for _ in range(4):
            async with http.post(url, json=req) as resp:
                assert resp.status == 200
        assert a.requests_seen > seen
        assert not server.gateway.health.status(rid_a).probation
