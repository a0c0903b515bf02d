"""Router: turns one request into one replica, or None when nothing is routable.

Invariants:

* ``pick`` is synchronous: the pool view, ``policy.choose``, ``pool.acquire`` and
  ``policy.observe(Dispatched)`` happen in one block with no ``await``, so two requests can
  never choose on the same in-flight count.
* Every successful ``pick`` is paired with exactly one ``release`` (the caller does it in a
  ``finally``), which decrements in-flight and tells the policy the request completed.
* Every decision, including "nothing routable", is counted by policy and reason and timed
  (the buffer's re-tries of a waiting request do not count their misses again).
* Every attempt's outcome that says something about the replica (``healthy`` True/False) goes
  to passive health before the in-flight count drops, so an ejection takes effect before the
  capacity signal lets a waiting request in.

Slow start, beyond the policy's weighting (``policies.base.sample_candidates`` lowers a ramping
replica's chance of being drawn, which does nothing when it is the only ready one): when a
``max_inflight_per_replica`` bound is set, a replica inside its slow-start window takes at most
``ceil(weight * bound)`` requests, the weight ramping linearly from 10 % to 100 %. So the first
replica up after a scale from zero takes a growing share of the backlog instead of all of it
at once, and the rest waits in the buffer for it or for the next replica. Enforced here, per
pick, as an extra exclusion over the (usually empty) set of ramping replicas.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable
from dataclasses import replace

from gateway.exporter import CounterChild, GatewayMetrics
from gateway.health import HealthTracker
from gateway.pool import ReplicaPool
from policies.base import SLOW_START_MIN_WEIGHT, Policy
from policies.types import (
    Completed,
    Decision,
    Dispatched,
    MembershipChanged,
    ReplicaId,
    RequestInfo,
)

NO_CANDIDATE = "no_candidate"  # decision-metric reason when choose returns None


class Router:
    def __init__(
        self,
        pool: ReplicaPool,
        policy: Policy,
        *,
        rng: random.Random,
        clock: Callable[[], float],
        metrics: GatewayMetrics,
        health: HealthTracker | None = None,
    ) -> None:
        self.pool = pool
        self.policy = policy
        self._rng = rng
        self._clock = clock
        self._health = health
        sat = pool.saturation
        bound = sat.max_inflight if sat is not None else None
        self._ramp_bound = bound if pool.slow_start_s > 0.0 else None
        self._seq = itertools.count(1)
        # Children by reason, cached: ``labels()`` takes a lock and builds a key (~2 µs) on every
        # call, and this runs on every decision.
        self._decision_family = metrics.routing_decisions
        self._decision_counts: dict[str, CounterChild] = {}
        self._decision_time = metrics.routing_decision_duration.labels(policy.name)
        pool.add_listener(self._membership_changed)

    @property
    def needs_prefix(self) -> bool:
        return self.policy.needs_prefix

    def next_seq(self) -> int:
        return next(self._seq)

    def pick(self, req: RequestInfo, *, count_miss: bool = True) -> Decision | None:
        view = self.pool.view(self._clock())
        start = time.perf_counter()
        asked = req
        if self._ramp_bound is not None:
            full = self._ramp_full(view.now, self._ramp_bound)
            if full:
                asked = replace(req, exclude=req.exclude | full)
        decision = self.policy.choose(view, asked, self._rng)
        self._decision_time.observe(time.perf_counter() - start)
        if decision is None:
            if count_miss:
                self._decided(NO_CANDIDATE).inc()
            return None
        self.pool.acquire(decision.replica)
        self.policy.observe(Dispatched(decision.replica, req, view.now))
        self._decided(decision.reason).inc()
        return decision

    def _decided(self, reason: str) -> CounterChild:
        child = self._decision_counts.get(reason)
        if child is None:
            child = self._decision_counts[reason] = self._decision_family.labels(
                self.policy.name, reason
            )
        return child

    def release(
        self, replica: ReplicaId, req: RequestInfo, *, ok: bool, healthy: bool | None = None
    ) -> None:
        """``healthy``: False when the replica failed the attempt (connection, 5xx), True when
        it answered, None when the attempt says nothing about it (the client left first)."""
        if healthy is not None and self._health is not None:
            self._health.request_result(replica, healthy)
        self.pool.release(replica)
        self.policy.observe(Completed(replica, req, self._clock(), ok))

    def _ramp_full(self, now: float, bound: int) -> frozenset[ReplicaId]:
        ramping = self.pool.ramping(now)
        if not ramping:
            return frozenset()
        window = self.pool.slow_start_s
        return frozenset(
            rid
            for rid, since in ramping.items()
            if self.pool.inflight(rid)
            >= math.ceil(max(SLOW_START_MIN_WEIGHT, (now - since) / window) * bound)
        )

    def _membership_changed(self, members: frozenset[ReplicaId]) -> None:
        self.policy.observe(MembershipChanged(members))
