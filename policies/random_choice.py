"""Random: one candidate drawn uniformly (weighted down inside a slow-start ramp).

Algorithm
    ``sample_candidates(view, req, rng, 1)``: a uniform index accepted when eligible, with a
    bounded number of rejections before a filtered scan, so the common case is O(1).

Parameters
    None.

Tie-breaking
    Not applicable.

Failure modes
    Load-blind: statistically like round robin, with binomial noise on top (a replica can get
    several requests in a row). Useful as the zero-information baseline for p2c.
"""

from __future__ import annotations

import random
from typing import ClassVar

from policies.base import sample_candidates
from policies.types import Decision, PolicyEvent, PoolView, RequestInfo


class RandomChoice:
    name: ClassVar[str] = "random"
    needs_prefix: ClassVar[bool] = False

    def choose(self, view: PoolView, req: RequestInfo, rng: random.Random) -> Decision | None:
        picked = sample_candidates(view, req, rng, 1)
        if not picked:
            return None
        return Decision(picked[0].id, "random")

    def observe(self, event: PolicyEvent) -> None:
        return None
