"""Seeded distribution tests.

Tolerance: with N draws of a category of probability p, the count is Binomial(N, p) with
standard deviation sqrt(N p (1 - p)). Each bound below is 5 standard deviations, so a correct
implementation fails for a given seed with probability < 6e-7 per category; the seeds are fixed
anyway, so the tests are deterministic, and the bound is what lets the seed change safely.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from policies.base import sample_candidates
from policies.least_request import LeastRequest
from policies.p2c import P2C
from policies.random_choice import RandomChoice
from policies.round_robin import RoundRobin
from policies.types import PoolView, ReplicaId
from tests.policies.states import NOW, replica, request, rid, view


def tolerance(n: int, p: float) -> float:
    return 5 * math.sqrt(n * p * (1 - p))


def shares(policy: object, pool: PoolView, n: int, seed: int = 7) -> Counter[ReplicaId]:
    rng = random.Random(seed)
    counts: Counter[ReplicaId] = Counter()
    for seq in range(n):
        d = policy.choose(pool, request(seq), rng)  # type: ignore[attr-defined]
        assert d is not None
        counts[d.replica] += 1
    return counts


EQUAL = view(*(replica(i, queue=1, kv=0.5) for i in range(4)), replica(9, phase="draining"))


@pytest.mark.parametrize(
    "policy", [RandomChoice(), P2C(), LeastRequest(), RoundRobin()], ids=lambda p: p.name
)
def test_equal_replicas_share_equally(policy: object) -> None:
    n = 4000
    counts = shares(policy, EQUAL, n)
    assert set(counts) == {rid(i) for i in range(4)}
    for i in range(4):
        assert abs(counts[rid(i)] - n / 4) <= tolerance(n, 0.25), counts


def test_round_robin_is_exact() -> None:
    counts = shares(RoundRobin(), EQUAL, 400)
    assert set(counts.values()) == {100}


def test_least_request_ties_are_fair_among_the_minimum() -> None:
    pool = view(
        *(replica(i) for i in range(5)),
        inflight={rid(0): 0, rid(1): 2, rid(2): 0, rid(3): 0, rid(4): 1},
    )
    n = 3000
    counts = shares(LeastRequest(), pool, n)
    assert set(counts) == {rid(0), rid(2), rid(3)}
    for i in (0, 2, 3):
        assert abs(counts[rid(i)] - n / 3) <= tolerance(n, 1 / 3), counts


def test_slow_start_weights_a_fresh_replica() -> None:
    # r3 became ready 2.5 s into a 10 s ramp: weight 0.25 against 1.0 for the others. With
    # equal queues p2c keeps its first sample, which is drawn in proportion to weight.
    pool = view(
        *(replica(i, queue=0, kv=0.1) for i in range(3)),
        replica(3, queue=0, kv=0.1, ready_since=NOW - 2.5),
        slow_start_s=10.0,
    )
    n = 8000
    p = 0.25 / 3.25
    counts = shares(P2C(), pool, n)
    assert abs(counts[rid(3)] - n * p) <= tolerance(n, p), counts


@pytest.mark.parametrize(("eligible", "total"), [(3, 100), (10, 40), (30, 32)])
def test_sample_pairs_are_uniform_with_or_without_the_scan_fallback(
    eligible: int, total: int
) -> None:
    # Few eligible replicas force the filtered-scan fallback, many keep rejection sampling;
    # both must give every ordered pair the same probability.
    pool = view(*(replica(i, phase="ready" if i < eligible else "draining") for i in range(total)))
    rng = random.Random(3)
    n = 6000
    first: Counter[ReplicaId] = Counter()
    second: Counter[ReplicaId] = Counter()
    for _ in range(n):
        a, b = sample_candidates(pool, request(), rng, 2)
        first[a.id] += 1
        second[b.id] += 1
    p = 1 / eligible
    for counts in (first, second):
        assert len(counts) == eligible
        assert all(abs(c - n * p) <= tolerance(n, p) for c in counts.values()), counts


def test_p2c_sends_less_to_the_loaded_replica() -> None:
    # Samples are always two distinct replicas, so the one with the deep queue loses every
    # comparison it takes part in and gets nothing.
    pool = view(replica(0, queue=30), *(replica(i, queue=1) for i in range(1, 4)))
    counts = shares(P2C(), pool, 2000)
    assert counts[rid(0)] == 0
