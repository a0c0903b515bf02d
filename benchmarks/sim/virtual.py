"""Discrete-event driver: many simulated engines in virtual time, with a routing callback.

``VirtualCluster`` owns one event heap. Events are: a request's arrival (the ``route``
callback picks a replica), its hand-over to that engine after the profile's front-end latency,
the end of each engine's current step, periodic gauge samples, and arbitrary timers
(``call_at``) - which is how a routing simulator layers scrapes and staleness on top. The
clock jumps from event to event, so hours of traffic over dozens of replicas take seconds.

Engines run with ``every_token=False``: only first-token and finish events come back, and
per-token ITL is recorded per step as ``(itl_s, decode_tokens)`` pairs, exactly and cheaply.

Invariants: virtual time never goes backwards; each engine has at most one step in flight; an
engine with work always has a step in flight (continuous batching never idles with work).

Workload helpers: ``poisson_arrivals`` (seeded exponential gaps) and ``openorca_lengths``:
each length is ``16 + 1584 * Beta(1.5, b)`` rounded, b solved from the mean (input mean 540 ->
b = 3.034, output mean 415 -> b = 4.455), the same model as ``benchmarks.load``'s
``openorca`` workload - a broad spread over 16-1600 like the stratified llm-load-test subset.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

from benchmarks.load.report import nearest_rank, weighted_quantiles
from benchmarks.sim.engine import Engine, SimRequest, Step

Route = Callable[[SimRequest, float], int]

_STEP_END, _HANDOVER, _ARRIVAL, _TIMER = 0, 1, 2, 3


@dataclass(slots=True)
class RequestRecord:
    """One request's client-side timeline (seconds of virtual time)."""

    request_id: str
    replica: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    first_token_s: float | None = None
    finish_s: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None for 1-token outputs)."""
        if self.finish_s is None or self.first_token_s is None or self.output_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)


@dataclass(slots=True)
class ReplicaTrace:
    """Per-replica gauge series and extremes (gauges as vLLM publishes them, per step)."""

    samples: list[tuple[float, int, int, float]] = field(default_factory=list)  # t, wait, run, kv
    itl: list[tuple[float, int]] = field(default_factory=list)  # (itl_s, tokens) per step
    steps: int = 0
    max_waiting: int = 0
    max_running: int = 0
    max_kv_usage: float = 0.0
    busy_s: float = 0.0


class VirtualCluster:
    def __init__(
        self,
        engines: Sequence[Engine],
        route: Route,
        *,
        sample_interval_s: float | None = 1.0,
        on_first_token: Callable[[RequestRecord], None] | None = None,
        on_finish: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        if not engines:
            raise ValueError("a cluster needs at least one engine")
        for e in engines:
            e.every_token = False
        self.engines = list(engines)
        self.route = route
        self.now = 0.0
        self.records: dict[str, RequestRecord] = {}
        self.traces = [ReplicaTrace() for _ in engines]
        self.on_first_token = on_first_token
        self.on_finish = on_finish
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._steps: list[Step | None] = [None] * len(engines)
        self._interval = sample_interval_s
        if sample_interval_s is not None:
            self.call_at(0.0, self._sample)

    # ------------------------------------------------------------------ inputs
    def submit(self, req: SimRequest) -> None:
        """Schedule a client request at ``req.arrival_s`` (>= now)."""
        if req.arrival_s < self.now:
            raise ValueError(f"arrival {req.arrival_s} is in the past (now {self.now})")
        self._push(req.arrival_s, _ARRIVAL, req)

    def submit_all(self, reqs: Iterator[SimRequest] | Sequence[SimRequest]) -> None:
        for req in reqs:
            self.submit(req)

    def call_at(self, at_s: float, fn: Callable[[], None]) -> None:
        """Run ``fn()`` at virtual time ``at_s`` (after events already queued for that time)."""
        self._push(max(at_s, self.now), _TIMER, fn)

    # -------------------------------------------------------------------- loop
    def run(self, until_s: float) -> None:
        """Process events up to and including ``until_s``; ``now`` ends at ``until_s``."""
        heap = self._heap
        pop = heapq.heappop
        while heap and heap[0][0] <= until_s:
            t, _, kind, payload = pop(heap)
            self.now = t
            if kind == _STEP_END:
                self._step_end(payload)  # type: ignore[arg-type]
            elif kind == _HANDOVER:
                idx, req = cast(tuple[int, SimRequest], payload)
                self.engines[idx].add_request(req, t)
                if self._steps[idx] is None:
                    self._start_step(idx)
            elif kind == _ARRIVAL:
                self._arrive(payload)  # type: ignore[arg-type]
            else:
                payload()  # type: ignore[operator]
        self.now = max(self.now, until_s)

    def abort(self, request_id: str) -> bool:
        """Client disconnect: abort in whichever engine holds the request."""
        rec = self.records.get(request_id)
        if rec is None or rec.finish_s is not None:
            return False
        ok = self.engines[rec.replica].abort_request(request_id, self.now)
        if ok:
            rec.finish_s = None
        return ok

    # ---------------------------------------------------------------- internals
    def _push(self, t: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))

    def _arrive(self, req: SimRequest) -> None:
        idx = self.route(req, self.now)
        self.records[req.request_id] = RequestRecord(
            req.request_id, idx, req.arrival_s, req.prompt_tokens, req.output_tokens
        )
        delay = self.engines[idx].profile.frontend_latency_s
        self._push(self.now + delay, _HANDOVER, (idx, req))

    def _start_step(self, idx: int) -> None:
        engine = self.engines[idx]
        step = engine.schedule(self.now)
        self._steps[idx] = step
        if step is None:
            return
        trace = self.traces[idx]
        stats = engine.stats
        if stats.num_waiting > trace.max_waiting:
            trace.max_waiting = stats.num_waiting
        if stats.num_running > trace.max_running:
            trace.max_running = stats.num_running
        if stats.kv_usage > trace.max_kv_usage:
            trace.max_kv_usage = stats.kv_usage
        trace.busy_s += step.duration_s
        trace.steps += 1
        self._push(self.now + step.duration_s, _STEP_END, idx)

    def _step_end(self, idx: int) -> None:
        step = self._steps[idx]
        assert step is not None
        now = self.now
        events = self.engines[idx].complete(step, now)
        if step.decode_tokens:
            self.traces[idx].itl.append((step.itl_s, step.decode_tokens))
        records = self.records
        for ev in events:
            rec = records[ev.request_id]
            if rec.first_token_s is None:
                rec.first_token_s = now
                if self.on_first_token is not None:
                    self.on_first_token(rec)
            if ev.finished:
                rec.finish_s = now
                if self.on_finish is not None:
                    self.on_finish(rec)
        self._start_step(idx)

    def _sample(self) -> None:
        for engine, trace in zip(self.engines, self.traces, strict=True):
            s = engine.stats
            trace.samples.append((self.now, s.num_waiting, s.num_running, s.kv_usage))
        assert self._interval is not None
        self._push(self.now + self._interval, _TIMER, self._sample)


# ----------------------------------------------------------------------- workload
def scaled_beta(rng: random.Random, lo: int, hi: int, mean: float, alpha: float = 1.5) -> int:
    m = (mean - lo) / (hi - lo)
    return round(lo + (hi - lo) * rng.betavariate(alpha, alpha * (1.0 - m) / m))


def openorca_lengths(rng: random.Random) -> tuple[int, int]:
    """(prompt, output) tokens of the talk's OpenOrca subset (see the module docstring)."""
    return scaled_beta(rng, 16, 1600, 540.0), scaled_beta(rng, 16, 1600, 415.0)


def poisson_arrivals(
    rate_per_s: float,
    duration_s: float,
    rng: random.Random,
    lengths: Callable[[random.Random], tuple[int, int]] = openorca_lengths,
    *,
    start_s: float = 0.0,
    prefix: str = "req",
) -> Iterator[SimRequest]:
    """Open-loop Poisson arrivals in [start_s, start_s + duration_s)."""
    t = start_s
    i = 0
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= start_s + duration_s:
            return
        prompt, output = lengths(rng)
        yield SimRequest(f"{prefix}-{i}", prompt, output, t)
        i += 1


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    return nearest_rank(sorted(values), q)


def weighted_percentile(pairs: Sequence[tuple[float, int]], q: float) -> float:
    """Percentile of values given as (value, count) pairs, e.g. per-step ITL."""
    if sum(n for _, n in pairs) == 0:
        raise ValueError("percentile of an empty sequence")
    return weighted_quantiles(pairs, (q,))[0]
