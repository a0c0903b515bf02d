"""Property tests of the invariants every policy shares (hypothesis, derandomized)."""

from __future__ import annotations

import pickle
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import candidates, effective_queue, is_fresh, sample_candidates
from policies.p2c import P2C
from policies.prefix_affinity import PrefixAffinity
from policies.registry import SIMULATION_POLICY_NAMES, make_policy
from policies.types import (
    Dispatched,
    PoolView,
    ReplicaState,
    RequestInfo,
    Saturation,
)
from tests.policies.states import MODEL, NOW, request, rid, view

PREFIXES = ((1, 2, 3), (1, 2, 4), (7,), ())


@st.composite
def replica_states(draw: st.DrawFn, i: int) -> ReplicaState:
    scraped = draw(st.booleans())
    return ReplicaState(
        id=rid(i),
        models=draw(
            st.sampled_from([frozenset({MODEL}), frozenset({MODEL, "x"}), frozenset({"x"})])
        ),
        phase=draw(st.sampled_from(["ready", "ready", "ready", "starting", "draining", "ejected"])),
        ready_since=draw(st.none() | st.floats(NOW - 20, NOW)),
        queue_depth=draw(st.integers(0, 50)) if scraped else None,
        running=None,
        kv_usage=draw(st.none() | st.floats(0.0, 1.0)) if scraped else None,
        scraped_at=NOW - draw(st.floats(0.0, 3.0)) if scraped else None,
        inflight_at_scrape=draw(st.integers(0, 10)),
    )


@st.composite
def situations(draw: st.DrawFn) -> tuple[PoolView, RequestInfo]:
    n = draw(st.integers(0, 12))
    reps = [draw(replica_states(i)) for i in range(n)]
    inflight = {r.id: draw(st.integers(0, 20)) for r in reps}
    saturation = draw(
        st.none()
        | st.builds(
            Saturation,
            max_inflight=st.none() | st.integers(1, 20),
            max_queue=st.none() | st.integers(1, 40),
            max_kv_usage=st.none() | st.floats(0.1, 1.0),
        )
    )
    ids = [r.id for r in reps]
    exclude = frozenset(draw(st.lists(st.sampled_from(ids), max_size=3))) if ids else frozenset()
    pool = view(
        *reps,
        inflight=inflight,
        saturation=saturation,
        slow_start_s=draw(st.sampled_from([0.0, 10.0])),
    )
    return pool, request(
        seq=draw(st.integers(0, 1000)), exclude=exclude, prefix=draw(st.sampled_from(PREFIXES))
    )


def trained_policy(name: str, pool: PoolView) -> object:
    policy = make_policy(name, simulation=True)
    if isinstance(policy, PrefixAffinity):
        for i, r in enumerate(pool.replicas[:3]):
            policy.observe(Dispatched(r.id, request(prefix=PREFIXES[i % 3]), NOW - 1))
    return policy


@settings(max_examples=100, derandomize=True, deadline=None)
@given(
    situation=situations(),
    seed=st.integers(0, 2**32),
    name=st.sampled_from(SIMULATION_POLICY_NAMES),
)
def test_choice_is_eligible_deterministic_and_pure(
    situation: tuple[PoolView, RequestInfo], seed: int, name: str
) -> None:
    pool, req = situation
    policy = trained_policy(name, pool)
    assert hasattr(policy, "choose")
    eligible = {r.id for r in candidates(pool, req)}
    inflight_before = dict(pool.inflight)
    state_before = pickle.dumps(policy)

    first = policy.choose(pool, req, random.Random(seed))  # type: ignore[attr-defined]
    again = policy.choose(pool, req, random.Random(seed))  # type: ignore[attr-defined]

    assert first == again, "same rng state, same decision"
    assert (first is None) == (not eligible), "None exactly when nothing is eligible"
    if first is not None:
        assert first.replica in eligible
        chosen = next(r for r in pool.replicas if r.id == first.replica)
        assert chosen.phase == "ready" and MODEL in chosen.models
        assert chosen.id not in req.exclude
        if first.reason == "only_candidate":
            assert len(eligible) == 1
    assert pickle.dumps(policy) == state_before, "choose must not change policy state"
    assert dict(pool.inflight) == inflight_before


@settings(max_examples=150, derandomize=True, deadline=None)
@given(situation=situations(), seed=st.integers(0, 2**32), correction=st.booleans())
def test_p2c_never_picks_the_longer_queue_of_its_two_samples(
    situation: tuple[PoolView, RequestInfo], seed: int, correction: bool
) -> None:
    pool, req = situation
    # The same rng state reproduces the two samples choose draws.
    pair = sample_candidates(pool, req, random.Random(seed), 2)
    decision = P2C(staleness_correction=correction).choose(pool, req, random.Random(seed))
    if len(pair) < 2:
        return
    assert decision is not None
    a, b = pair
    assert decision.replica in (a.id, b.id)
    other = b if decision.replica == a.id else a
    chosen = a if other is b else b
    if is_fresh(pool, a) and is_fresh(pool, b):
        if correction:
            assert effective_queue(pool, chosen) <= effective_queue(pool, other)
        else:
            assert chosen.queue_depth is not None and other.queue_depth is not None
            assert chosen.queue_depth <= other.queue_depth
    else:
        assert decision.reason == "p2c_inflight_fallback"
        assert pool.inflight.get(chosen.id, 0) <= pool.inflight.get(other.id, 0)


@settings(max_examples=100, derandomize=True, deadline=None)
@given(situation=situations(), seed=st.integers(0, 2**32), k=st.integers(1, 4))
def test_sample_candidates_distinct_and_eligible(
    situation: tuple[PoolView, RequestInfo], seed: int, k: int
) -> None:
    pool, req = situation
    eligible = {r.id for r in candidates(pool, req)}
    picked = sample_candidates(pool, req, random.Random(seed), k)
    ids = [r.id for r in picked]
    assert len(ids) == len(set(ids)) == min(k, len(eligible))
    assert set(ids) <= eligible
