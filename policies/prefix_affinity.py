"""Prefix affinity: send a prompt where its prefix is probably cached, unless that replica is
overloaded relative to the others; otherwise power of two choices.

Algorithm
    1. Look up the request's chained prefix-block hashes (``RequestInfo.prefix_hashes``) in the
       ``PrefixIndex`` of what this gateway dispatched where.
    2. Among candidates holding at least ``min_match_blocks`` leading blocks, take the longest
       match.
    3. Imbalance guard (sglang's cache_aware): with L = that replica's gateway in-flight count
       and m = the minimum in-flight count over all candidates, the replica is overloaded when
       ``L - m > balance_abs_threshold`` AND ``L > balance_rel_threshold * m``. Overloaded →
       p2c among all candidates (``affinity_overloaded``).
    4. No match (or no prefix hashes) → p2c (``affinity_miss``).
    ``observe(Dispatched)`` records the request's blocks for the chosen replica — whatever the
    reason, since the replica that got the request caches its prefix. ``MembershipChanged``
    purges replicas that left. ``choose`` never touches the index.

Parameters
    ``capacity_blocks: int = 2048`` — blocks remembered per replica (LRU); size it near the
      engine's KV capacity in blocks of ``block_chars`` characters.
    ``balance_abs_threshold: int = 16`` — requests of in-flight excess tolerated for affinity.
    ``balance_rel_threshold: float = 1.5`` — ratio of in-flight to the least loaded tolerated.
    ``min_match_blocks: int = 1`` — shortest match worth routing for.
    ``staleness_correction: bool = True`` — passed to the p2c fallback.

Tie-breaking
    Equal match lengths: fewer in-flight, then uniformly at random (reservoir sampling).

Failure modes
    The index is what *this* gateway sent, not what the engine holds: an engine that evicted a
    prefix (KV pressure) or another gateway instance routing the same prompts make it wrong,
    costing one cache miss, not correctness. O(n) per decision for the guard's minimum, plus
    O(blocks × holders) for the lookup. Memory: at most ``capacity_blocks`` entries per replica.
"""

from __future__ import annotations

import random
from typing import ClassVar

from policies.base import is_saturated
from policies.p2c import P2C
from policies.prefix_index import PrefixIndex
from policies.types import (
    Decision,
    Dispatched,
    MembershipChanged,
    PolicyEvent,
    PoolView,
    Reason,
    ReplicaState,
    RequestInfo,
)


class PrefixAffinity:
    name: ClassVar[str] = "prefix_affinity"
    needs_prefix: ClassVar[bool] = True

    def __init__(
        self,
        *,
        capacity_blocks: int = 2048,
        balance_abs_threshold: int = 16,
        balance_rel_threshold: float = 1.5,
        min_match_blocks: int = 1,
        staleness_correction: bool = True,
    ) -> None:
        if balance_abs_threshold < 0:
            raise ValueError(f"balance_abs_threshold must be >= 0, got {balance_abs_threshold}")
        if balance_rel_threshold < 1.0:
            raise ValueError(f"balance_rel_threshold must be >= 1, got {balance_rel_threshold}")
        if min_match_blocks < 1:
            raise ValueError(f"min_match_blocks must be >= 1, got {min_match_blocks}")
        self.index = PrefixIndex(capacity_blocks)
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.min_match_blocks = min_match_blocks
        self._p2c = P2C(staleness_correction=staleness_correction)

    def choose(self, view: PoolView, req: RequestInfo, rng: random.Random) -> Decision | None:
        if not req.prefix_hashes:
            return self._fallback(view, req, rng, "affinity_miss")
        lengths = self.index.match_lengths(req.prefix_hashes)
        if not lengths:
            return self._fallback(view, req, rng, "affinity_miss")
        inflight = view.inflight
        model, exclude, saturation = req.model, req.exclude, view.saturation
        min_match = self.min_match_blocks
        best: ReplicaState | None = None
        best_key = (0, 0)
        ties = 0
        least: int | None = None
        # One pass for both the least-loaded candidate (the guard's reference) and the best
        # match; is_candidate is inlined because this loop is O(n) per request.
        for r in view.replicas:
            if r.phase != "ready" or model not in r.models or (exclude and r.id in exclude):
                continue
            if saturation is not None and is_saturated(view, r):
                continue
            load = inflight.get(r.id, 0)
            if least is None or load < least:
                least = load
            matched = lengths.get(r.id, 0)
            if matched < min_match:
                continue
            key = (-matched, load)
            if best is None or key < best_key:
                best, best_key, ties = r, key, 1
            elif key == best_key:
                ties += 1
                if rng.random() * ties < 1.0:
                    best = r
        if best is None or least is None:
            return self._fallback(view, req, rng, "affinity_miss")
        load = best_key[1]
        if load - least > self.balance_abs_threshold and load > self.balance_rel_threshold * least:
            return self._fallback(view, req, rng, "affinity_overloaded")
        return Decision(best.id, "affinity_hit")

    def observe(self, event: PolicyEvent) -> None:
        if isinstance(event, Dispatched):
            self.index.insert(event.replica, event.request.prefix_hashes)
        elif isinstance(event, MembershipChanged):
            self.index.retain(event.replicas)

    def _fallback(
        self, view: PoolView, req: RequestInfo, rng: random.Random, reason: Reason
    ) -> Decision | None:
        d = self._p2c.choose(view, req, rng)
        if d is None or d.reason == "only_candidate":
            return d
        return Decision(d.replica, reason)
