"""The virtual-time driver routes, times and records requests deterministically."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from benchmarks.sim.engine import Engine, SimRequest
from benchmarks.sim.profiles import get_profile
from benchmarks.sim.virtual import (
    RequestRecord,
    VirtualCluster,
    openorca_lengths,
    percentile,
    poisson_arrivals,
    weighted_percentile,
)


def cluster(n: int = 2, seed: int = 0, **kw: object) -> VirtualCluster:
    p = get_profile("a10g-llama3-8b")
    engines = [Engine(p, random.Random(f"{seed}/{i}")) for i in range(n)]
    turn = iter(range(10**9))
    return VirtualCluster(engines, lambda r, t: next(turn) % n, **kw)  # type: ignore[arg-type]


def test_requests_are_routed_served_and_timed() -> None:
    c = cluster()
    reqs = list(poisson_arrivals(2.0, 30.0, random.Random(1)))
    c.submit_all(reqs)
    c.run(400.0)
    assert len(c.records) == len(reqs) > 30
    assert {r.replica for r in c.records.values()} == {0, 1}
    p = c.engines[0].profile
    for rec in c.records.values():
        assert rec.finish_s is not None and rec.ttft_s is not None and rec.e2e_s is not None
        # front end + at least one prefill step of this prompt
        assert rec.ttft_s >= p.frontend_latency_s + p.step_time(rec.prompt_tokens, 0, 0) * 0.85
        assert rec.e2e_s >= rec.ttft_s
    assert sum(e.stats.generation_tokens for e in c.engines) == sum(r.output_tokens for r in reqs)
    assert c.now == 400.0


def test_same_seeds_give_identical_runs() -> None:
    def run(seed: int) -> list[tuple[str, float | None]]:
        c = cluster(seed=seed)
        c.submit_all(poisson_arrivals(4.0, 20.0, random.Random(seed)))
        c.run(200.0)
        return [(r.request_id, r.finish_s) for r in c.records.values()]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_timers_callbacks_and_gauge_samples() -> None:
    seen: list[float] = []
    finished: list[RequestRecord] = []
    firsts: list[RequestRecord] = []
    c = cluster(n=1, sample_interval_s=0.5, on_finish=finished.append, on_first_token=firsts.append)
    c.call_at(1.25, lambda: seen.append(c.now))
    c.submit(SimRequest("a", 100, 50, 0.1))
    c.run(10.0)
    assert seen == [1.25]
    assert [r.request_id for r in finished] == ["a"] == [r.request_id for r in firsts]
    times = [s[0] for s in c.traces[0].samples]
    assert times[:3] == [0.0, 0.5, 1.0] and times[-1] == 10.0
    assert max(s[2] for s in c.traces[0].samples) == 1  # running gauge saw the request
    assert c.traces[0].max_running == 1 and c.traces[0].steps == 50
    assert sum(n for _, n in c.traces[0].itl) == 49
    with pytest.raises(ValueError, match="in the past"):
        c.submit(SimRequest("late", 10, 10, 1.0))


def test_closed_loop_keeps_concurrency_constant() -> None:
    c: VirtualCluster
    seq = iter(range(10**9))

    def again(_: RequestRecord) -> None:
        c.submit(SimRequest(f"c{next(seq)}", 200, 30, c.now))

    c = cluster(n=1, on_finish=again)
    inflight: list[int] = []
    for i in range(8):
        c.submit(SimRequest(f"first{i}", 100 + i, 20 + i, 0.01 * i))
    for t in range(1, 60):
        c.call_at(
            t + 0.5, lambda: inflight.append(sum(r.finish_s is None for r in c.records.values()))
        )
    c.run(60.0)
    assert inflight == [8] * 59
    assert len(c.records) > 8 * 10  # each client went round many times


def test_abort_frees_the_request_in_its_engine() -> None:
    c = cluster(n=1)
    c.submit(SimRequest("a", 500, 400, 0.0))
    c.run(2.0)
    assert c.engines[0].stats.kv_usage > 0
    assert c.abort("a")
    assert c.engines[0].stats.kv_usage == 0.0 and not c.abort("a")
    c.run(5.0)
    assert c.records["a"].finish_s is None


def test_openorca_lengths_match_the_talks_ranges_and_means() -> None:
    rng = random.Random(5)
    pairs = [openorca_lengths(rng) for _ in range(20_000)]
    prompts, outputs = [p for p, _ in pairs], [o for _, o in pairs]
    assert min(prompts) >= 16 and max(prompts) <= 1600
    assert min(outputs) >= 16 and max(outputs) <= 1600
    # 4 standard errors: fails on a wrong distribution, not on noise
    for values, mean in ((prompts, 540.0), (outputs, 415.0)):
        se = statistics.stdev(values) / math.sqrt(len(values))
        assert abs(statistics.fmean(values) - mean) < 4 * se + 0.5


def test_poisson_arrivals_have_the_requested_rate() -> None:
    reqs = list(poisson_arrivals(10.0, 2000.0, random.Random(9)))
    assert all(0 <= r.arrival_s < 2000.0 for r in reqs)
    assert abs(len(reqs) - 20_000) < 4 * math.sqrt(20_000)
    assert len({r.request_id for r in reqs}) == len(reqs)


def test_percentiles() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile([5.0], 99) == 5.0
    assert weighted_percentile([(0.01, 98), (0.5, 2)], 50) == 0.01
    assert weighted_percentile([(0.01, 98), (0.5, 2)], 99) == 0.5
    with pytest.raises(ValueError):
        percentile([], 50)
