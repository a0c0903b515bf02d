"""The engine model keeps vLLM V1's scheduling and KV rules; profiles validate their fields.

Everything runs in virtual time: the test drives ``schedule``/``complete`` with a hand-held
clock. Small KV caches force preemption so the rare exact path is exercised as well.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.sim.engine import Engine, SimRequest, Step, TokenEvent
from benchmarks.sim.profiles import PROFILES, Profile, get_profile


def tiny(**overrides: object) -> Profile:
    """10 usable blocks (160 tokens), no jitter: small enough to reason about by hand."""
    base: dict[str, object] = {
        "num_gpu_blocks": 11,
        "max_model_len": 160,
        "max_num_batched_tokens": 256,
        "jitter_cv": 0.0,
    }
    return get_profile("a10g-llama3-8b", **{**base, **overrides})


@dataclass
class Driver:
    """Runs an engine back to back, checking invariants around every step."""

    engine: Engine
    now: float = 0.0
    events: list[TokenEvent] = field(default_factory=list)

    def step(self) -> Step | None:
        step = self.engine.schedule(self.now)
        self.engine.check_invariants()
        if step is None:
            return None
        self.now += step.duration_s
        self.events += self.engine.complete(step, self.now)
        self.engine.check_invariants()
        return step

    def drain(self, max_steps: int = 100_000) -> None:
        for _ in range(max_steps):
            if self.step() is None:
                return
        raise AssertionError("engine did not drain")


def req(
    rid: str, prompt: int, output: int, at: float = 0.0, hashes: tuple[int, ...] = ()
) -> SimRequest:
    return SimRequest(rid, prompt, output, at, hashes)


# --------------------------------------------------------------------- profiles
def test_profiles_exist_and_are_overridable_field_by_field() -> None:
    assert {"a10g-llama3-8b", "h100-llama3-8b", "h100x4-llama3-70b"} <= set(PROFILES)
    p = get_profile("h100-llama3-8b", max_num_seqs=192, enable_prefix_caching=False)
    assert (p.max_num_seqs, p.enable_prefix_caching) == (192, False)
    assert p.per_token_s == PROFILES["h100-llama3-8b"].per_token_s
    assert PROFILES["h100-llama3-8b"].max_num_seqs == 1024  # the registry is not mutated


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("nope", {}, "unknown profile 'nope'"),
        ("a10g-llama3-8b", {"max_num_seq": 3}, "unknown profile field 'max_num_seq'"),
        ("a10g-llama3-8b", {"max_num_seqs": 0}, "'max_num_seqs' must be > 0"),
        ("a10g-llama3-8b", {"max_num_seqs": 2.5}, "'max_num_seqs' must be an int"),
        ("a10g-llama3-8b", {"per_token_s": -1.0}, "'per_token_s' must be >= 0"),
        ("a10g-llama3-8b", {"per_token_s": "fast"}, "'per_token_s' must be a number"),
        ("a10g-llama3-8b", {"enable_prefix_caching": 1}, "'enable_prefix_caching' must be a bool"),
        ("a10g-llama3-8b", {"max_model_len": 10**6}, "'max_model_len' (1000000) exceeds"),
        ("a10g-llama3-8b", {"jitter_cv": 0.9}, "'jitter_cv' must be < 0.5"),
    ],
    ids=["name", "field", "zero", "int", "negative", "type", "bool", "kv-fit", "jitter"],
)
def test_profile_errors_name_the_field(
    name: str, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_profile(name, **overrides)


def test_step_time_has_a_weights_floor_then_a_compute_slope() -> None:
    p = tiny()
    decode_1 = p.step_time(1, 0, 0.0)
    decode_40 = p.step_time(40, 0, 0.0)
    assert decode_40 == decode_1  # memory-bound: 40 decodes cost the same as one
    assert p.step_time(2000, 0, 0.0) == pytest.approx(
        p.step_overhead_s + p.linear_base_s + 2000 * p.per_token_s
    )


# ----------------------------------------------------------------------- engine
def test_a_lone_request_prefills_in_one_step_then_decodes_one_token_per_step() -> None:
    e = Engine(tiny(), random.Random(0))
    e.add_request(req("a", 40, 5), 0.0)
    d = Driver(e)
    first = d.step()
    assert first is not None and first.num_tokens == 40
    assert first.duration_s == pytest.approx(e.profile.step_time(40, 0, 40 * 20))
    d.drain()
    assert [(ev.generated, ev.finished) for ev in d.events] == [
        (1, False), (2, False), (3, False), (4, False), (5, True),
    ]  # fmt: skip
    assert e.stats.request_success == {"length": 1}
    assert e.stats.ttft.count == 1 and e.stats.itl.count == 4 and e.stats.e2e.count == 1


def test_chunked_prefill_splits_a_long_prompt_over_the_token_budget() -> None:
    e = Engine(tiny(max_num_batched_tokens=64, max_model_len=150), random.Random(0))
    e.add_request(req("a", 150 - 1, 1), 0.0)
    d = Driver(e)
    sizes = []
    while (step := d.step()) is not None:
        sizes.append(step.num_tokens)
    assert sizes == [64, 64, 21]
    assert d.events == [TokenEvent("a", 1, True)]


def test_gauges_after_schedule_show_the_scheduled_state() -> None:
    e = Engine(tiny(max_num_seqs=2), random.Random(0))
    for i in range(3):
        e.add_request(req(f"r{i}", 16, 3), 0.0)
    step = e.schedule(0.0)
    assert step is not None
    assert (e.stats.num_running, e.stats.num_waiting) == (2, 1)
    assert e.stats.kv_usage == pytest.approx(2 / 10)  # 2 blocks of 10 usable
    e.complete(step, step.duration_s)
    assert (e.stats.num_running, e.stats.num_waiting) == (2, 1)


def test_preemption_recomputes_the_newest_request_from_the_head_of_waiting() -> None:
    """A and B (4 blocks each) outgrow the 10-block cache while decoding; B, the newest, is
    preempted to the *front* of waiting (ahead of C), nothing is admitted in that step although
    C would now fit, and head-of-line blocking keeps C waiting while B cannot fit."""
    e = Engine(tiny(), random.Random(0))
    e.add_request(req("A", 64, 90), 0.0)
    e.add_request(req("B", 64, 90), 0.0)
    d = Driver(e)
    d.step()
    e.add_request(req("C", 40, 2), d.now)  # 3 blocks: does not fit in the 2 left
    for _ in range(200):
        step = d.step()
        assert step is not None
        if step.num_preempted:
            break
    assert step is not None and step.num_preempted == 1 and e.stats.num_preemptions == 1
    assert e.waiting_ids() == ["B", "C"]
    assert e.running_ids() == ["A"]
    assert e.num_free_blocks >= 3  # C would fit, but a preempting step admits nothing
    resumed = e.generated("B") + 1
    d.step()
    assert e.waiting_ids() == ["B", "C"]  # B (a recompute of 81 tokens) does not fit: C waits
    d.drain()
    b_events = [ev.generated for ev in d.events if ev.request_id == "B"]
    assert b_events == list(range(1, 91))  # the recompute resumes the count; nothing lost
    order = [(ev.request_id, ev.generated) for ev in d.events]
    assert order.index(("B", resumed)) < order.index(("C", 1))  # FCFS from the head


def test_head_of_line_blocking_keeps_a_small_request_behind_a_big_one() -> None:
    e = Engine(tiny(), random.Random(0))
    e.add_request(req("A", 100, 40), 0.0)  # 7 blocks, then grows
    d = Driver(e)
    d.step()
    e.add_request(req("big", 100, 5), d.now)  # needs 7 blocks: only 3 free
    e.add_request(req("small", 10, 5), d.now)  # would fit, but FCFS stops at the head
    d.step()
    assert e.waiting_ids() == ["big", "small"]
    d.drain()
    finish_order = [ev.request_id for ev in d.events if ev.finished]
    assert finish_order == ["A", "big", "small"]


def test_without_chunked_prefill_a_prompt_that_does_not_fit_the_budget_waits_aside() -> None:
    e = Engine(tiny(enable_chunked_prefill=False, max_num_batched_tokens=160), random.Random(0))
    for rid, prompt in (("A", 100), ("big", 100), ("small", 20)):
        e.add_request(req(rid, prompt, 3), 0.0)
    step = e.schedule(0.0)
    assert step is not None and step.num_tokens == 120
    assert e.running_ids() == ["A", "small"] and e.waiting_ids() == ["big"]


def test_abort_frees_kv_wherever_the_request_is_and_emits_nothing_more() -> None:
    e = Engine(tiny(), random.Random(0))
    e.add_request(req("a", 64, 50), 0.0)
    e.add_request(req("b", 32, 50), 0.0)
    d = Driver(e)
    d.step()
    d.step()
    step = e.schedule(d.now)  # both decode in this step
    assert step is not None
    assert e.abort_request("a", d.now)
    events = e.complete(step, d.now + step.duration_s)
    assert [ev.request_id for ev in events] == ["b"]
    assert step.decode_tokens == 1
    assert not e.abort_request("a", d.now)
    e.add_request(req("w", 16, 1), d.now)
    assert e.abort_request("w", d.now) and e.waiting_ids() == []
    assert e.abort_request("b", d.now)
    assert e.num_free_blocks == 10 and e.stats.kv_usage == 0.0
    assert e.stats.request_success == {"abort": 3}
    assert not e.has_work()
    e.check_invariants()


def test_prefill_chunk_of_a_request_aborted_mid_step_is_dropped() -> None:
    e = Engine(tiny(), random.Random(0))
    e.add_request(req("a", 100, 3), 0.0)
    step = e.schedule(0.0)
    assert step is not None and e.abort_request("a", 0.001)
    assert e.complete(step, step.duration_s) == []
    assert e.stats.prompt_tokens == 0 and e.stats.ttft.count == 0
    e.check_invariants()


def test_prefix_cache_hit_shortens_the_prefill_and_idle_cache_counts_as_free() -> None:
    e = Engine(tiny(), random.Random(0))
    shared = (11, 12, 13, 14, 15, 16)  # 96 tokens of common prefix
    e.add_request(req("a", 100, 2, hashes=shared), 0.0)
    d = Driver(e)
    d.drain()
    assert e.stats.kv_usage == 0.0  # a's blocks are cached but idle: free in vLLM's gauge
    e.add_request(req("b", 100, 2, d.now, hashes=shared), d.now)
    step = d.step()
    assert step is not None and step.num_tokens == 100 - 96
    assert e.stats.prefix_cache_hits == 96
    assert e.stats.prefix_cache_queries == 200
    d.drain()


def test_a_whole_prompt_hit_still_recomputes_the_last_token() -> None:
    e = Engine(tiny(), random.Random(0))
    shared = (1, 2, 3, 4)
    d = Driver(e)
    e.add_request(req("a", 64, 1, hashes=shared), 0.0)
    d.drain()
    e.add_request(req("b", 64, 1, d.now, hashes=shared), d.now)
    step = d.step()
    assert step is not None and step.num_tokens == 64 - 48  # only 3 of 4 blocks may hit


def test_a_preempted_request_rehits_its_own_cached_blocks() -> None:
    """B is preempted with 5 full blocks; A evicts one of them (LRU) and then finishes, so B's
    recompute of 81 tokens starts from 4 cached blocks and prefills only 17 tokens."""
    e = Engine(tiny(), random.Random(0))
    e.add_request(req("A", 64, 20), 0.0)
    e.add_request(req("B", 64, 90), 0.0)
    d = Driver(e)
    while e.stats.num_preemptions == 0:
        d.step()
    assert e.waiting_ids() == ["B"] and e.generated("B") == 17
    hits = e.stats.prefix_cache_hits
    while True:
        step = d.step()
        assert step is not None
        if "B" in e.running_ids():
            break
    assert e.stats.prefix_cache_hits - hits == 64
    assert step.num_tokens == 81 - 64
    d.drain()


def test_jitter_is_seeded_and_slow_factor_stretches_steps() -> None:
    def durations(seed: int, slow: float) -> list[float]:
        e = Engine(get_profile("a10g-llama3-8b"), random.Random(seed))
        e.slow_factor = slow
        e.add_request(req("a", 100, 20), 0.0)
        d = Driver(e)
        out = []
        while (s := d.step()) is not None:
            out.append(s.duration_s)
        return out

    assert durations(1, 1.0) == durations(1, 1.0)
    assert durations(1, 1.0) != durations(2, 1.0)
    assert durations(1, 3.0) == pytest.approx([3 * x for x in durations(1, 1.0)])


def test_bad_requests_and_misuse_are_rejected() -> None:
    e = Engine(tiny(), random.Random(0))
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        e.add_request(req("a", 100, 61), 0.0)
    with pytest.raises(ValueError, match="block_hashes"):
        e.add_request(req("a", 20, 1, hashes=(1, 2)), 0.0)
    e.add_request(req("a", 20, 1), 0.0)
    with pytest.raises(ValueError, match="duplicate"):
        e.add_request(req("a", 20, 1), 0.0)
    step = e.schedule(0.0)
    assert step is not None
    with pytest.raises(RuntimeError):
        e.schedule(0.0)
    e.complete(step, 1.0)
    with pytest.raises(RuntimeError):
        e.complete(step, 2.0)
    assert e.schedule(2.0) is None


def _workload(seed: int, n: int, max_len: int) -> list[SimRequest]:
    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(5.0)
        prompt = rng.randint(1, max_len // 2)
        out.append(SimRequest(f"r{i}", prompt, rng.randint(1, max_len - prompt), t))
    return out


def _run(
    profile: Profile, reqs: list[SimRequest], every_token: bool, exact: bool = False
) -> tuple[Engine, Driver]:
    e = Engine(profile, random.Random(3), every_token=every_token, exact_steps=exact)
    d = Driver(e)
    pending = sorted(reqs, key=lambda r: r.arrival_s)
    while pending or e.has_work():
        while pending and (pending[0].arrival_s <= d.now or not e.has_work()):
            r = pending.pop(0)
            d.now = max(d.now, r.arrival_s)
            e.add_request(r, d.now)
        d.step()
    return e, d


def test_sparse_events_give_the_same_run_as_per_token_events() -> None:
    p = get_profile("a10g-llama3-8b", num_gpu_blocks=60, max_model_len=400)
    reqs = _workload(7, 80, 400)
    full, fd = _run(p, reqs, every_token=True)
    sparse, sd = _run(
        p,
        [SimRequest(r.request_id, r.prompt_tokens, r.output_tokens, r.arrival_s) for r in reqs],
        every_token=False,
    )
    assert full.stats.num_preemptions > 0  # the exact path ran too
    assert fd.now == sd.now
    for attr in ("generation_tokens", "prompt_tokens", "num_preemptions", "prefix_cache_hits"):
        assert getattr(full.stats, attr) == getattr(sparse.stats, attr)
    assert full.stats.itl.counts == sparse.stats.itl.counts
    assert [e for e in fd.events if e.finished] == [e for e in sd.events if e.finished]
    assert {e.request_id for e in sd.events if e.generated == 1} == {r.request_id for r in reqs}


def test_the_o1_decode_path_matches_the_exact_walk_step_for_step() -> None:
    p = get_profile("a10g-llama3-8b", num_gpu_blocks=60, max_model_len=400, max_num_seqs=12)
    reqs = _workload(5, 80, 400)
    fast, fd = _run(p, reqs, every_token=True)
    exact, xd = _run(
        p,
        [SimRequest(r.request_id, r.prompt_tokens, r.output_tokens, r.arrival_s) for r in reqs],
        every_token=True,
        exact=True,
    )
    assert fast.stats.num_preemptions > 0
    assert fd.events == xd.events
    assert fd.now == xd.now
    assert fast.stats.itl.counts == exact.stats.itl.counts
    assert fast.stats.iteration_tokens.counts == exact.stats.iteration_tokens.counts


def test_tokens_are_conserved_and_every_request_finishes_under_kv_pressure() -> None:
    p = get_profile("a10g-llama3-8b", num_gpu_blocks=60, max_model_len=400, max_num_seqs=16)
    reqs = _workload(11, 80, 400)
    e, d = _run(p, reqs, every_token=True)
    assert e.stats.num_preemptions > 0
    per_request: dict[str, list[int]] = {}
    for ev in d.events:
        per_request.setdefault(ev.request_id, []).append(ev.generated)
    for r in reqs:
        assert per_request[r.request_id] == list(range(1, r.output_tokens + 1))
    assert e.stats.generation_tokens == sum(r.output_tokens for r in reqs)
    assert e.stats.prompt_tokens == sum(r.prompt_tokens for r in reqs)
    assert sum(e.stats.request_success.values()) == len(reqs)
    assert e.num_free_blocks == 59


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrivals=st.lists(
        st.tuples(
            st.floats(0.0, 0.5),  # gap
            st.integers(1, 120),  # prompt
            st.integers(1, 40),  # output
            st.integers(0, 3),  # shared prefix blocks (from a common chain)
            st.one_of(st.none(), st.integers(0, 30)),  # abort after this many steps
        ),
        min_size=1,
        max_size=25,
    ),
    blocks=st.integers(11, 30),
    budget=st.sampled_from([16, 48, 256]),
)
def test_property_invariants_hold_for_random_arrivals(
    arrivals: list[tuple[float, int, int, int, int | None]], blocks: int, budget: int
) -> None:
    p = get_profile(
        "a10g-llama3-8b",
        num_gpu_blocks=blocks,
        max_model_len=160,
        max_num_batched_tokens=budget,
        max_num_seqs=6,
    )
    e = Engine(p, random.Random(0))
    d = Driver(e)
    chain = (101, 102, 103)
    aborts: dict[int, list[str]] = {}
    t = 0.0
    pending = []
    for i, (gap, prompt, output, shared, abort_after) in enumerate(arrivals):
        t += gap
        hashes = chain[: min(shared, prompt // 16)]
        pending.append(SimRequest(f"r{i}", prompt, output, t, hashes))
        if abort_after is not None:
            aborts.setdefault(abort_after, []).append(f"r{i}")
    aborted: set[str] = set()
    steps = 0
    while pending or e.has_work():
        while pending and (pending[0].arrival_s <= d.now or not e.has_work()):
            r = pending.pop(0)
            d.now = max(d.now, r.arrival_s)
            e.add_request(r, d.now)
        for rid in aborts.pop(steps, []):
            if e.abort_request(rid, d.now):
                aborted.add(rid)
        d.step()
        steps += 1
        assert steps < 20_000
    finished = {ev.request_id for ev in d.events if ev.finished}
    assert finished | aborted == {f"r{i}" for i in range(len(arrivals))}
    assert not finished & aborted
    assert e.num_free_blocks == blocks - 1
    assert sum(e.stats.request_success.values()) == len(arrivals)


def test_the_kv_free_queue_stays_bounded_by_cached_content_not_by_requests_served() -> None:
    # A finished request's own cached run can never be hit again, and the plain runs a hit leaves
    # side by side are joined: the free queue must not grow with the requests served (it once
    # kept ~2 entries per request, up to one per free block: 1,000+ here).
    e = Engine(get_profile("a10g-llama3-8b"), random.Random(0))
    d = Driver(e)
    rng = random.Random(1)
    chain = (7, 8, 9)
    peak = 0
    for i in range(600):
        prompt = rng.randint(20, 100)
        hashes = chain[: prompt // 16] if i % 2 == 0 else ()
        e.add_request(SimRequest(f"r{i}", prompt, rng.randint(5, 20), d.now, hashes), d.now)
        if i % 7 == 3:  # aborted after its prefill
            d.step()
            assert e.abort_request(f"r{i}", d.now)
        d.drain()
        peak = max(peak, e.kv.runs())
    assert e.stats.prefix_cache_hits > 0
    assert peak <= 2 * (len(chain) + 1) + 1 + 2 * 32  # content entries, gaps, compaction slack
    assert e.kv.queued() == e.kv.free == e.kv.usable
