"""Replica health: when a starting replica becomes ready, and when a failing one is ejected.

``HealthTracker`` is a small state machine, one record per replica, with an injected clock and
no I/O. The catalog (``gateway/catalog.py``) runs the HTTP probes it asks for (``due``) and
reports them (``probe_result``, ``models_listed``); the router reports the outcome of every
upstream attempt (``request_result``). It is the only writer of the health-driven phase
transitions, made through the pool's guarded methods::

    starting --probe 200, >= 1 model listed, discovery admits it--> ready     (pool.promote)
    ready    --consecutive_failures in a row, share allows--------> ejected   (pool.eject)
    ejected  --ejection time over, half-open probe 200-------------> ready     (pool.readmit)
    ejected  --half-open probe fails--------------------------------> ejected, for longer

Discovery writes the membership-driven phases (``ReplicaPool.set_members``). When it sends a
replica back to ``starting`` (not ready in Kubernetes, a new address), the tracker forgets the
replica's probe result, so it is probed again before it takes traffic.

Readiness probes: a starting replica is probed at once, then ``probe_interval_s`` after a
failure, doubling up to ``probe_max_interval_s`` while it keeps failing, so a replica that loads
its model for minutes sees a probe every few seconds, not a stream of them. After a pass it is
re-probed every ``probe_max_interval_s`` until it becomes ready.

Passive health: a connection failure, a disconnect, a first-byte timeout or a 5xx answer is a
failure; any other answer is a success and resets the count. ``consecutive_failures`` failures
in a row eject a ready replica (0 disables ejection). Client disconnects are no verdict.

Ejection time: the n-th ejection in a row lasts ``min(base_ejection_s * 2**(n-1),
max_ejection_s)``; the streak restarts once a replica has stayed in service for
``max_ejection_s`` since its last readmission.

Half-open: when its time is over an ejected replica gets one active health probe — not a trial
client request, so no client pays for the trial. A pass readmits it *on probation*: its first
request outcome decides, a failure ejecting it again at once (with the next, doubled time) and a
success ending the probation. A failed probe ejects it again for the next time.

Max ejection share (Envoy's ``max_ejection_percent``, including its "at least one" rule): a
replica is ejected only if afterwards at most ``max_ejection_percent``% of the ready and ejected
replicas are ejected, or if none is ejected yet. Starting and draining replicas take no traffic
and are not counted. A replica the share protects stays ready; its next failure tries again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import HealthConfig
from gateway.pool import ReplicaPool
from policies.types import Phase, ReplicaId

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Record:
    seen: Phase  # the pool phase at the last look: a change made elsewhere is discovery's
    next_probe_at: float
    probe_ok: bool = False
    probe_failures: int = 0  # failed readiness probes in a row (the probe backoff exponent)
    failures: int = 0  # failed requests in a row
    ejections: int = 0  # ejections in a row (the ejection backoff exponent)
    ejected_until: float | None = None
    probation: bool = False
    readmitted_at: float | None = None
    share_blocked: bool = False  # an ejection the share refused was logged


@dataclass(frozen=True, slots=True)
class HealthStatus:
    """One replica's health record, for /debug and tests."""

    probe_ok: bool
    probe_failures: int
    next_probe_at: float | None  # starting: the next readiness probe; ejected: half-open
    consecutive_failures: int
    ejections: int
    probation: bool


