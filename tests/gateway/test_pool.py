"""ReplicaPool and Router: membership, phases, exact in-flight counts, scrapes, the O(1) view."""

from __future__ import annotations

import asyncio
import random

import pytest
from prometheus_client import CollectorRegistry

from gateway.discovery.base import DiscoveredReplica
from gateway.engine_metrics import EngineSample
from gateway.exporter import GatewayMetrics
from gateway.pool import ReplicaPool
from gateway.router import Router
from policies.round_robin import RoundRobin
from policies.types import MembershipChanged, PolicyEvent, ReplicaId, RequestInfo

A, B, C = ReplicaId("a:1"), ReplicaId("b:1"), ReplicaId("c:1")


def _pool(*ids: ReplicaId, ready: bool = True) -> ReplicaPool:
    pool = ReplicaPool(max_metrics_age_s=1.0)
    for rid in ids:
        pool.add(
            rid, f"http://{rid}", phase="ready" if ready else "starting", models={"m"}, now=0.0
        )
    return pool


def test_view_is_cached_until_something_changes() -> None:
    pool = _pool(B, A)
    v1, v2 = pool.view(1.0), pool.view(2.0)
    assert v1.replicas is v2.replicas  # no rebuild without a change
    assert [r.id for r in v1.replicas] == [A, B]  # sorted by id
    pool.acquire(A)
    assert pool.view(3.0).replicas is v1.replicas  # in-flight lives in the live mapping
    assert v1.inflight[A] == 1
    pool.apply_scrape(A, EngineSample("vllm-v1", 3, 2, 0.5), at=3.0)
    v3 = pool.view(3.0)
    assert v3.replicas is not v1.replicas
    a = v3.replicas[0]
    assert (a.queue_depth, a.running, a.kv_usage, a.scraped_at) == (3, 2, 0.5, 3.0)
    assert a.inflight_at_scrape == 1
    with pytest.raises(TypeError):
        v3.inflight[A] = 5  # type: ignore[index]  # read-only for policies


def test_failed_scrape_keeps_the_last_values_with_their_age() -> None:
    pool = _pool(A)
    pool.apply_scrape(A, EngineSample("vllm-v1", 4, 1, 0.2), at=1.0)
    pool.scrape_failed(A, "timeout", at=2.0)
    state = pool.state(A)
    assert (state.queue_depth, state.scraped_at) == (4, 1.0)
    assert pool.scrape_error(A) == ("timeout", 2.0)
    pool.apply_scrape(A, EngineSample("vllm-v1", None, None, None), at=3.0)
    assert pool.state(A).queue_depth is None  # not exposed: unknown, never 0
    assert pool.scrape_error(A) == (None, None)


def test_removing_a_busy_replica_drains_it_until_its_last_release() -> None:
    pool = _pool(A, B)
    seen: list[frozenset[ReplicaId]] = []
    pool.add_listener(seen.append)
    pool.acquire(A)
    pool.remove(A)
    assert pool.state(A).phase == "draining"
    assert A in pool and seen == []
    pool.release(A)
    assert A not in pool
    assert seen == [frozenset({B})]
    pool.remove(B)  # idle: at once
    assert len(pool) == 0


def test_set_members_maps_discovery_snapshots_to_phases() -> None:
    pool = ReplicaPool(max_metrics_age_s=1.0)
    pool.set_members(
        "k8s",
        [
            DiscoveredReplica("a:1", "http://a:1", ready=True),
            DiscoveredReplica("b:1", "http://b:1", ready=False),
            DiscoveredReplica("c:1", "http://c:1", ready=True, terminating=True),
        ],
    )
    assert [pool.state(r).phase for r in (A, B, C)] == ["starting", "starting", "draining"]
    assert pool.promote(A, now=1.0) is True  # admitted: the catalog's first list makes it ready
    assert pool.promote(B, now=1.0) is False  # Kubernetes says not ready yet
    assert pool.state(A).ready_since == 1.0
    pool.acquire(A)
    pool.set_members("k8s", [DiscoveredReplica("b:1", "http://b:1", ready=True)])
    assert pool.state(A).phase == "draining"  # gone from discovery, still busy
    assert C not in pool  # gone and idle
    assert pool.promote(B, now=2.0) is True
    pool.release(A)
    assert pool.ids() == (B,)


async def test_capacity_signal_wakes_waiters_on_release_and_ready() -> None:
    pool = _pool(A)
    pool.add(B, "http://b:1", models={"m"})
    pool.acquire(A)
    waiter = asyncio.create_task(pool.capacity.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    pool.release(A)
    await asyncio.wait_for(waiter, 1.0)
    waiter = asyncio.create_task(pool.capacity.wait())
    await asyncio.sleep(0)
    pool.promote(B, now=1.0)
    await asyncio.wait_for(waiter, 1.0)


class _Recorder(RoundRobin):
    """The real round_robin policy, with its events recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[PolicyEvent] = []

    def observe(self, event: PolicyEvent) -> None:
        self.events.append(event)
        super().observe(event)


def test_router_acquires_with_the_decision_and_releases_once() -> None:
    pool = _pool(A, B)
    registry = CollectorRegistry()
    policy = _Recorder()
    router = Router(
        pool,
        policy,
        rng=random.Random(1),
        clock=lambda: 5.0,
        metrics=GatewayMetrics(registry, version="t", policy=policy.name),
    )
    req = RequestInfo(seq=router.next_seq(), model="m")
    decision = router.pick(req)
    assert decision is not None
    assert pool.inflight(decision.replica) == 1
    router.release(decision.replica, req, ok=True)
    assert pool.total_inflight() == 0
    assert [type(e).__name__ for e in policy.events] == ["Dispatched", "Completed"]
    assert router.pick(RequestInfo(seq=2, model="other")) is None
    assert (
        registry.get_sample_value(
            "kvgate_routing_decisions_total", {"policy": "round_robin", "reason": "no_candidate"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "kvgate_routing_decision_duration_seconds_count", {"policy": "round_robin"}
        )
        == 2
    )
    pool.remove(A)
    assert policy.events[-1] == MembershipChanged(frozenset({B}))
