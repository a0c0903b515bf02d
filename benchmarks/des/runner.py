"""Run one ``Scenario``: simulated replicas, simulated gateways, arrivals; measure the window.

The replicas are ``benchmarks.sim.engine.Engine`` objects driven by
``benchmarks.sim.virtual.VirtualCluster``; the gateways are ``gateway_model.SimGateway``s using
the real ``policies/`` objects. Arrivals go to the gateways round-robin or at random
(``Scenario.split``); a gateway hands a request to the cluster the moment it binds it to a
replica (the cluster's route callback just reads that decision back), after which the
profile's front-end latency applies as for any request.

Determinism: every random stream is seeded by name - arrivals and lengths from
``Scenario.seed`` (through the workload), each engine's step jitter, each gateway's policy rng
and scrape phase and the gateway split from ``Scenario.noise_seed`` (default: ``seed``) - so
policies compared at one seed see the very same arrivals (common random numbers), and runs
differing only in ``noise_seed`` measure how much the rest moves the result.

Invariants checked at the end: every arrival was completed or rejected (unless the drain limit
ran out, which is reported as lost), and every gateway's in-flight counts are back to zero.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from benchmarks.des.gateway_model import Clock, Gauges, SimGateway
from benchmarks.des.scenario import Arrival, GaugeMode, Scenario, arrivals
from benchmarks.des.summary import RunSummary, kv_balance
from benchmarks.load.report import nearest_rank, weighted_quantiles
from benchmarks.sim.engine import Engine, SimRequest
from benchmarks.sim.profiles import Profile, get_profile
from benchmarks.sim.virtual import RequestRecord, VirtualCluster
from policies.types import ReplicaId, ReplicaState

_DRAIN_CHUNK_S = 30.0

Sample = tuple[float, int, int, float]  # (t, waiting, running, kv usage)


@dataclass(slots=True)
class Outcome:
    """One request's fate, client side (virtual seconds)."""

    request_id: str
    gateway: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    replica: int = -1
    dispatch_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None


@dataclass(slots=True)
class RunResult:
    scenario: Scenario
    summary: RunSummary
    ttft_s: list[float]  # sorted TTFTs of the window's completed requests (pooling, CDFs)
    e2e_s: list[float]  # sorted end-to-end latencies, same requests
    series: list[list[Sample]] | None = None  # per replica, window only (keep_series)
    records: list[Outcome] | None = None  # keep_records
    wall_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time for the run (immune to other load)
    simulated_s: float = 0.0


@dataclass(slots=True)
class _Window:
    """Engine counters at the start and end of the measured window."""

    preemptions: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    itl_index: list[int] = field(default_factory=list)
    max_waiting: list[int] = field(default_factory=list)


def replica_ids(n: int) -> tuple[ReplicaId, ...]:
    width = len(str(max(0, n - 1)))
    return tuple(ReplicaId(f"replica-{i:0{width}d}") for i in range(n))


