"""Round robin: what a Kubernetes Service (kube-proxy) gives you — the baseline to beat.

Algorithm
    Take the candidates (ready, serving the model, not excluded, not saturated) in the view's
    id-sorted order and pick ``candidates[req.seq % n]``. ``req.seq`` is gateway-assigned and
    strictly increasing, so the rotation needs no state of its own: ``choose`` stays a pure
    query and ``observe`` is a no-op.

Parameters
    None.

Tie-breaking
    Not applicable: the choice is a deterministic function of ``req.seq`` and the candidate set.

Failure modes
    Load-blind by design: a slow or overloaded replica gets exactly its 1/n share, which is what
    the routing experiments measure against. When the candidate set changes between requests
    the rotation shifts (some replicas may get two in a row); over many requests the shares
    stay equal. O(n) per decision (builds the candidate list); fine for a baseline.
"""

from __future__ import annotations

import random
from typing import ClassVar

from policies.base import candidates
from policies.types import Decision, PolicyEvent, PoolView, RequestInfo


class RoundRobin:
    name: ClassVar[str] = "round_robin"
    needs_prefix: ClassVar[bool] = False

    def choose(self, view: PoolView, req: RequestInfo, rng: random.Random) -> Decision | None:
        cands = candidates(view, req)
        if not cands:
            return None
        if len(cands) == 1:
            return Decision(cands[0].id, "only_candidate")
        return Decision(cands[req.seq % len(cands)].id, "round_robin")

    def observe(self, event: PolicyEvent) -> None:
        return None
