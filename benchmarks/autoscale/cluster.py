"""An elastic cluster in virtual time: replicas created with a cold start, removed by draining.

Built on the routing simulator (``benchmarks.des``): engines run in a
``benchmarks.sim.virtual.VirtualCluster`` and requests enter through a ``SimGateway`` (the real
``policies/`` objects, scrapes with live staleness, the buffer). What this module adds:

* **Membership at run time.** ``scale_to(n)`` is what the ReplicaSet controller does with
  ``scale.spec.replicas``: new replicas (pods) start *loading* and serve only after
  ``cold_start_s`` (the engine loading the model: sim-fidelity §7, ~60-90 s for an 8B model on
  a warm node, minutes on a cold one); the gateway learns of a replica when it becomes ready
  (an EndpointSlice turning ready). Scale-down deletes loading replicas first, then the most
  recently ready ones (the ReplicaSet's ranking); a deleted ready replica leaves the gateway's
  routing set at once and *drains*: requests already on it finish, then it is gone.
* **The two front ends compared.** ``buffered=True`` is kvgate: a request that no replica can
  take waits in the gateway buffer (bounded, with a deadline) and is dispatched the moment a
  replica becomes ready. ``buffered=False`` is a plain Kubernetes Service: round-robin over the
  ready replicas, and a request arriving when none is ready is *lost* (connection refused /
  503) - counted, never silently dropped.
* **Cost.** A replica holds its GPU from creation (loading included) until it is gone, so
  ``gpu_seconds`` counts exactly that.

Invariants: a replica is in the gateway's routing set iff it is ready and not deleted; a
draining replica receives no new request; every arrival is completed, rejected by the buffer,
or lost at the Service - ``check`` verifies the counts and that no in-flight count leaked.

Upstream note: ``VirtualCluster`` takes a fixed, non-empty engine list; ``_add_engine`` appends
to its per-engine lists, and the first engine is created eagerly (unused until a replica takes
it). An ``add_engine`` in ``VirtualCluster`` and membership changes in ``SimGateway`` would make
the two private reaches here unnecessary.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from benchmarks.des.gateway_model import Clock, Gauges, SimGateway
from benchmarks.des.scenario import Arrival, GatewaySpec
from benchmarks.sim.engine import Engine, SimRequest
from benchmarks.sim.profiles import Profile
from benchmarks.sim.virtual import RequestRecord, VirtualCluster
from policies.types import MembershipChanged, ReplicaId, ReplicaState

PodState = Literal["loading", "ready", "draining", "gone"]


@dataclass(slots=True)
class Pod:
    """One replica's life: created -> (loading) -> ready -> (draining) -> gone."""

    name: ReplicaId
    index: int  # engine index in the VirtualCluster
    created_s: float
    state: PodState = "loading"
    ready_s: float | None = None
    deleted_s: float | None = None
    gone_s: float | None = None


@dataclass(slots=True)
class Fate:
    """One request, client side."""

    arrival_s: float
    first_token_s: float | None = None
    finish_s: float | None = None
    outcome: Literal["pending", "done", "rejected", "lost"] = "pending"


