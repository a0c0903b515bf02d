"""Table-driven policy decisions from hand-built states."""

from __future__ import annotations

import random

import pytest

from policies.base import Policy
from policies.least_request import LeastRequest
from policies.oracle import Oracle
from policies.p2c import P2C, P2CKv
from policies.random_choice import RandomChoice
from policies.round_robin import RoundRobin
from policies.types import Decision, PoolView, RequestInfo, Saturation
from tests.policies.states import replica, request, rid, view

Case = tuple[Policy, PoolView, RequestInfo, Decision | None]


def d(i: int, reason: str) -> Decision:
    return Decision(rid(i), reason)  # type: ignore[arg-type]


# Two replicas: p2c always samples both (in random order), so the outcome is deterministic
# unless the comparison ties.
P2C_CASES: dict[str, Case] = {
    "shorter_queue_wins": (
        P2C(),
        view(replica(0, queue=5), replica(1, queue=1)),
        request(),
        d(1, "p2c"),
    ),
    "kv_breaks_queue_tie": (
        P2C(),
        view(replica(0, queue=2, kv=0.9), replica(1, queue=2, kv=0.2)),
        request(),
        d(1, "p2c"),
    ),
    "kv_unknown_on_one_side_falls_to_inflight": (
        P2C(),
        view(replica(0, queue=2, kv=0.1), replica(1, queue=2), inflight={rid(0): 3, rid(1): 1}),
        request(),
        d(1, "p2c"),
    ),
    "dispatched_since_scrape_counts": (
        P2C(),
        view(replica(0, queue=0), replica(1, queue=3), inflight={rid(0): 10}),
        request(),
        d(1, "p2c"),
    ),
    "completions_since_scrape_count": (
        P2C(),
        view(
            replica(0, queue=5, inflight_at_scrape=5),
            replica(1, queue=1),
            inflight={rid(0): 0},
        ),
        request(),
        d(0, "p2c"),
    ),
    "no_staleness_correction_uses_raw_queue": (
        P2C(staleness_correction=False),
        view(replica(0, queue=0), replica(1, queue=3), inflight={rid(0): 10}),
        request(),
        d(0, "p2c"),
    ),
    "stale_one_compares_both_on_inflight": (
        P2C(),
        view(replica(0, queue=9, age=5.0), replica(1, queue=0), inflight={rid(0): 1, rid(1): 4}),
        request(),
        d(0, "p2c_inflight_fallback"),
    ),
    "never_scraped_is_unknown_not_zero": (
        P2C(),
        view(replica(0, queue=0), replica(1), inflight={rid(0): 2, rid(1): 5}),
        request(),
        d(0, "p2c_inflight_fallback"),
    ),
    "draining_is_skipped": (
        P2C(),
        view(replica(0, queue=9), replica(1, queue=0, phase="draining")),
        request(),
        d(0, "only_candidate"),
    ),
    "starting_and_ejected_are_skipped": (
        P2C(),
        view(replica(0, phase="starting"), replica(1, phase="ejected"), replica(2, queue=4)),
        request(),
        d(2, "only_candidate"),
    ),
    "excluded_is_skipped": (
        P2C(),
        view(replica(0, queue=9), replica(1, queue=0)),
        request(exclude=frozenset({rid(1)})),
        d(0, "only_candidate"),
    ),
    "wrong_model_is_skipped": (
        P2C(),
        view(replica(0, queue=9), replica(1, queue=0, models=frozenset({"other"}))),
        request(),
        d(0, "only_candidate"),
    ),
    "saturated_inflight_is_skipped": (
        P2C(),
        view(
            replica(0, queue=0),
            replica(1, queue=9),
            inflight={rid(0): 4},
            saturation=Saturation(max_inflight=4),
        ),
        request(),
        d(1, "only_candidate"),
    ),
    "saturated_kv_is_skipped_when_fresh": (
        P2C(),
        view(
            replica(0, queue=0, kv=0.95),
            replica(1, queue=9, kv=0.1),
            saturation=Saturation(max_kv_usage=0.9),
        ),
        request(),
        d(1, "only_candidate"),
    ),
    "stale_kv_does_not_saturate": (
        P2C(),
        view(
            replica(0, queue=0, kv=0.95, age=5.0),
            replica(1, queue=9, kv=0.1),
            inflight={rid(1): 1},
            saturation=Saturation(max_kv_usage=0.9),
        ),
        request(),
        d(0, "p2c_inflight_fallback"),
    ),
    "nothing_eligible_is_none": (
        P2C(),
        view(replica(0, phase="draining"), replica(1, models=frozenset({"other"}))),
        request(),
        None,
    ),
    "empty_pool_is_none": (P2C(), view(), request(), None),
    "kv_lower_wins_despite_longer_queue": (
        P2CKv(),
        view(replica(0, queue=9, kv=0.1), replica(1, queue=0, kv=0.5)),
        request(),
        d(0, "p2c_kv"),
    ),
    "kv_tie_goes_to_fewer_inflight": (
        P2CKv(),
        view(replica(0, queue=0, kv=0.3), replica(1, queue=0, kv=0.3), inflight={rid(0): 2}),
        request(),
        d(1, "p2c_kv"),
    ),
    "kv_not_exposed_falls_back": (
        P2CKv(),
        view(replica(0, queue=0), replica(1, queue=0), inflight={rid(0): 2}),
        request(),
        d(1, "p2c_inflight_fallback"),
    ),
    "kv_stale_falls_back": (
        P2CKv(),
        view(
            replica(0, queue=0, kv=0.0, age=3.0), replica(1, queue=0, kv=0.5), inflight={rid(0): 2}
        ),
        request(),
        d(1, "p2c_inflight_fallback"),
    ),
}

