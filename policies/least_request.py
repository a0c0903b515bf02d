"""Least request: the candidate with the fewest requests this gateway has in flight to it.

Algorithm
    Full scan of the candidates on ``view.inflight`` (exact and gateway-local; no scraped signal
    is used, so it works for every engine and never goes stale).

Parameters
    None.

Tie-breaking
    Uniform among all replicas sharing the minimum, by reservoir sampling during the scan (as
    Envoy does): the k-th tied replica replaces the current pick with probability 1/k. Without
    this, an idle pool would send every request to the first replica in id order.

Failure modes
    O(n) per decision. Blind to load from other gateway replicas and to request size: with
    several gateway instances each sees only its own share of the in-flight work.
"""

from __future__ import annotations

import random
from typing import ClassVar

from policies.base import is_saturated
from policies.types import Decision, PolicyEvent, PoolView, ReplicaState, RequestInfo


class LeastRequest:
    name: ClassVar[str] = "least_request"
    needs_prefix: ClassVar[bool] = False

    def choose(self, view: PoolView, req: RequestInfo, rng: random.Random) -> Decision | None:
        inflight = view.inflight
        model, exclude, saturation = req.model, req.exclude, view.saturation
        best: ReplicaState | None = None
        best_load = 0
        ties = 0
        count = 0
        for r in view.replicas:  # is_candidate, inlined: this loop is O(n) per request
            if r.phase != "ready" or model not in r.models or (exclude and r.id in exclude):
                continue
            if saturation is not None and is_saturated(view, r):
                continue
            count += 1
            load = inflight.get(r.id, 0)
            if best is None or load < best_load:
                best, best_load, ties = r, load, 1
            elif load == best_load:
                ties += 1
                if rng.random() * ties < 1.0:
                    best = r
        if best is None:
            return None
        return Decision(best.id, "only_candidate" if count == 1 else "least_request")

    def observe(self, event: PolicyEvent) -> None:
        return None
