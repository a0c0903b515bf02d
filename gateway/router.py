"""Router: turns one request into one replica, or None when nothing is routable.

Invariants:

* ``pick`` is synchronous: the pool view, ``policy.choose``, ``pool.acquire`` and
  ``policy.observe(Dispatched)`` happen in one block with no ``await``, so two requests can
  never choose on the same in-flight count.
* Every successful ``pick`` is paired with exactly one ``release`` (the caller does it in a
  ``finally``), which decrements in-flight and tells the policy the request completed.
* Every decision, including "nothing routable", is counted by policy and reason and timed.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable

from gateway.exporter import GatewayMetrics
from gateway.pool import ReplicaPool
from policies.base import Policy
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
    ) -> None:
        self.pool = pool
        self.policy = policy
        self._rng = rng
        self._clock = clock
        self._seq = itertools.count(1)
        self._decisions = metrics.routing_decisions.labels
        self._decision_time = metrics.routing_decision_duration.labels(policy.name)
        pool.add_listener(self._membership_changed)

    @property
    def needs_prefix(self) -> bool:
        return self.policy.needs_prefix

    def next_seq(self) -> int:
        return next(self._seq)

    def pick(self, req: RequestInfo) -> Decision | None:
        view = self.pool.view(self._clock())
        start = time.perf_counter()
        decision = self.policy.choose(view, req, self._rng)
        self._decision_time.observe(time.perf_counter() - start)
        if decision is None:
            self._decisions(self.policy.name, NO_CANDIDATE).inc()
            return None
        self.pool.acquire(decision.replica)
        self.policy.observe(Dispatched(decision.replica, req, view.now))
        self._decisions(self.policy.name, decision.reason).inc()
        return decision

    def release(self, replica: ReplicaId, req: RequestInfo, *, ok: bool) -> None:
        self.pool.release(replica)
        self.policy.observe(Completed(replica, req, self._clock(), ok))

    def _membership_changed(self, members: frozenset[ReplicaId]) -> None:
        self.policy.observe(MembershipChanged(members))
