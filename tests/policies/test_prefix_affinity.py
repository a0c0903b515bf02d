"""Prefix affinity, its index and the prompt hashing."""

from __future__ import annotations

import random

import pytest

from policies.hashing import prefix_block_hashes
from policies.prefix_affinity import PrefixAffinity
from policies.prefix_index import PrefixIndex
from policies.types import Dispatched, MembershipChanged, ReplicaId
from tests.policies.states import NOW, replica, request, rid, view

A, B, C = rid(0), rid(1), rid(2)
POOL = view(*(replica(i, queue=0, kv=0.1) for i in range(3)))


def trained(**params: object) -> PrefixAffinity:
    policy = PrefixAffinity(**params)  # type: ignore[arg-type]
    policy.observe(Dispatched(A, request(prefix=(1, 2, 3)), NOW))
    policy.observe(Dispatched(B, request(prefix=(1, 2, 9, 10)), NOW))
    return policy


@pytest.mark.parametrize(
    ("prefix", "inflight", "expected", "reason"),
    [
        ((1, 2, 3, 4), {}, A, "affinity_hit"),
        ((1, 2, 9), {}, B, "affinity_hit"),
        ((1, 2, 3), {A: 16}, A, "affinity_hit"),  # 16 - 0 is not > 16
        ((1, 2, 3), {A: 17}, None, "affinity_overloaded"),  # 17 > 16 and 17 > 1.5 * 0
        ((1, 2, 3), {A: 20, B: 10, C: 10}, A, "affinity_hit"),  # 20 - 10 <= 16
        ((5, 6), {}, None, "affinity_miss"),
        ((), {}, None, "affinity_miss"),
    ],
    ids=[
        "longest_a",
        "longest_b",
        "at_abs_threshold",
        "overloaded",
        "within_abs",
        "miss",
        "no_prefix",
    ],
)
def test_affinity_decisions(
    prefix: tuple[int, ...],
    inflight: dict[ReplicaId, int],
    expected: ReplicaId | None,
    reason: str,
) -> None:
    pool = view(*POOL.replicas, inflight=inflight)
    policy = trained(balance_abs_threshold=16, balance_rel_threshold=1.5)
    d = policy.choose(pool, request(prefix=prefix), random.Random(1))
    assert d is not None
    assert d.reason == reason
    if expected is not None:
        assert d.replica == expected
    if reason == "affinity_overloaded":
        assert d.replica != A


def test_overload_needs_both_absolute_and_relative_excess() -> None:
    # L = 30 against a least-loaded m = 10: 30 - 10 > 16 (absolute excess) but 30 <= 3.5 * 10.
    policy = trained(balance_abs_threshold=16, balance_rel_threshold=3.5)
    pool = view(*POOL.replicas, inflight={A: 30, B: 10, C: 10})
    d = policy.choose(pool, request(prefix=(1, 2, 3)), random.Random(1))
    assert d is not None and (d.replica, d.reason) == (A, "affinity_hit")


def test_matched_replica_that_is_not_a_candidate_is_ignored() -> None:
    policy = trained()
    pool = view(replica(0, queue=0, phase="draining"), *POOL.replicas[1:])
    d = policy.choose(pool, request(prefix=(1, 2, 3)), random.Random(1))
    assert d is not None
    assert (d.replica, d.reason) == (B, "affinity_hit")  # B shares blocks 1, 2


def test_membership_change_purges_departed_replicas() -> None:
    policy = trained()
    policy.observe(MembershipChanged(frozenset({B, C})))
    assert policy.index.replicas() == frozenset({B})
    d = policy.choose(POOL, request(prefix=(1, 2, 3)), random.Random(1))
    assert d is not None and d.replica == B


def test_learns_only_from_observe() -> None:
    policy = PrefixAffinity()
    d = policy.choose(POOL, request(prefix=(4, 5)), random.Random(2))
    assert d is not None and d.reason == "affinity_miss"
    assert policy.index.replicas() == frozenset()
    policy.observe(Dispatched(d.replica, request(prefix=(4, 5)), NOW))
    again = policy.choose(POOL, request(prefix=(4, 5)), random.Random(99))
    assert again is not None and (again.replica, again.reason) == (d.replica, "affinity_hit")


@pytest.mark.parametrize(
    "params",
    [
        {"balance_abs_threshold": -1},
        {"balance_rel_threshold": 0.5},
        {"min_match_blocks": 0},
        {"capacity_blocks": 0},
    ],
    ids=lambda p: next(iter(p)),
)
def test_rejects_bad_parameters(params: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(params))):
        PrefixAffinity(**params)  # type: ignore[arg-type]


class TestPrefixIndex:
    def test_evicts_deepest_blocks_first(self) -> None:
        index = PrefixIndex(capacity_blocks=4)
        index.insert(A, (1, 2, 3))
        index.insert(A, (7, 8, 9))  # 6 blocks for 4 slots: the oldest chain loses its tail
        assert index.size(A) == 4
        assert index.match_lengths((7, 8, 9)) == {A: 3}
        assert index.match_lengths((1, 2, 3)) == {A: 1}

    def test_reinsert_refreshes_recency(self) -> None:
        index = PrefixIndex(capacity_blocks=3)
        index.insert(A, (1, 2))
        index.insert(A, (5,))
        index.insert(A, (1, 2))
        index.insert(A, (6,))  # evicts 5, the least recently used
        assert index.match_lengths((5,)) == {}
        assert index.match_lengths((1, 2)) == {A: 2}

    def test_match_lengths_per_replica(self) -> None:
        index = PrefixIndex(capacity_blocks=10)
        index.insert(A, (1, 2, 3))
        index.insert(B, (1, 2))
        index.insert(C, (2, 3))  # does not start with block 1: no match
        assert index.match_lengths((1, 2, 3, 4)) == {A: 3, B: 2}

    def test_remove_keeps_reverse_map_exact(self) -> None:
        index = PrefixIndex(capacity_blocks=10)
        index.insert(A, (1, 2))
        index.insert(B, (1,))
        index.remove(A)
        assert index.match_lengths((1, 2)) == {B: 1}
        index.retain([])
        assert index.match_lengths((1,)) == {}
        assert index.replicas() == frozenset()


class TestHashing:
    def test_chained_and_stable(self) -> None:
        h = prefix_block_hashes("m", "abcdefgh" * 4, block_chars=8, max_blocks=10)
        assert len(h) == 4
        # The same blocks at different depths hash differently: each hash covers the whole prefix.
        assert len(set(h)) == 4
        # Stable across processes (blake2b, not the salted built-in hash()).
        assert h[0] == 0x9A6D31E414172E39

    def test_shared_prefix_shares_hashes(self) -> None:
        a = prefix_block_hashes("m", "x" * 16 + "tail-a-xx", 8, 10)
        b = prefix_block_hashes("m", "x" * 16 + "tail-b-yy", 8, 10)
        assert a[:2] == b[:2] and a[2] != b[2]

    def test_model_seeds_the_chain(self) -> None:
        assert prefix_block_hashes("m1", "y" * 8, 8, 1) != prefix_block_hashes("m2", "y" * 8, 8, 1)

    def test_bounds(self) -> None:
        assert prefix_block_hashes("m", "short", 8, 10) == ()
        assert len(prefix_block_hashes("m", "z" * 10_000, 8, 3)) == 3
        assert prefix_block_hashes("m", "z" * 80, 8, 0) == ()
        with pytest.raises(ValueError, match="block_chars"):
            prefix_block_hashes("m", "z", 0, 1)
        with pytest.raises(ValueError, match="max_blocks"):
            prefix_block_hashes("m", "z", 1, -1)