class Replicas:
    """The simulated replicas behind the gateways, and what a gateway may learn of them.

    Owns the engines and their ``VirtualCluster``. A gateway binds a request with ``dispatch``;
    ``gauges`` is what a scrape reads (the engines' published gauges); ``exact_states`` is the
    oracle's exact view, counting requests still in the front end (dispatched, not yet handed
    to the engine) as waiting. ``on_first_token`` / ``on_finish`` are called with the request id.
    """

    def __init__(
        self,
        profile: Profile,
        n: int,
        seed: int,
        *,
        sample_interval_s: float | None = 1.0,
        gauges: GaugeMode = "engine",
    ) -> None:
        self.profile = profile
        self.gauge_mode = gauges
        self.ids = replica_ids(n)
        self.engines = [Engine(profile, random.Random(f"{seed}/engine/{i}")) for i in range(n)]
        self.on_first_token: Callable[[str, float], None] | None = None
        self.on_finish: Callable[[str, float], None] | None = None
        self._decided: dict[str, int] = {}
        self._in_transit: list[deque[float]] = [deque() for _ in self.engines]
        self._models = frozenset({profile.served_model})
        self.cluster = VirtualCluster(
            self.engines,
            lambda req, now: self._decided.pop(req.request_id),
            sample_interval_s=sample_interval_s,
            on_first_token=self._first_token,
            on_finish=self._finish,
        )
        self.clock = Clock(now=lambda: self.cluster.now, call_at=self.cluster.call_at)

    def dispatch(self, arrival: Arrival, index: int) -> None:
        now = self.cluster.now
        self._decided[arrival.request_id] = index
        transit = self._in_transit[index]
        while transit and transit[0] <= now:
            transit.popleft()
        transit.append(now + self.profile.frontend_latency_s)
        self.cluster.submit(
            SimRequest(
                arrival.request_id,
                arrival.prompt_tokens,
                arrival.output_tokens,
                now,
                arrival.block_hashes,
            )
        )

    def gauges(self) -> list[Gauges]:
        if self.gauge_mode == "exact":
            return [(s.queue_depth or 0, s.running or 0, s.kv_usage or 0.0) for s in self._exact()]
        return [(e.stats.num_waiting, e.stats.num_running, e.stats.kv_usage) for e in self.engines]

    def _exact(self) -> list[ReplicaState]:
        return list(self.exact_states(self.cluster.now, {rid: 0 for rid in self.ids}))

    def exact_states(
        self, now: float, inflight: Mapping[ReplicaId, int]
    ) -> tuple[ReplicaState, ...]:
        out = []
        for rid, engine, transit in zip(self.ids, self.engines, self._in_transit, strict=True):
            while transit and transit[0] <= now:
                transit.popleft()
            out.append(
                ReplicaState(
                    id=rid,
                    models=self._models,
                    queue_depth=len(engine.waiting_ids()) + len(transit),
                    running=len(engine.running_ids()),
                    kv_usage=engine.kv.usage,
                    scraped_at=now,
                    inflight_at_scrape=inflight[rid],
                )
            )
        return tuple(out)

    def _first_token(self, rec: RequestRecord) -> None:
        if self.on_first_token is not None and rec.first_token_s is not None:
            self.on_first_token(rec.request_id, rec.first_token_s)

    def _finish(self, rec: RequestRecord) -> None:
        if self.on_finish is not None and rec.finish_s is not None:
            self.on_finish(rec.request_id, rec.finish_s)


def run_scenario(scenario: Scenario) -> RunResult:
    started = time.perf_counter()
    cpu_started = time.process_time()
    sc = scenario
    profile = get_profile(sc.profile, **dict(sc.profile_overrides))
    noise = sc.seed if sc.noise_seed is None else sc.noise_seed
    reps = Replicas(
        profile, sc.replicas, noise, sample_interval_s=sc.sample_interval_s, gauges=sc.gauges
    )
    cluster = reps.cluster
    outcomes: dict[str, Outcome] = {}
    gateways: list[SimGateway] = []
    done = [0]

    def first_token(request_id: str, at: float) -> None:
        outcomes[request_id].first_token_s = at

    def finish(request_id: str, at: float) -> None:
        o = outcomes[request_id]
        o.finish_s = at
        done[0] += 1
        gateways[o.gateway].complete(request_id)

    def send(arrival: Arrival, index: int) -> None:
        o = outcomes[arrival.request_id]
        o.replica, o.dispatch_s = index, cluster.now
        reps.dispatch(arrival, index)

    reps.on_first_token, reps.on_finish = first_token, finish
    spec = sc.gateway
    for g in range(sc.gateways):
        phase = random.Random(f"{noise}/scrape-phase/{g}").random() * spec.scrape_interval_s
        gateways.append(
            SimGateway(
                spec,
                reps.ids,
                profile.served_model,
                reps.clock,
                reps.gauges,
                send,
                rng=random.Random(f"{noise}/gateway/{g}"),
                scrape_phase_s=phase,
                exact_states=reps.exact_states,
            )
        )

    needs_prefix = gateways[0].policy.needs_prefix
    source = arrivals(
        sc,
        block_size=profile.block_size,
        max_model_len=profile.max_model_len,
        gateway_hashes=needs_prefix,
    )
    split_rng = random.Random(f"{noise}/split")
    arrived = [0]

    def schedule_next() -> None:
        a = next(source, None)
        if a is not None:
            cluster.call_at(a.at, lambda: arrive(a))

    def arrive(a: Arrival) -> None:
        n = arrived[0]
        arrived[0] += 1
        by_turn = sc.split == "round_robin"
        g = n % sc.gateways if by_turn else int(split_rng.random() * sc.gateways)
        outcomes[a.request_id] = Outcome(a.request_id, g, a.at, a.prompt_tokens, a.output_tokens)
        gateways[g].arrive(a)
        schedule_next()

    start, end = _Window(), _Window()
    cluster.call_at(sc.warmup_s, lambda: _mark(cluster, start, reset=True))
    cluster.call_at(sc.end_s, lambda: _mark(cluster, end, reset=False))
    schedule_next()
    cluster.run(sc.end_s)
    limit = sc.end_s + sc.drain_limit_s

    def unresolved() -> int:
        rejected = sum(len(gw.rejected) for gw in gateways)
        return arrived[0] - done[0] - rejected

    while unresolved() and cluster.now < limit:
        cluster.run(min(limit, cluster.now + _DRAIN_CHUNK_S))
    if not unresolved():
        for gw in gateways:
            assert all(v == 0 for v in gw.inflight().values()), "leaked in-flight count"
    result = _measure(sc, cluster, gateways, outcomes, start, end)
    result.wall_s = time.perf_counter() - started
    result.cpu_s = time.process_time() - cpu_started
    return result