class HealthTracker:
    def __init__(self, pool: ReplicaPool, cfg: HealthConfig, *, clock: Callable[[], float]) -> None:
        self._pool = pool
        self._cfg = cfg
        self._clock = clock
        self._records: dict[ReplicaId, _Record] = {}
        pool.add_listener(self._membership_changed)

    # -- what to probe ---------------------------------------------------------------------

    def due(self) -> list[ReplicaId]:
        """Replicas to probe now: starting ones on their backoff, ejected ones whose time is
        over (the half-open probe). Also promotes starting replicas that became admissible
        since their last probe (discovery admitted them)."""
        now = self._clock()
        out: list[ReplicaId] = []
        for rid in self._pool.ids():
            rec = self._record(rid, now)
            if rec.seen == "starting" and rec.probe_ok:
                self._try_promote(rid, rec, now)
            at = self._probe_at(rec)
            if at is not None and at <= now:
                out.append(rid)
        return out

    def next_due_at(self) -> float | None:
        """When the earliest probe falls due (None: none is scheduled)."""
        now = self._clock()
        times = [
            at
            for rid in self._pool.ids()
            if (at := self._probe_at(self._record(rid, now))) is not None
        ]
        return min(times, default=None)

    def probe_ok(self, replica: ReplicaId) -> bool:
        rec = self._records.get(replica)
        return rec is not None and rec.probe_ok

    def status(self, replica: ReplicaId) -> HealthStatus:
        rec = self._record(replica, self._clock())
        return HealthStatus(
            rec.probe_ok,
            rec.probe_failures,
            self._probe_at(rec),
            rec.failures,
            rec.ejections,
            rec.probation,
        )

    # -- inputs ----------------------------------------------------------------------------

    def probe_result(self, replica: ReplicaId, ok: bool) -> None:
        if replica not in self._pool:
            return
        now = self._clock()
        rec = self._record(replica, now)
        cfg = self._cfg
        if rec.seen == "starting":
            rec.probe_ok = ok
            if ok:
                rec.probe_failures = 0
                rec.next_probe_at = now + cfg.probe_max_interval_s
                self._try_promote(replica, rec, now)
            else:
                rec.probe_failures += 1
                backoff = cfg.probe_interval_s * 2.0 ** (rec.probe_failures - 1)
                rec.next_probe_at = now + min(backoff, cfg.probe_max_interval_s)
        elif rec.seen == "ejected" and rec.ejected_until is not None:
            if now < rec.ejected_until:
                return  # an answer to a probe of an earlier ejection period
            if not ok:
                self._eject(replica, rec, now, "its half-open health probe failed")
            elif self._pool.readmit(replica, now):
                rec.seen = "ready"
                rec.ejected_until = None
                rec.failures = 0
                rec.probation = True
                rec.readmitted_at = now
                logger.info("replica %s readmitted on probation (health probe passed)", replica)
            else:  # discovery no longer admits it; its phase changes with the next snapshot
                rec.ejected_until = now + cfg.probe_max_interval_s

    def models_listed(self, replica: ReplicaId) -> None:
        """The catalog recorded the replica's model list: it may now be ready."""
        if replica not in self._pool:
            return
        now = self._clock()
        rec = self._record(replica, now)
        if rec.seen == "starting":
            self._try_promote(replica, rec, now)

    def request_result(self, replica: ReplicaId, ok: bool) -> None:
        """One upstream attempt's outcome: ``ok`` False for a replica failure."""
        if self._cfg.consecutive_failures == 0 or replica not in self._pool:
            return
        now = self._clock()
        rec = self._record(replica, now)
        if rec.seen != "ready":
            return  # finished on a replica already ejected or draining: no news
        if ok:
            rec.failures = 0
            rec.probation = False
            return
        rec.failures += 1
        if rec.probation:
            self._eject(replica, rec, now, "it failed its first request after readmission")
        elif rec.failures >= self._cfg.consecutive_failures:
            self._eject(replica, rec, now, f"{rec.failures} requests in a row failed")

    # -- transitions -----------------------------------------------------------------------

    def _try_promote(self, replica: ReplicaId, rec: _Record, now: float) -> None:
        if rec.probe_ok and self._pool.state(replica).models and self._pool.promote(replica, now):
            rec.seen = "ready"
            logger.info("replica %s is ready", replica)

    def _eject(self, replica: ReplicaId, rec: _Record, now: float, why: str) -> None:
        cfg = self._cfg
        if rec.seen == "ready":
            if not self._share_allows():
                if not rec.share_blocked:
                    rec.share_blocked = True
                    logger.warning(
                        "replica %s not ejected (%s): max_ejection_percent %d%% reached",
                        replica,
                        why,
                        cfg.max_ejection_percent,
                    )
                return
            if not self._pool.eject(replica, now):
                return
            since = rec.readmitted_at
            if since is not None and now - since >= cfg.max_ejection_s:
                rec.ejections = 0  # in service long enough: the streak is over
        rec.ejections += 1
        duration = min(cfg.base_ejection_s * 2.0 ** (rec.ejections - 1), cfg.max_ejection_s)
        rec.seen = "ejected"
        rec.ejected_until = now + duration
        rec.failures = 0
        rec.probation = False
        rec.share_blocked = False
        logger.warning("replica %s ejected for %.1f s: %s", replica, duration, why)

    def _share_allows(self) -> bool:
        ejected = serving = 0
        for s in self._pool.view(self._clock()).replicas:
            if s.phase == "ejected":
                ejected += 1
                serving += 1
            elif s.phase == "ready":
                serving += 1
        return ejected == 0 or (ejected + 1) * 100 <= self._cfg.max_ejection_percent * serving

    # -- bookkeeping -----------------------------------------------------------------------

    def _record(self, replica: ReplicaId, now: float) -> _Record:
        phase = self._pool.state(replica).phase
        rec = self._records.get(replica)
        if rec is None:
            rec = self._records[replica] = _Record(seen=phase, next_probe_at=now)
        elif rec.seen != phase:
            if phase == "starting":  # sent back by discovery: prove itself again
                rec.probe_ok = False
                rec.probe_failures = 0
                rec.next_probe_at = now
                rec.failures = 0
                rec.ejected_until = None
                rec.probation = False
            rec.seen = phase
        return rec

    def _probe_at(self, rec: _Record) -> float | None:
        if rec.seen == "starting":
            return rec.next_probe_at
        if rec.seen == "ejected":
            return rec.ejected_until
        return None

    def _membership_changed(self, members: frozenset[ReplicaId]) -> None:
        for rid in self._records.keys() - members:
            del self._records[rid]