FIVE = (
    replica(0, queue=4, kv=0.5),
    replica(1, queue=2, kv=0.6),
    replica(2, queue=2, kv=0.3),
    replica(3, queue=0, age=9.0),  # stale: an oracle must not trust it
    replica(4, phase="draining", queue=0),
)
SCAN_CASES: dict[str, Case] = {
    "least_request_min_inflight": (
        LeastRequest(),
        view(*FIVE, inflight={rid(0): 3, rid(1): 1, rid(2): 2, rid(3): 4}),
        request(),
        d(1, "least_request"),
    ),
    "least_request_single": (LeastRequest(), view(replica(7)), request(), d(7, "only_candidate")),
    "oracle_least_queue_then_kv": (Oracle(), view(*FIVE), request(), d(2, "oracle")),
    "oracle_effective_queue": (
        Oracle(),
        view(*FIVE, inflight={rid(2): 3}),
        request(),
        d(1, "oracle"),
    ),
    "round_robin_seq_0": (RoundRobin(), view(*FIVE), request(seq=0), d(0, "round_robin")),
    "round_robin_seq_5_skips_draining": (
        RoundRobin(),
        view(*FIVE),
        request(seq=5),
        d(1, "round_robin"),
    ),
    "round_robin_none": (RoundRobin(), view(FIVE[4]), request(), None),
    "random_single": (RandomChoice(), view(*FIVE[3:]), request(), d(3, "random")),
    "random_none": (RandomChoice(), view(FIVE[4]), request(), None),
}


@pytest.mark.parametrize(
    ("policy", "pool", "req", "expected"), P2C_CASES.values(), ids=P2C_CASES.keys()
)
def test_p2c_decisions(
    policy: Policy, pool: PoolView, req: RequestInfo, expected: Decision | None
) -> None:
    for seed in range(8):  # the sample order must not matter in these cases
        assert policy.choose(pool, req, random.Random(seed)) == expected


@pytest.mark.parametrize(
    ("policy", "pool", "req", "expected"), SCAN_CASES.values(), ids=SCAN_CASES.keys()
)
def test_scan_policy_decisions(
    policy: Policy, pool: PoolView, req: RequestInfo, expected: Decision | None
) -> None:
    assert policy.choose(pool, req, random.Random(0)) == expected
