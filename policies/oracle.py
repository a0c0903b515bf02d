"""Oracle: the best replica by exact, current engine state — a simulation-only upper bound.

SIMULATION ONLY. It is meaningful only when the view's scraped fields are exact and current
(the discrete-event simulator builds such views: ``scraped_at = now``, ``inflight_at_scrape`` =
the live in-flight count), so it measures the limit of immediate dispatch with perfect
information. ``policies.registry`` refuses it unless ``simulation=True``; a live gateway with
stale scrapes would just get a herding least-queue scan.

Algorithm
    Full scan of the candidates, minimising lexicographically
      (unknown-or-stale last, effective queue, KV-cache usage (unknown last), in-flight).

Parameters
    None.

Tie-breaking
    Uniform among exact ties, by reservoir sampling.

Failure modes
    O(n) per decision. With stale state it herds: every request until the next scrape sees
    the same minimum (the effective-queue correction only covers this gateway's dispatches).
"""

from __future__ import annotations

import math
import random
from typing import ClassVar

from policies.base import effective_queue, is_candidate, is_fresh
from policies.types import Decision, PolicyEvent, PoolView, ReplicaState, RequestInfo


class Oracle:
    name: ClassVar[str] = "oracle"
    needs_prefix: ClassVar[bool] = False
    simulation_only: ClassVar[bool] = True

    def choose(self, view: PoolView, req: RequestInfo, rng: random.Random) -> Decision | None:
        inflight = view.inflight
        best: ReplicaState | None = None
        best_key: tuple[int, int, float, int] = (0, 0, 0.0, 0)
        ties = 0
        count = 0
        for r in view.replicas:
            if not is_candidate(view, req, r):
                continue
            count += 1
            load = inflight.get(r.id, 0)
            if is_fresh(view, r):
                kv = math.inf if r.kv_usage is None else r.kv_usage
                key = (0, effective_queue(view, r), kv, load)
            else:
                key = (1, 0, math.inf, load)
            if best is None or key < best_key:
                best, best_key, ties = r, key, 1
            elif key == best_key:
                ties += 1
                if rng.random() * ties < 1.0:
                    best = r
        if best is None:
            return None
        return Decision(best.id, "only_candidate" if count == 1 else "oracle")

    def observe(self, event: PolicyEvent) -> None:
        return None
