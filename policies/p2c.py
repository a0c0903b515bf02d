"""Power of two choices: sample two distinct candidates, send to the less loaded one.

Algorithm
    Draw two distinct candidates uniformly (``sample_candidates``: O(1) rejection sampling,
    filtered scan only when most replicas are ineligible) and compare them.

    ``p2c`` (the default) compares, when BOTH scrapes are fresh, lexicographically on
      1. the effective queue: scraped waiting + what this gateway dispatched since that scrape
         − what finished (``policies.base.effective_queue``), in requests;
      2. KV-cache usage (ratio 0..1), only when both replicas expose it;
      3. the gateway's in-flight count.
    ``p2c_kv`` (the KubeCon talk's first strategy) compares, when both are fresh and both expose
      KV usage, on KV-cache usage, then in-flight.
    When either replica is unknown or stale (older than ``max_metrics_age_s``), BOTH are
    compared on the gateway's in-flight count alone (reason ``p2c_inflight_fallback``):
    comparing a known queue of 3 with an unknown one read as 0 would send every request to the
    replica whose scrape is failing.

Parameters
    ``staleness_correction: bool = True`` (``p2c`` only). False compares the raw scraped queue
    instead of the effective queue — for the staleness experiment, not for production: between
    two scrapes every request then sees the same numbers and piles onto the same replica.

Tie-breaking
    A full tie keeps the first sample; the two samples are drawn in random order, so ties are
    broken uniformly at random.

Failure modes
    Scraped signals lag by up to one scrape interval plus the engine's own update period; the
    effective-queue correction covers this gateway's share of the lag, not other gateways'.
    p2c never picks the worse of its two samples, but may pick a replica worse than the best
    one in the pool (that is the trade for O(1) cost and no herding).
    One candidate → ``only_candidate``; none → ``None`` (the request waits in the buffer).
"""

from __future__ import annotations

import random
from typing import ClassVar

from policies.base import is_fresh, sample_candidates
from policies.types import Decision, PolicyEvent, PoolView, Reason, ReplicaState, RequestInfo


def pick_of_two(
    view: PoolView, a: ReplicaState, b: ReplicaState, *, staleness_correction: bool = True
) -> tuple[ReplicaState, Reason]:
    """The ``p2c`` comparison of two samples; ``a`` wins ties (callers draw it at random).

    ``is_fresh`` and ``effective_queue`` are inlined: this runs on every request.
    """
    inflight = view.inflight
    ia = inflight.get(a.id, 0)
    ib = inflight.get(b.id, 0)
    qa, qb = a.queue_depth, b.queue_depth
    sa, sb = a.scraped_at, b.scraped_at
    now, max_age = view.now, view.max_metrics_age_s
    if (
        qa is None
        or qb is None
        or sa is None
        or sb is None
        or now - sa > max_age
        or now - sb > max_age
    ):
        return (b if ib < ia else a), "p2c_inflight_fallback"
    if staleness_correction:
        qa += ia - a.inflight_at_scrape
        qb += ib - b.inflight_at_scrape
        qa = qa if qa > 0 else 0
        qb = qb if qb > 0 else 0
    if qa != qb:
        return (a if qa < qb else b), "p2c"
    ka, kb = a.kv_usage, b.kv_usage
    if ka is not None and kb is not None and ka != kb:
        return (a if ka < kb else b), "p2c"
    return (b if ib < ia else a), "p2c"


def pick_of_two_kv(view: PoolView, a: ReplicaState, b: ReplicaState) -> tuple[ReplicaState, Reason]:
    """The ``p2c_kv`` comparison of two samples; ``a`` wins ties."""
    inflight = view.inflight
    ia = inflight.get(a.id, 0)
    ib = inflight.get(b.id, 0)
    ka, kb = a.kv_usage, b.kv_usage
    if ka is None or kb is None or not (is_fresh(view, a) and is_fresh(view, b)):
        return (b if ib < ia else a), "p2c_inflight_fallback"
    if ka != kb:
        return (a if ka < kb else b), "p2c_kv"
    return (b if ib < ia else a), "p2c_kv"


class P2C:
    name: ClassVar[str] = "p2c"
    needs_prefix: ClassVar[bool] = False

    def __init__(self, *, staleness_correction: bool = True) -> None:
        self.staleness_correction = staleness_correction

    def choose(self, view: PoolView, req: RequestInfo, rng: random.Random) -> Decision | None:
        pair = sample_candidates(view, req, rng, 2)
        if len(pair) < 2:
            return Decision(pair[0].id, "only_candidate") if pair else None
        winner, reason = pick_of_two(
            view, pair[0], pair[1], staleness_correction=self.staleness_correction
        )
        return Decision(winner.id, reason)

    def observe(self, event: PolicyEvent) -> None:
        return None


class P2CKv:
    name: ClassVar[str] = "p2c_kv"
    needs_prefix: ClassVar[bool] = False

    def choose(self, view: PoolView, req: RequestInfo, rng: random.Random) -> Decision | None:
        pair = sample_candidates(view, req, rng, 2)
        if len(pair) < 2:
            return Decision(pair[0].id, "only_candidate") if pair else None
        winner, reason = pick_of_two_kv(view, pair[0], pair[1])
        return Decision(winner.id, reason)

    def observe(self, event: PolicyEvent) -> None:
        return None