class ElasticGateway(SimGateway):
    """``SimGateway`` whose routing set changes at run time (ready replicas only)."""

    def __init__(
        self,
        spec: GatewaySpec,
        model: str,
        clock: Clock,
        read_gauges: Callable[[Sequence[int]], Sequence[Gauges]],
        send: Callable[[Arrival, int], None],
        *,
        rng: random.Random,
        scrape_phase_s: float = 0.0,
    ) -> None:
        self._read_indexed = read_gauges
        super().__init__(
            spec, (), model, clock, lambda: (), send, rng=rng, scrape_phase_s=scrape_phase_s
        )

    def add_replica(self, rid: ReplicaId, index: int) -> None:
        """``rid`` became ready: route to it, and release held requests onto it."""
        self._index[rid] = index
        self._inflight.setdefault(rid, 0)
        self._ids = tuple(sorted((*self._ids, rid)))
        now = self._clock.now()
        fresh = ReplicaState(id=rid, models=self._models, ready_since=now)
        self._snapshot = tuple(sorted((*self._snapshot, fresh), key=lambda r: r.id))
        self.policy.observe(MembershipChanged(frozenset(self._ids)))
        if self._buffer:
            self._drain()

    def remove_replica(self, rid: ReplicaId) -> None:
        """``rid`` was deleted: no new requests; its in-flight ones finish (it drains)."""
        self._ids = tuple(r for r in self._ids if r != rid)
        self._snapshot = tuple(r for r in self._snapshot if r.id != rid)
        self.policy.observe(MembershipChanged(frozenset(self._ids)))

    def _scrape_round(self) -> None:
        spec = self.spec
        now = self._clock.now()
        ids = self._ids
        gauges = tuple(self._read_indexed([self._index[r] for r in ids]))
        self._clock.call_at(now + spec.scrape_latency_s, lambda: self._apply_members(ids, gauges))
        self._clock.call_at(now + spec.scrape_interval_s, self._scrape_round)

    def _apply_members(self, ids: tuple[ReplicaId, ...], gauges: tuple[Gauges, ...]) -> None:
        at = self._clock.now()
        read = dict(zip(ids, gauges, strict=True))
        out = []
        for r in self._snapshot:  # replicas removed meanwhile are gone; added ones unscraped
            g = read.get(r.id)
            if g is None:
                out.append(r)
                continue
            waiting, running, kv = g
            out.append(
                ReplicaState(
                    id=r.id,
                    models=self._models,
                    ready_since=r.ready_since,
                    queue_depth=waiting,
                    running=running,
                    kv_usage=kv,
                    scraped_at=at,
                    inflight_at_scrape=self._inflight[r.id],
                )
            )
        self._snapshot = tuple(out)
        self.counters.scrapes += 1
        if self._buffer and self.spec.saturation is not None:
            self._drain()


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    cold_start_s: float = 75.0  # creation -> ready (a10g-llama3-8b load_time_s, warm node)
    buffered: bool = True  # kvgate's buffer (True) or a plain Service (False)
    gateway: GatewaySpec = field(default_factory=GatewaySpec)


