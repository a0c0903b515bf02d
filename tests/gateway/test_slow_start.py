"""Slow start: the pool stamps ``ready_since`` on every way into ``ready``, the view carries the
window, and with an in-flight bound a ramping replica's share is capped (router)."""

from __future__ import annotations

import math
import random

from prometheus_client import CollectorRegistry

from gateway.config import HealthConfig
from gateway.discovery.base import DiscoveredReplica
from gateway.exporter import GatewayMetrics
from gateway.health import HealthTracker
from gateway.pool import ReplicaPool
from gateway.router import Router
from policies.base import SLOW_START_MIN_WEIGHT
from policies.registry import make_policy
from policies.types import ReplicaId, RequestInfo, Saturation

A, B = ReplicaId("a:1"), ReplicaId("b:1")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _gateway(
    bound: int | None, window: float = 10.0
) -> tuple[ReplicaPool, HealthTracker, Router, FakeClock]:
    clock = FakeClock()
    pool = ReplicaPool(
        max_metrics_age_s=1.0,
        saturation=Saturation(max_inflight=bound) if bound else None,
        slow_start_s=window,
    )
    tracker = HealthTracker(pool, HealthConfig(consecutive_failures=1), clock=clock)
    policy = make_policy("p2c", {})
    metrics = GatewayMetrics(CollectorRegistry(), version="t", policy=policy.name)
    router = Router(
        pool, policy, rng=random.Random(3), clock=clock, metrics=metrics, health=tracker
    )
    pool.set_members("test", [DiscoveredReplica(r, f"http://{r}", ready=True) for r in (A, B)])
    return pool, tracker, router, clock


def _make_ready(pool: ReplicaPool, tracker: HealthTracker, rid: ReplicaId) -> None:
    pool.set_models(rid, ["m"])
    tracker.probe_result(rid, True)


def test_ready_since_is_set_on_promotion_and_readmission_and_ramping_expires() -> None:
    pool, tracker, _, clock = _gateway(bound=None, window=10.0)
    clock.now = 2.0
    _make_ready(pool, tracker, A)
    assert pool.state(A).ready_since == 2.0
    assert pool.view(clock.now).slow_start_s == 10.0
    assert dict(pool.ramping(3.0)) == {A: 2.0}
    clock.now = 20.0
    tracker.request_result(A, False)  # ejected...
    assert pool.state(A).phase == "ejected" and A not in pool.ramping(clock.now)
    clock.now = 30.0
    tracker.probe_result(A, True)  # ...readmitted: it ramps again
    assert pool.state(A).ready_since == 30.0
    assert dict(pool.ramping(35.0)) == {A: 30.0}
    assert dict(pool.ramping(40.0)) == {}  # the window is over


def test_a_ramping_replica_takes_a_growing_share_of_the_in_flight_bound() -> None:
    bound, window = 20, 10.0
    pool, tracker, router, clock = _gateway(bound=bound, window=window)
    _make_ready(pool, tracker, A)  # ready at t=0: ramps from 10 % of the bound
    req = RequestInfo(seq=1, model="m")
    for t in (0.0, 2.5, 5.0, 9.9):
        clock.now = t
        while router.pick(req) is not None:
            pass
        weight = max(SLOW_START_MIN_WEIGHT, t / window)
        assert pool.inflight(A) == math.ceil(weight * bound), t
    clock.now = 10.0  # out of the window: the plain bound
    while router.pick(req) is not None:
        pass
    assert pool.inflight(A) == bound


def test_the_ramp_cap_lets_the_backlog_go_to_the_replica_that_is_fully_up() -> None:
    pool, tracker, router, clock = _gateway(bound=10, window=10.0)
    _make_ready(pool, tracker, A)
    clock.now = 20.0
    _make_ready(pool, tracker, B)  # fresh: at most 1 in flight for now
    picks = [router.pick(RequestInfo(seq=i, model="m")) for i in range(15)]
    chosen = [d.replica for d in picks if d is not None]
    assert chosen.count(B) == 1 and chosen.count(A) == 10
    assert picks[-4:] == [None] * 4  # the rest waits (in the buffer) for capacity


def test_without_a_window_nothing_ramps() -> None:
    pool, tracker, router, clock = _gateway(bound=5, window=0.0)
    _make_ready(pool, tracker, A)
    assert not pool.ramping(clock.now)
    while router.pick(RequestInfo(seq=1, model="m")) is not None:
        pass
    assert pool.inflight(A) == 5