def _mark(cluster: VirtualCluster, w: _Window, *, reset: bool) -> None:
    for engine, trace in zip(cluster.engines, cluster.traces, strict=True):
        w.preemptions.append(engine.stats.num_preemptions)
        w.generated.append(engine.stats.generation_tokens)
        w.itl_index.append(len(trace.itl))
        w.max_waiting.append(trace.max_waiting)
        if reset:
            trace.max_waiting = engine.stats.num_waiting


def _measure(
    sc: Scenario,
    cluster: VirtualCluster,
    gateways: list[SimGateway],
    outcomes: dict[str, Outcome],
    start: _Window,
    end: _Window,
) -> RunResult:
    lo, hi = sc.warmup_s, sc.end_s
    window = [o for o in outcomes.values() if lo <= o.arrival_s < hi]
    finished = [o for o in window if o.finish_s is not None and o.first_token_s is not None]
    ttft = sorted(_since(o.first_token_s, o.arrival_s) for o in finished)
    e2e = sorted(_since(o.finish_s, o.arrival_s) for o in finished)
    itl: list[tuple[float, int]] = []
    for trace, a, b in zip(cluster.traces, start.itl_index, end.itl_index, strict=True):
        itl.extend(trace.itl[a:b])
    itl_p50, itl_p99 = weighted_quantiles(itl, (50, 99))
    samples = [[s for s in trace.samples if lo <= s[0] < hi] for trace in cluster.traces]
    rejected = {rid for gw in gateways for rid in gw.rejected}
    window_ids = {o.request_id for o in window}
    reasons: dict[str, int] = {}
    for gw in gateways:
        for reason, count in gw.reasons.items():
            reasons[reason] = reasons.get(reason, 0) + count
    waits = sorted(w for gw in gateways for w in gw.buffer_waits)
    kv = kv_balance(samples)
    out = RunSummary(
        requests=len(window),
        completed=len(finished),
        lost=len(window) - len(finished),
        rejected=len(rejected & window_ids),
        ttft_p50_s=nearest_rank(ttft, 50),
        ttft_p90_s=nearest_rank(ttft, 90),
        ttft_p99_s=nearest_rank(ttft, 99),
        ttft_mean_s=sum(ttft) / len(ttft) if ttft else math.nan,
        e2e_p50_s=nearest_rank(e2e, 50),
        e2e_p99_s=nearest_rank(e2e, 99),
        itl_p50_s=itl_p50,
        itl_p99_s=itl_p99,
        output_tokens_per_s=(sum(end.generated) - sum(start.generated)) / sc.duration_s,
        max_waiting=max(end.max_waiting),
        max_waiting_per_replica=tuple(end.max_waiting),
        kv_spread_mean=kv.spread_mean,
        kv_mean=kv.mean,
        kv_mean_range=kv.mean_range,
        preemptions=sum(end.preemptions) - sum(start.preemptions),
        held=sum(gw.counters.held for gw in gateways),
        max_buffered=max(gw.counters.max_buffered for gw in gateways),
        buffer_wait_p99_s=nearest_rank(waits, 99) if waits else 0.0,
        reasons=reasons,
    )
    return RunResult(
        scenario=sc,
        summary=out,
        ttft_s=ttft,
        e2e_s=e2e,
        series=samples if sc.keep_series else None,
        records=list(outcomes.values()) if sc.keep_records else None,
        simulated_s=cluster.now,
    )


def _since(t: float | None, start: float) -> float:
    assert t is not None
    return t - start
