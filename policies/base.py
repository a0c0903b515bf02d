"""The policy contract and the rules every policy shares.

``choose`` is a query: synchronous, no I/O, no logging, no metric writes, no change to the
policy's own state, deterministic given (view, request, rng state, policy state). ``observe`` is
the only place a policy learns. ``None`` from ``choose`` means nothing is routable right now: the
request waits in the gateway's buffer until capacity appears.

Shared rules:

* Candidates are replicas in phase ``ready`` that serve the model, are not excluded by an earlier
  failed attempt, and are not saturated (``PoolView.saturation``).
* A scrape is fresh when it exists and is at most ``max_metrics_age_s`` old. When either replica
  in a comparison is not fresh, both are compared on the gateway's own in-flight count: comparing
  a known queue with an unknown one would send everything to the replica whose scrape failed.
* The effective queue corrects the scraped (always late) queue with what this gateway has
  dispatched since that scrape minus what has finished: ``waiting + inflight - inflight_at_scrape``,
  floored at zero.
"""

from __future__ import annotations

import random
from typing import ClassVar, Protocol

from policies.types import Decision, PolicyEvent, PoolView, ReplicaState, RequestInfo


class Policy(Protocol):
    name: ClassVar[str]  # canonical config name, e.g. "p2c"
    needs_prefix: ClassVar[bool]  # whether RequestInfo.prefix_hashes must be computed

    def choose(self, view: PoolView, req: RequestInfo, rng: random.Random) -> Decision | None:
        """The replica to send ``req`` to, or None when no replica is routable."""
        ...

    def observe(self, event: PolicyEvent) -> None:
        """Learn from a dispatch, a completion or a membership change. May be a no-op."""
        ...


def is_fresh(view: PoolView, r: ReplicaState) -> bool:
    """True when r's scraped queue depth is known and no older than max_metrics_age_s."""
    return (
        r.scraped_at is not None
        and r.queue_depth is not None
        and view.now - r.scraped_at <= view.max_metrics_age_s
    )


def effective_queue(view: PoolView, r: ReplicaState) -> int:
    """Scraped waiting plus what this gateway dispatched since that scrape, minus completions."""
    assert r.queue_depth is not None
    return max(0, r.queue_depth + view.inflight.get(r.id, 0) - r.inflight_at_scrape)


def is_saturated(view: PoolView, r: ReplicaState) -> bool:
    sat = view.saturation
    if sat is None:
        return False
    if sat.max_inflight is not None and view.inflight.get(r.id, 0) >= sat.max_inflight:
        return True
    if (sat.max_queue is not None or sat.max_kv_usage is not None) and is_fresh(view, r):
        if sat.max_queue is not None and effective_queue(view, r) >= sat.max_queue:
            return True
        if sat.max_kv_usage is not None and r.kv_usage is not None:
            return r.kv_usage >= sat.max_kv_usage
    return False


def candidates(view: PoolView, req: RequestInfo) -> list[ReplicaState]:
    """Replicas that may take ``req`` now, in the view's (id-sorted) order."""
    return [
        r
        for r in view.replicas
        if r.phase == "ready"
        and req.model in r.models
        and r.id not in req.exclude
        and not is_saturated(view, r)
    ]
