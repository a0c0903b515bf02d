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
    model, exclude, sat = req.model, req.exclude, view.saturation
    return [
        r
        for r in view.replicas
        if r.phase == "ready"
        and model in r.models
        and r.id not in exclude
        and (sat is None or not is_saturated(view, r))
    ]


def is_candidate(view: PoolView, req: RequestInfo, r: ReplicaState) -> bool:
    """The per-replica test behind ``candidates``: O(1), for policies that sample first."""
    return (
        r.phase == "ready"
        and req.model in r.models
        and r.id not in req.exclude
        and not is_saturated(view, r)
    )


# Envoy's slow-start floor (min_weight_percent default 10%): a replica that just became ready
# still gets some traffic, so its queue signal becomes meaningful without a thundering herd.
SLOW_START_MIN_WEIGHT = 0.1

# Rejection-sampling budget per pick before ``sample_candidates`` falls back to a full scan.
# With a fraction p of eligible replicas the scan runs with probability (1 - p) ** 8 per pick:
# under 0.4% at p = 0.5, so the common case stays O(1) while a mostly-ineligible pool (one
# model served by 2 of 1024 replicas) degrades to O(n), never to a wrong answer.
SAMPLE_ATTEMPTS = 8


def slow_start_weight(view: PoolView, r: ReplicaState) -> float:
    """Relative weight in (0, 1] of a replica still inside its slow-start ramp; 1 outside it.

    Linear ramp (Envoy with aggression 1.0) from ``SLOW_START_MIN_WEIGHT`` to 1 over
    ``view.slow_start_s`` seconds after ``ready_since``.
    """
    window = view.slow_start_s
    if window <= 0.0 or r.ready_since is None:
        return 1.0
    elapsed = view.now - r.ready_since
    if elapsed >= window:
        return 1.0
    return max(SLOW_START_MIN_WEIGHT, elapsed / window)


def sample_candidates(
    view: PoolView, req: RequestInfo, rng: random.Random, k: int
) -> list[ReplicaState]:
    """Up to ``k`` distinct candidates, drawn without replacement, weighted by slow start.

    Equivalent in distribution to filtering ``candidates(view, req)`` and sampling from the result,
    but O(k) in the common case: draw a uniform index, accept it if eligible (and, inside a
    slow-start ramp, with probability equal to its weight), and only after ``SAMPLE_ATTEMPTS``
    rejections per pick scan the replicas. Both branches pick from the same conditional
    distribution, so mixing them does not bias the result. Fewer than ``k`` results means fewer
    than ``k`` candidates exist; an empty list means none.
    """
    reps = view.replicas
    n = len(reps)
    if n == 0 or k <= 0:
        return []
    # is_candidate, inlined: this loop is the whole cost of a p2c decision.
    rand = rng.random
    model = req.model
    exclude = req.exclude
    saturation = view.saturation
    ramp = view.slow_start_s > 0.0
    taken: list[int] = []
    for _ in range(SAMPLE_ATTEMPTS * k):
        i = int(rand() * n)
        r = reps[i]
        if r.phase != "ready" or model not in r.models or (exclude and r.id in exclude):
            continue
        if i in taken or (saturation is not None and is_saturated(view, r)):
            continue
        if ramp and r.ready_since is not None:
            w = slow_start_weight(view, r)
            if w < 1.0 and rand() >= w:
                continue
        taken.append(i)
        if len(taken) == k:
            return [reps[j] for j in taken]
    return _scan_rest(view, req, rng, k, taken)


def _scan_rest(
    view: PoolView, req: RequestInfo, rng: random.Random, k: int, taken: list[int]
) -> list[ReplicaState]:
    reps = view.replicas
    picked = [reps[j] for j in taken]
    rest = [r for j, r in enumerate(reps) if j not in taken and is_candidate(view, req, r)]
    weights = [slow_start_weight(view, r) for r in rest] if view.slow_start_s > 0.0 else None
    while rest and len(picked) < k:
        if weights is None:
            i = int(rng.random() * len(rest))
        else:
            x = rng.random() * sum(weights)
            i = 0
            while i < len(rest) - 1 and x >= weights[i]:
                x -= weights[i]
                i += 1
            weights.pop(i)
        picked.append(rest.pop(i))
    return picked
