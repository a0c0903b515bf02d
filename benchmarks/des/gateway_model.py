"""One simulated gateway: the live gateway's routing state and rules, in virtual time.

What it reproduces of the live gateway (``gateway.pool``, ``gateway.router``,
``gateway.scraper``):

* Its own exact in-flight count per replica (``acquire`` on dispatch, ``release`` on
  completion), handed to policies as a live read-only mapping, as ``ReplicaPool.view`` does.
* Scraped signals only through scrapes: a round every ``scrape_interval_s`` (first round at a
  per-gateway phase offset, optional per-round jitter) reads each replica's published gauges
  (``num_requests_waiting``, ``num_requests_running``, KV usage: what vLLM's ``/metrics`` would
  show at that instant, i.e. as of the engine's last step) and applies them
  ``scrape_latency_s`` later with ``scraped_at`` = landing time and ``inflight_at_scrape`` = the
  in-flight count at landing, exactly as ``ReplicaPool.apply_scrape``. Staleness
  (``max_metrics_age_s``) is judged by the policies themselves from these fields.
* ``policy.choose`` then, in the same synchronous block, acquire and ``observe(Dispatched)``;
  ``observe(Completed)`` at release.
* The buffer: when ``choose`` returns None (every replica saturated under
  ``GatewaySpec.saturation``), the request is held in a FIFO queue (bounded, optional deadline;
  overflow and expiry are rejections, counted). Held requests are retried head first the moment
  capacity may have appeared - a release or a landed scrape - and a new arrival never overtakes
  a held one. With a saturation bound this is *late binding*: a request is bound to a replica
  only when one has room.

The oracle (``policies.oracle``, simulation only) gets no scraped view: ``exact_states`` builds
``ReplicaState``s from the engines' live state at decision time (``scraped_at = now``,
``inflight_at_scrape`` = current in-flight), so its effective queue is the true queue - unless
``GatewaySpec.exact_oracle`` is off, which runs its full scan on the scraped view (a diagnostic).

Invariants: in-flight counts equal dispatched minus completed per replica, never negative;
every arrival is dispatched, held, or rejected (counted), never dropped silently.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from benchmarks.des.scenario import Arrival, GatewaySpec
from policies.base import Policy
from policies.registry import make_policy
from policies.types import (
    Completed,
    Dispatched,
    PoolView,
    ReplicaId,
    ReplicaState,
    RequestInfo,
)

Gauges = tuple[int, int, float]  # (waiting, running, kv usage) as an engine publishes them
ExactStates = Callable[[float, Mapping[ReplicaId, int]], tuple[ReplicaState, ...]]


@dataclass(frozen=True, slots=True)
class Clock:
    """The virtual-time hooks a gateway needs from the event loop."""

    now: Callable[[], float]
    call_at: Callable[[float, Callable[[], None]], None]


@dataclass(slots=True)
class GatewayCounters:
    arrived: int = 0
    dispatched: int = 0
    held: int = 0  # requests that waited in the buffer at least once
    rejected_full: int = 0
    rejected_deadline: int = 0
    max_buffered: int = 0
    scrapes: int = 0


class SimGateway:
    def __init__(
        self,
        spec: GatewaySpec,
        replica_ids: Sequence[ReplicaId],
        model: str,
        clock: Clock,
        read_gauges: Callable[[], Sequence[Gauges]],
        send: Callable[[Arrival, int], None],
        *,
        rng: random.Random,
        scrape_phase_s: float = 0.0,
        exact_states: ExactStates | None = None,
    ) -> None:
        self.spec = spec
        self.policy: Policy = make_policy(spec.policy, dict(spec.policy_params), simulation=True)
        self.exact = spec.policy == "oracle" and spec.exact_oracle
        if self.exact and exact_states is None:
            raise ValueError("the oracle policy needs exact_states")
        self.model = model
        self.counters = GatewayCounters()
        self.reasons: Counter[str] = Counter()
        self.buffer_waits: list[float] = []  # seconds each held request waited
        self.rejected: list[str] = []  # request ids rejected by the buffer
        self._ids = tuple(replica_ids)
        self._index = {rid: i for i, rid in enumerate(self._ids)}
        self._models = frozenset({model})
        self._clock = clock
        self._read_gauges = read_gauges
        self._send = send
        self._exact = exact_states
        self._rng = rng
        self._scrape_rng = random.Random(rng.random())
        self._seq = 0
        self._inflight: dict[ReplicaId, int] = {rid: 0 for rid in self._ids}
        self._inflight_view: Mapping[ReplicaId, int] = MappingProxyType(self._inflight)
        self._snapshot = tuple(ReplicaState(id=rid, models=self._models) for rid in self._ids)
        self._live: dict[str, tuple[ReplicaId, RequestInfo]] = {}
        self._buffer: deque[tuple[Arrival, RequestInfo, float]] = deque()
        clock.call_at(scrape_phase_s, self._scrape_round)

    # ------------------------------------------------------------------ reading
    def inflight(self) -> Mapping[ReplicaId, int]:
        return self._inflight_view

    def buffered(self) -> int:
        return len(self._buffer)

    def view(self) -> PoolView:
        now = self._clock.now()
        if self._exact is not None and self.exact:
            replicas = self._exact(now, self._inflight_view)
        else:
            replicas = self._snapshot
        spec = self.spec
        return PoolView(
            now=now,
            replicas=replicas,
            inflight=self._inflight_view,
            max_metrics_age_s=spec.max_metrics_age_s,
            saturation=spec.saturation,
        )

    # ------------------------------------------------------------------ traffic
    def arrive(self, arrival: Arrival) -> None:
        """A client request reached this gateway: dispatch it, or hold it behind the others."""
        self.counters.arrived += 1
        self._seq += 1
        info = RequestInfo(
            seq=self._seq,
            model=self.model,
            stream=True,
            prefix_hashes=arrival.prefix_hashes,
            prompt_chars=arrival.prompt_chars,
        )
        if self._buffer or not self._dispatch(arrival, info):
            self._hold(arrival, info)

    def complete(self, request_id: str, *, ok: bool = True) -> None:
        """The response to ``request_id`` ended (last byte or failure): release its replica."""
        replica, info = self._live.pop(request_id)
        n = self._inflight[replica] - 1
        assert n >= 0, f"release without acquire for {replica}"
        self._inflight[replica] = n
        self.policy.observe(Completed(replica, info, self._clock.now(), ok))
        if self._buffer:
            self._drain()

    # ---------------------------------------------------------------- internals
    def _dispatch(self, arrival: Arrival, info: RequestInfo) -> bool:
        view = self.view()
        decision = self.policy.choose(view, info, self._rng)
        if decision is None:
            self.reasons["no_candidate"] += 1
            return False
        replica = decision.replica
        self._inflight[replica] += 1
        self.policy.observe(Dispatched(replica, info, view.now))
        self.reasons[decision.reason] += 1
        self.counters.dispatched += 1
        self._live[arrival.request_id] = (replica, info)
        self._send(arrival, self._index[replica])
        return True

    def _hold(self, arrival: Arrival, info: RequestInfo) -> None:
        c = self.counters
        if len(self._buffer) >= self.spec.max_buffered:
            c.rejected_full += 1
            self.rejected.append(arrival.request_id)
            return
        now = self._clock.now()
        self._buffer.append((arrival, info, now))
        c.held += 1
        c.max_buffered = max(c.max_buffered, len(self._buffer))
        deadline = self.spec.buffer_deadline_s
        if deadline is not None:
            self._clock.call_at(now + deadline, self._expire)

    def _drain(self) -> None:
        buf = self._buffer
        while buf:
            arrival, info, held_at = buf[0]
            if not self._dispatch(arrival, info):
                return
            buf.popleft()
            self.buffer_waits.append(self._clock.now() - held_at)

    def _expire(self) -> None:
        deadline = self.spec.buffer_deadline_s
        assert deadline is not None
        now = self._clock.now()
        buf = self._buffer
        while buf and now - buf[0][2] >= deadline:
            arrival, _, _ = buf.popleft()
            self.counters.rejected_deadline += 1
            self.rejected.append(arrival.request_id)

    def _scrape_round(self) -> None:
        spec = self.spec
        now = self._clock.now()
        gauges = tuple(self._read_gauges())
        self._clock.call_at(now + spec.scrape_latency_s, lambda: self._apply(gauges))
        gap = spec.scrape_interval_s
        if spec.scrape_jitter:
            gap *= 1.0 + spec.scrape_jitter * (2.0 * self._scrape_rng.random() - 1.0)
        self._clock.call_at(now + gap, self._scrape_round)

    def _apply(self, gauges: tuple[Gauges, ...]) -> None:
        at = self._clock.now()
        inflight = self._inflight
        models = self._models
        self._snapshot = tuple(
            ReplicaState(
                id=rid,
                models=models,
                queue_depth=waiting,
                running=running,
                kv_usage=kv,
                scraped_at=at,
                inflight_at_scrape=inflight[rid],
            )
            for rid, (waiting, running, kv) in zip(self._ids, gauges, strict=True)
        )
        self.counters.scrapes += 1
        # As ReplicaPool.apply_scrape: a scrape can only free capacity under a saturation bound.
        if self._buffer and self.spec.saturation is not None:
            self._drain()