class ElasticCluster:
    """Engines, pods, one front end; driven by ``scale_to`` and ``submit``."""

    def __init__(self, profile: Profile, spec: ClusterSpec, seed: int, initial: int = 0) -> None:
        self.profile = profile
        self.spec = spec
        self.seed = seed
        self.pods: list[Pod] = []
        self.fates: dict[str, Fate] = {}
        self.arrived = 0
        self.lost = 0  # arrivals refused by a plain Service (no ready replica)
        self._swept = 0
        self._decided: dict[str, int] = {}
        self._spare: Engine | None = self._new_engine(0)
        self.vc = VirtualCluster(
            [self._spare],
            lambda req, now: self._decided.pop(req.request_id),
            sample_interval_s=None,
            on_first_token=self._first_token,
            on_finish=self._finish,
        )
        self._by_index: dict[int, Pod] = {}
        clock = Clock(now=lambda: self.vc.now, call_at=self.vc.call_at)
        gspec = spec.gateway
        if not spec.buffered:  # a Service: round-robin over ready endpoints, nothing held
            gspec = GatewaySpec(policy="round_robin", max_buffered=0, scrape_interval_s=60.0)
        self.gateway = ElasticGateway(
            gspec,
            profile.served_model,
            clock,
            self._gauges,
            self._send,
            rng=random.Random(f"{seed}/gateway"),
        )
        for _ in range(initial):
            self._create(ready_now=True)

    # ------------------------------------------------------------------ reading
    @property
    def now(self) -> float:
        return self.vc.now

    def live_pods(self) -> list[Pod]:
        """Pods the ReplicaSet counts (``status.replicas``): loading or ready, not deleted."""
        return [p for p in self.pods if p.state in ("loading", "ready")]

    def ready_pods(self) -> list[Pod]:
        return [p for p in self.pods if p.state == "ready"]

    def engine(self, pod: Pod) -> Engine:
        return self.vc.engines[pod.index]

    def busy_s(self, pod: Pod) -> float:
        return self.vc.traces[pod.index].busy_s

    def concurrency(self) -> int:
        """kvgate_requests_in_flight + kvgate_requests_queued."""
        return sum(self.gateway.inflight().values()) + self.gateway.buffered()

    def gpu_seconds(self, until_s: float) -> float:
        total = 0.0
        for p in self.pods:
            end = p.gone_s if p.gone_s is not None else until_s
            total += max(0.0, min(end, until_s) - p.created_s)
        return total

    def rejected(self) -> int:
        return len(self.gateway.rejected)

    # ------------------------------------------------------------------ driving
    def call_at(self, at_s: float, fn: Callable[[], None]) -> None:
        self.vc.call_at(at_s, fn)

    def run(self, until_s: float) -> None:
        self.vc.run(until_s)

    def submit(self, arrivals: Iterable[Arrival]) -> None:
        """Schedule arrivals lazily (one pending event at a time), in time order."""
        source = iter(arrivals)

        def next_one() -> None:
            a = next(source, None)
            if a is not None:
                self.vc.call_at(a.at, lambda: self._arrive(a, next_one))

        next_one()

    def scale_to(self, n: int) -> None:
        live = self.live_pods()
        for _ in range(n - len(live)):
            self._create(ready_now=False)
        if n < len(live):
            # ReplicaSet ranking: not-ready before ready, then the most recently ready first.
            ranked = sorted(
                live, key=lambda p: (p.state == "ready", -(p.ready_s or 0.0), -p.created_s)
            )
            for p in ranked[: len(live) - n]:
                self._delete(p)

    def check(self) -> None:
        """Every arrival accounted for; no in-flight count leaked (call after draining)."""
        self.settle()
        pending = sum(1 for f in self.fates.values() if f.outcome == "pending")
        assert pending == 0, f"{pending} requests unresolved"
        assert all(v == 0 for v in self.gateway.inflight().values()), "leaked in-flight count"

    # ---------------------------------------------------------------- internals
    def _new_engine(self, index: int) -> Engine:
        return Engine(self.profile, random.Random(f"{self.seed}/engine/{index}"))

    def _create(self, *, ready_now: bool) -> None:
        if self._spare is not None:
            index, self._spare = 0, None
        else:
            index = len(self.vc.engines)
            engine = self._new_engine(index)
            engine.every_token = False
            # VirtualCluster has no add_engine (see the module docstring).
            self.vc.engines.append(engine)
            self.vc.traces.append(type(self.vc.traces[0])())
            self.vc._steps.append(None)
        pod = Pod(ReplicaId(f"replica-{index:03d}"), index, self.now)
        self.pods.append(pod)
        self._by_index[index] = pod
        if ready_now:
            self._ready(pod)
        else:
            self.vc.call_at(self.now + self.spec.cold_start_s, lambda: self._ready(pod))

    def _ready(self, pod: Pod) -> None:
        if pod.state != "loading":
            return  # deleted while loading
        pod.state, pod.ready_s = "ready", self.now
        self.gateway.add_replica(pod.name, pod.index)

    def _delete(self, pod: Pod) -> None:
        pod.deleted_s = self.now
        if pod.state == "loading":
            pod.state, pod.gone_s = "gone", self.now
            return
        pod.state = "draining"
        self.gateway.remove_replica(pod.name)
        self._maybe_gone(pod)

    def _maybe_gone(self, pod: Pod) -> None:
        if pod.state == "draining" and self.gateway.inflight().get(pod.name, 0) == 0:
            pod.state, pod.gone_s = "gone", self.now

    def _gauges(self, indices: Sequence[int]) -> list[Gauges]:
        engines = self.vc.engines
        return [
            (engines[i].stats.num_waiting, engines[i].stats.num_running, engines[i].stats.kv_usage)
            for i in indices
        ]

    def _arrive(self, a: Arrival, next_one: Callable[[], None]) -> None:
        self.arrived += 1
        fate = Fate(a.at)
        self.fates[a.request_id] = fate
        self.gateway.arrive(a)
        next_one()
        self.settle()

    def settle(self) -> None:
        """Mark the gateway's rejections (full buffer, deadline expiry from a timer) as fates."""
        for rid in self.gateway.rejected[self._swept :]:
            f = self.fates[rid]
            if f.outcome != "pending":
                continue
            if self.spec.buffered:
                f.outcome = "rejected"
            else:
                f.outcome = "lost"
                self.lost += 1
        self._swept = len(self.gateway.rejected)

    def _send(self, a: Arrival, index: int) -> None:
        self._decided[a.request_id] = index
        self.vc.submit(
            SimRequest(a.request_id, a.prompt_tokens, a.output_tokens, self.now, a.block_hashes)
        )

    def _first_token(self, rec: RequestRecord) -> None:
        self.fates[rec.request_id].first_token_s = rec.first_token_s

    def _finish(self, rec: RequestRecord) -> None:
        f = self.fates[rec.request_id]
        f.finish_s, f.outcome = rec.finish_s, "done"
        self.gateway.complete(rec.request_id)
        pod = self._by_index[rec.replica]
        self._maybe_gone(pod)
