"""ReplicaPool: the authoritative, in-process record of every replica the gateway knows.

It holds membership, each replica's phase and models, the exact gateway-local in-flight count
and the last scraped engine signals, and hands policies a ``PoolView`` in O(1).

Invariants:

* One writer per field: discovery/catalog write membership, phase and models; the router writes
  in-flight (``acquire``/``release``); the scraper writes scraped values (``apply_scrape``,
  ``scrape_failed``). The pool does no I/O and never awaits, so a ``PoolView`` taken in a
  synchronous block is consistent for that block.
* ``view(now)`` costs O(1): the sorted ``ReplicaState`` tuple is cached and rebuilt only after a
  change (a C-level copy of a list whose slots are replaced one replica at a time), and
  ``inflight`` is a live read-only mapping, not a copy.
* Unknown is never zero: a replica never scraped has ``None`` signals; a failed scrape keeps the
  last values with their ``scraped_at``, so they go stale by ``max_metrics_age_s``.
* A replica removed while it has requests in flight becomes ``draining`` (no new requests) and
  leaves the pool when its last request is released.
* Phase writers: discovery (``set_members``: new → ``starting``, terminating or removed while
  busy → ``draining``, not ready → ``starting``) and ``gateway.health.HealthTracker`` (through
  the guarded ``promote``/``eject``/``readmit``: ``starting`` → ``ready`` ⇄ ``ejected``). A
  replica becomes ``ready`` only while discovery admits it.
* ``capacity`` is notified whenever something may have become routable or decidable (a release,
  a replica ready, a scrape or failed scrape under saturation bounds, a model list or the
  membership changed); ``changes`` whenever membership, admission or a phase changed. Both are
  edge signals for the buffer and the catalog, which re-check the pool when woken.
* ``ready_since`` is set each time a replica becomes ready (slow start ramps from it); with a
  slow-start window the pool also keeps the replicas still inside it (``ramping``), so the
  router's per-pick cost of the ramp is O(replicas ramping), usually zero.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from gateway.discovery.base import DiscoveredReplica
from gateway.engine_metrics import EngineSample
from policies.types import Phase, PoolView, ReplicaId, ReplicaState, Saturation

MembershipListener = Callable[[frozenset[ReplicaId]], None]


@dataclass(slots=True)
class _Entry:
    url: str
    state: ReplicaState
    removing: bool = False
    admitted: bool = True  # discovery's authority says it may serve (Kubernetes readiness)
    engine: str | None = None
    scrape_error: str | None = None  # reason of the last failed scrape, None once one succeeds
    scrape_failed_at: float | None = None
    model_cards: tuple[Mapping[str, object], ...] = field(default=())


class CapacitySignal:
    """A broadcast "something may have become routable" notification.

    ``wait()`` returns at the next ``notify()`` after it was called; ``notify()`` with nobody
    waiting costs one attribute check and one call per subscriber, so the hot path (every
    release) can always call it. Subscribers are called synchronously inside ``notify`` (from
    pool methods, in the middle of a caller's update): they must only schedule work, never
    route or change the pool themselves.
    """

    __slots__ = ("_event", "_subscribers")

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None
        self._subscribers: list[Callable[[], None]] = []

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._subscribers.append(callback)

    def notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None
        for callback in self._subscribers:
            callback()

    async def wait(self) -> None:
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()


class ReplicaPool:
    def __init__(
        self,
        *,
        max_metrics_age_s: float,
        saturation: Saturation | None = None,
        slow_start_s: float = 0.0,
    ) -> None:
        self.max_metrics_age_s = max_metrics_age_s
        self.saturation = saturation
        self.slow_start_s = slow_start_s
        self.capacity = CapacitySignal()
        self.changes = CapacitySignal()
        # Bumped when a phase, a model list or the membership changes (not on scrapes): lets the
        # buffer re-judge "can capacity for this model still come?" only when it may differ.
        self.epoch = 0
        self._ramping: dict[ReplicaId, float] = {}  # ready replicas inside the slow-start window
        self._entries: dict[ReplicaId, _Entry] = {}
        self._inflight: dict[ReplicaId, int] = {}
        self._inflight_view: Mapping[ReplicaId, int] = MappingProxyType(self._inflight)
        self._order: list[ReplicaId] = []  # sorted ids; _states[i] belongs to _order[i]
        self._index: dict[ReplicaId, int] = {}
        self._states: list[ReplicaState] = []
        self._snapshot: tuple[ReplicaState, ...] | None = ()
        self._served_models: frozenset[str] | None = frozenset()
        self._listeners: list[MembershipListener] = []
        self._sources: dict[str, dict[str, DiscoveredReplica]] = {}

    # -- reading ---------------------------------------------------------------------------

    def view(self, now: float) -> PoolView:
        snapshot = self._snapshot
        if snapshot is None:
            snapshot = self._snapshot = tuple(self._states)
        return PoolView(
            now=now,
            replicas=snapshot,
            inflight=self._inflight_view,
            max_metrics_age_s=self.max_metrics_age_s,
            saturation=self.saturation,
            slow_start_s=self.slow_start_s,
        )

    def __contains__(self, replica: object) -> bool:
        return replica in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def ids(self) -> tuple[ReplicaId, ...]:
        return tuple(self._order)

    def state(self, replica: ReplicaId) -> ReplicaState:
        return self._entries[replica].state

    def url(self, replica: ReplicaId) -> str:
        return self._entries[replica].url

    def inflight(self, replica: ReplicaId) -> int:
        return self._inflight.get(replica, 0)

    def total_inflight(self) -> int:
        return sum(self._inflight.values())

    def engine(self, replica: ReplicaId) -> str | None:
        return self._entries[replica].engine

    def scrape_error(self, replica: ReplicaId) -> tuple[str | None, float | None]:
        e = self._entries[replica]
        return e.scrape_error, e.scrape_failed_at

    def model_cards(self, replica: ReplicaId) -> tuple[Mapping[str, object], ...]:
        return self._entries[replica].model_cards

    def served_models(self) -> frozenset[str]:
        """Every model some member lists, whatever its phase."""
        models = self._served_models
        if models is None:
            models = self._served_models = frozenset(m for s in self._states for m in s.models)
        return models

    def admitted(self, replica: ReplicaId) -> bool:
        """Whether discovery's authority lets ``replica`` serve (Kubernetes readiness)."""
        return self._entries[replica].admitted

    def ramping(self, now: float) -> Mapping[ReplicaId, float]:
        """Ready replicas still inside the slow-start window, with their ``ready_since``."""
        ramping = self._ramping
        if ramping:
            window = self.slow_start_s
            for rid in [r for r, since in ramping.items() if now - since >= window]:
                del ramping[rid]
        return ramping

    # -- membership (discovery) ------------------------------------------------------------

    def add_listener(self, listener: MembershipListener) -> None:
        """Called with the new member set after every membership change."""
        self._listeners.append(listener)

    def add(
        self,
        replica: ReplicaId,
        url: str,
        *,
        phase: Phase = "starting",
        models: Iterable[str] = (),
        now: float | None = None,
    ) -> None:
        if replica in self._entries:
            raise ValueError(f"replica {replica} is already in the pool")
        state = ReplicaState(
            id=replica,
            models=frozenset(models),
            phase=phase,
            ready_since=now if phase == "ready" else None,
        )
        self._entries[replica] = _Entry(url=url, state=state)
        self._inflight[replica] = 0
        if state.ready_since is not None and self.slow_start_s > 0.0:
            self._ramping[replica] = state.ready_since
        self._reindex()
        self._membership_changed()
        if phase == "ready":
            self.capacity.notify()

    def remove(self, replica: ReplicaId) -> None:
        """Take ``replica`` out: at once if idle, else drain it and drop it at its last release."""
        entry = self._entries.get(replica)
        if entry is None:
            return
        if self._inflight[replica] == 0:
            self._drop(replica)
            return
        entry.removing = True
        self._update(replica, replace(entry.state, phase="draining"))

    def set_phase(self, replica: ReplicaId, phase: Phase, now: float) -> None:
        entry = self._entries[replica]
        if entry.removing or entry.state.phase == phase:
            return
        ready_since = now if phase == "ready" else entry.state.ready_since
        self._update(replica, replace(entry.state, phase=phase, ready_since=ready_since))
        if phase == "ready":
            self.capacity.notify()

    def promote(self, replica: ReplicaId, now: float) -> bool:
        """``starting`` → ``ready`` if discovery admits it; whether it is ready afterwards."""
        entry = self._entries[replica]
        if entry.state.phase == "starting" and entry.admitted and not entry.removing:
            self.set_phase(replica, "ready", now)
        return entry.state.phase == "ready"

    def eject(self, replica: ReplicaId, now: float) -> bool:
        """``ready`` → ``ejected`` (passive health); whether it was ejected."""
        entry = self._entries[replica]
        if entry.state.phase != "ready" or entry.removing:
            return False
        self.set_phase(replica, "ejected", now)
        return True

    def readmit(self, replica: ReplicaId, now: float) -> bool:
        """``ejected`` → ``ready`` if discovery still admits it; whether it is ready afterwards."""
        entry = self._entries[replica]
        if entry.state.phase == "ejected" and entry.admitted and not entry.removing:
            self.set_phase(replica, "ready", now)
        return entry.state.phase == "ready"

    def set_models(
        self,
        replica: ReplicaId,
        models: Iterable[str],
        cards: tuple[Mapping[str, object], ...] = (),
    ) -> None:
        entry = self._entries[replica]
        entry.model_cards = cards
        new = frozenset(models)
        if new != entry.state.models:
            self._update(replica, replace(entry.state, models=new))
            self._served_models = None
            self.capacity.notify()  # waiters for a model nobody serves may now be decided

    def set_members(self, source: str, members: Sequence[DiscoveredReplica]) -> None:
        """Discovery's sink: ``members`` is the complete membership ``source`` knows now.

        Per replica name: new and ready or not ready → added as ``starting`` (the catalog makes
        it ``ready`` once it lists its models); not ready → back to ``starting``; terminating →
        ``draining``; gone from every source → removed (drained first if busy). A changed URL
        under the same name is a new replica: it starts again.
        """
        self._sources[source] = {m.name: m for m in members}
        wanted: dict[str, DiscoveredReplica] = {}
        for snapshot in self._sources.values():
            for name, m in snapshot.items():
                wanted.setdefault(name, m)
        for rid in [r for r in self._entries if r not in wanted]:
            self.remove(rid)
        for name, m in wanted.items():
            rid = ReplicaId(name)
            entry = self._entries.get(rid)
            if entry is None:
                self.add(rid, m.url, phase="draining" if m.terminating else "starting")
                self._entries[rid].admitted = m.ready and not m.terminating
                continue
            entry.admitted = m.ready and not m.terminating
            if entry.url != m.url:
                entry.url = m.url
                entry.model_cards = ()
                entry.removing = False
                self._update(rid, ReplicaState(id=rid, models=frozenset(), phase="starting"))
                self._served_models = None
            elif m.terminating:
                if entry.state.phase != "draining":
                    self._update(rid, replace(entry.state, phase="draining"))
            elif entry.removing or (not m.ready and entry.state.phase != "starting"):
                entry.removing = False
                self._update(rid, replace(entry.state, phase="starting", ready_since=None))
            elif entry.state.phase == "draining":
                self._update(rid, replace(entry.state, phase="starting", ready_since=None))
        self.changes.notify()  # admission may have changed without a phase change

    # -- in-flight (router) ----------------------------------------------------------------

    def acquire(self, replica: ReplicaId) -> None:
        self._inflight[replica] += 1

    def release(self, replica: ReplicaId) -> None:
        n = self._inflight[replica] - 1
        assert n >= 0, f"release without acquire for {replica}"
        self._inflight[replica] = n
        if n == 0 and self._entries[replica].removing:
            self._drop(replica)
        self.capacity.notify()

    # -- scraped signals (scraper) ---------------------------------------------------------

    def apply_scrape(self, replica: ReplicaId, sample: EngineSample, at: float) -> None:
        entry = self._entries.get(replica)
        if entry is None:  # removed while its scrape was in flight
            return
        entry.engine = sample.engine
        entry.scrape_error = None
        entry.scrape_failed_at = None
        self._update(
            replica,
            replace(
                entry.state,
                queue_depth=sample.queue_depth,
                running=sample.running,
                kv_usage=sample.kv_usage,
                scraped_at=at,
                inflight_at_scrape=self._inflight[replica],
            ),
        )
        if self.saturation is not None:
            self.capacity.notify()

    def scrape_failed(self, replica: ReplicaId, reason: str, at: float) -> None:
        entry = self._entries.get(replica)
        if entry is None:
            return
        entry.scrape_error = reason
        entry.scrape_failed_at = at
        if self.saturation is not None:
            self.capacity.notify()  # its queue/KV bounds stop applying once the scrape is stale

    # -- internals -------------------------------------------------------------------------

    def _update(self, replica: ReplicaId, state: ReplicaState) -> None:
        entry = self._entries[replica]
        old = entry.state
        entry.state = state
        self._states[self._index[replica]] = state
        self._snapshot = None
        if old.phase != state.phase or old.models is not state.models:
            self.epoch += 1
            if old.phase != state.phase:
                self.changes.notify()
            if self.slow_start_s > 0.0:
                if state.phase == "ready" and state.ready_since is not None:
                    self._ramping[replica] = state.ready_since
                else:
                    self._ramping.pop(replica, None)

    def _drop(self, replica: ReplicaId) -> None:
        del self._entries[replica]
        del self._inflight[replica]
        self._ramping.pop(replica, None)
        self._reindex()
        self._membership_changed()

    def _reindex(self) -> None:
        self._order = sorted(self._entries)
        self._index = {rid: i for i, rid in enumerate(self._order)}
        self._states = [self._entries[rid].state for rid in self._order]
        self._snapshot = None
        self._served_models = None

    def _membership_changed(self) -> None:
        self.epoch += 1
        members = frozenset(self._entries)
        for listener in self._listeners:
            listener(members)
        self.changes.notify()
        self.capacity.notify()  # a model may have lost (or gained) its last replica
