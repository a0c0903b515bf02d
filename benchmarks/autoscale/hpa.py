"""A faithful model of the Kubernetes HorizontalPodAutoscaler controller (``autoscaling/v2``).

Sources followed (read, not remembered):
- https://kubernetes.io/docs/concepts/workloads/autoscaling/horizontal-pod-autoscale/ —
  "Algorithm details", "Configurable scaling behavior" (policies, ``selectPolicy``,
  stabilization window, tolerance, "Default behavior", the 80-replica 4-pods/10%-per-minute
  example), "Implicit maintenance-mode deactivation";
- kubernetes/kubernetes ``pkg/controller/podautoscaler/horizontal.go`` at master (2026) and at
  v1.20.2: ``reconcileAutoscaler``, ``computeReplicasForMetrics``, ``recordInitialRecommendation``,
  ``normalizeDesiredReplicas`` + ``stabilizeRecommendation`` + ``convertDesiredReplicasWithRules``
  + ``calculateScaleUpLimit`` (no ``behavior``), ``normalizeDesiredReplicasWithBehaviors`` +
  ``maybeInitScaleDownStabilizationWindow`` + ``stabilizeRecommendationWithBehaviors`` +
  ``convertDesiredReplicasWithBehaviorRate`` + ``calculateScaleUpLimitWithScalingRules`` +
  ``calculateScaleDownLimitWithBehaviors`` + ``getReplicasChangePerPeriod`` + ``storeScaleEvent``
  + ``markScaleEventsOutdated`` (with ``behavior``), ``tolerancesForHpa``;
- ``pkg/apis/autoscaling/v2/defaults.go`` (``GenerateHPAScaleUpRules``/``...DownRules``: the
  behavior defaults) and ``pkg/controller/podautoscaler/config/v1alpha1/defaults.go`` (flags:
  sync period 15 s, tolerance 0.1, downscale stabilization 5 min, CPU initialization 5 min,
  initial readiness delay 30 s). The per-metric arithmetic is in ``replica_calc``.

What it models, per sync (every ``sync_period_s``; ``--horizontal-pod-autoscaler-sync-period``):
current = ``scale.spec.replicas``; 0 with ``minReplicas`` > 0 disables scaling; outside
[min, max] snaps to the bound; else each metric proposes (``replica_calc``), the largest wins
(with a metric error: no action if all fail, and in current semantics also no scale-down if any
fails); then *without* ``behavior``: the max recommendation of the last
``downscale_stabilization_s`` and a scale-up cap of ``max(2 × current, 4)`` per sync; *with*
``behavior`` (defaults: scale-up 0 s window, +100% or +4 pods per 15 s, ``Max``; scale-down
300 s window, -100% per 15 s): the stabilisation windows and the per-period rate policies,
counted from the scale events of the last ``periodSeconds``. Finally the [min, max] clamp.

Not modelled: events/conditions text, ContainerResource sources, metric selectors (a metric is
named by one string). The HPA cannot scale to zero: ``minReplicas`` >= 1 unless the alpha
``HPAScaleToZero`` gate (``scale_to_zero=True``; then only with an Object/External metric, and
scaling from 0 resumes only after the HPA itself scaled to 0 — the ``ScaledToZero`` condition).
Per-HPA ``tolerance`` (``behavior.scaleUp/scaleDown.tolerance``) is honoured when
``configurable_tolerance`` (the ``HPAConfigurableTolerance`` gate: alpha in 1.33, beta and on by
default in 1.35).

``semantics="v1.20"`` (``ControllerConfig``) reproduces v1.20.2 where it differs from master:
a new HPA's first sync comes one period after creation (enqueued rate-limited); stabilisation
looks only at the window of the proposal's direction (master clamps the current count between
the lowest scale-up and highest scale-down recommendation); a rate policy's period start counts
only same-direction events; a partially failing metric set may still scale down. The API
objects (``HPASpec``, ``Behavior``, ...) with their validation and defaults are in ``hpa_api``.

Boundaries follow Go's strict ``Before``/``After``: a recommendation exactly ``window`` old is
inside the legacy (no-``behavior``) window and outside a ``behavior`` window. A live controller
syncs slightly later than every ``sync_period_s``, so compare against one with windows that are
not multiples of the sync period.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from benchmarks.autoscale import replica_calc as rc
from benchmarks.autoscale.controller import Observation, SyncRecord
from benchmarks.autoscale.hpa_api import (
    ControllerConfig,
    DefaultedRules,
    HPASpec,
    MetricSpec,
    defaulted_rules,
    validated,
)

logger = logging.getLogger(__name__)

MIN_INT32, MAX_INT32 = -(2**31), 2**31 - 1


@dataclass(slots=True)
class ScaleEvent:
    """``timestampedScaleEvent``: how many replicas one rescale added (or removed), and when."""

    change: int
    t: float
    outdated: bool = False


@dataclass(frozen=True, slots=True)
class RateLimits:
    """``convertDesiredReplicasWithBehaviorRate`` and the two limit calculations under it."""

    up: DefaultedRules
    down: DefaultedRules
    up_events: list[ScaleEvent]
    down_events: list[ScaleEvent]

    def convert(
        self, now: float, current: int, desired: int, lo: int, hi: int, semantics: rc.Semantics
    ) -> int:
        if desired > current:
            limit = max(self.scale_up_limit(now, current, semantics), current)
            return min(desired, hi, limit)
        if desired < current:
            limit = min(self.scale_down_limit(now, current, semantics), current)
            return max(desired, lo, limit)
        return desired

    def _period_start(
        self, now: float, current: int, period_s: int, semantics: rc.Semantics, *, up: bool
    ) -> int:
        added = _changes(self.up_events, now, period_s)
        deleted = _changes(self.down_events, now, period_s)
        if semantics == "v1.20":  # only same-direction events were counted
            return current - added if up else current + deleted
        return current - added + deleted

    def scale_up_limit(self, now: float, current: int, semantics: rc.Semantics) -> int:
        """``calculateScaleUpLimitWithScalingRules``."""
        r = self.up
        if r.select == "Disabled":
            return current
        result = MAX_INT32 if r.select == "Min" else MIN_INT32
        pick = min if r.select == "Min" else max
        for p in r.policies:
            start = self._period_start(now, current, p.period_s, semantics, up=True)
            proposed = (
                start + p.value if p.type == "Pods" else math.ceil(start * (1 + p.value / 100))
            )
            result = pick(result, proposed)
        return result

    def scale_down_limit(self, now: float, current: int, semantics: rc.Semantics) -> int:
        """``calculateScaleDownLimitWithBehaviors``."""
        r = self.down
        if r.select == "Disabled":
            return current
        result = MIN_INT32 if r.select == "Min" else MAX_INT32
        pick = max if r.select == "Min" else min
        for p in r.policies:
            start = self._period_start(now, current, p.period_s, semantics, up=False)
            # int32(float64(start) * (1 - v/100)): truncation toward zero
            proposed = start - p.value if p.type == "Pods" else int(start * (1 - p.value / 100))
            result = pick(result, proposed)
        return result


class HorizontalPodAutoscaler:
    """One HPA object and the controller's memory of it (recommendations, scale events)."""

    def __init__(
        self,
        spec: HPASpec,
        config: ControllerConfig | None = None,
        *,
        created_s: float = 0.0,
        name: str = "hpa",
    ) -> None:
        self.config = config or ControllerConfig()
        self.spec = validated(spec, self.config)
        self._name = name
        self._up, self._down = defaulted_rules(spec.behavior, self.config.downscale_stabilization_s)
        self._tol = self._tolerances()
        # v1.20 enqueues a new HPA rate-limited (first sync one period later); master at once.
        first = self.config.sync_period_s if self.config.semantics == "v1.20" else 0.0
        self._next_sync = created_s + first
        self._recs: list[tuple[int, float]] = []
        self._up_events: list[ScaleEvent] = []
        self._down_events: list[ScaleEvent] = []
        self._scaled_to_zero = False
        self.history: list[SyncRecord] = []

    @property
    def name(self) -> str:
        return self._name

    def next_due_s(self) -> float:
        return self._next_sync

    def observe(self, now: float, metrics: Observation) -> int:
        if now < self._next_sync:
            return metrics.spec_replicas
        self._next_sync = now + self.config.sync_period_s
        return self.reconcile(now, metrics)

    # -- reconcileAutoscaler -------------------------------------------------------------

    def reconcile(self, now: float, obs: Observation) -> int:
        """One sync, unconditionally; returns the new ``scale.spec.replicas``."""
        current = obs.spec_replicas
        if not self._recs:  # recordInitialRecommendation
            self._recs.append((current, now))
        lo, hi = self.spec.min_replicas, self.spec.max_replicas
        proposal: int | None = None
        if current == 0 and not self._computes_from_zero():
            return self._record(now, current, None, 0, "ScalingDisabled")
        if current > hi:
            desired, reason = hi, "Current number of replicas above Spec.MaxReplicas"
        elif current < lo and current != 0:
            desired, reason = lo, "Current number of replicas below Spec.MinReplicas"
        else:
            try:
                proposal, reason = self._compute_replicas_for_metrics(now, obs)
            except rc.MetricError as e:
                return self._record(now, current, None, current, f"FailedComputeMetrics: {e}")
            if self.spec.behavior is None:
                desired = self._normalize_legacy(now, current, proposal)
            else:
                desired = self._normalize_with_behaviors(now, current, proposal)
            if current == 0 and lo != 0 and desired < lo:
                desired = lo
        if desired != current:
            self._store_scale_event(now, current, desired)
            if self.config.scale_to_zero:
                self._scaled_to_zero = desired == 0 and lo == 0 and self._has_object_or_external()
        return self._record(now, current, proposal, desired, reason)

    def _record(
        self, now: float, current: int, proposal: int | None, desired: int, why: str
    ) -> int:
        self.history.append(SyncRecord(now, self._name, current, proposal, desired, why))
        if desired != current:
            logger.debug("%s: %d -> %d (%s)", self._name, current, desired, why)
        return desired

    def _computes_from_zero(self) -> bool:
        # shouldComputeMetricsForZeroReplicas; without the gate a target at 0 is "disabled".
        if not self.config.scale_to_zero or not self._scaled_to_zero:
            return False
        return self.spec.min_replicas != 0 or self._has_object_or_external()

    def _has_object_or_external(self) -> bool:
        return any(m.source in ("Object", "External") for m in self.spec.metrics)

    def _compute_replicas_for_metrics(self, now: float, obs: Observation) -> tuple[int, str]:
        best, best_name, errors = 0, "", []
        for m in self.spec.metrics:
            try:
                p = self._metric_proposal(now, m, obs)
            except rc.MetricError as e:
                errors.append(f"{m.source} {m.name}: {e}")
                continue
            if best == 0 or p > best:
                best, best_name = p, m.name
        if errors and (
            len(errors) == len(self.spec.metrics)
            or (self.config.semantics == "current" and best < obs.spec_replicas)
        ):
            raise rc.MetricError(
                f"invalid metrics ({len(errors)}/{len(self.spec.metrics)}): {errors[0]}"
            )
        return best, f"{best_name} above target" if best > obs.spec_replicas else best_name

    def _metric_proposal(self, now: float, m: MetricSpec, obs: Observation) -> int:
        flags = self.config.readiness
        if m.source in ("Pods", "Resource"):
            pool = obs.pods if m.source == "Pods" else obs.resources
            samples = pool.get(m.name)
            if samples is None:
                raise rc.MetricError(f"unable to fetch metric {m.name}")
            if not samples:
                raise rc.MetricError(f"no metrics returned from the {m.source} metrics API")
            resource = m.name if m.source == "Resource" else ""
            if m.target_type == "Utilization":
                return rc.resource_utilization_replicas(
                    samples,
                    obs.replicas,
                    obs.spec_replicas,
                    int(m.target),
                    m.name,
                    self._tol,
                    flags=flags,
                    now=now,
                )[0]
            return rc.plain_metric_replicas(
                samples,
                obs.replicas,
                obs.spec_replicas,
                m.target,
                self._tol,
                resource=resource,
                flags=flags,
                now=now,
            )[0]
        value: float | tuple[float, ...] | None
        value = obs.objects.get(m.name) if m.source == "Object" else obs.external.get(m.name)
        if value is None:
            raise rc.MetricError(f"unable to fetch {m.source} metric {m.name}")
        if m.target_type == "AverageValue":
            return rc.average_value_replicas(value, m.target, obs.status_replicas, self._tol)[0]
        return rc.value_replicas(value, m.target, obs.spec_replicas, self._tol, obs.replicas)[0]

    # -- without behavior --------------------------------------------------------------

    def _normalize_legacy(self, now: float, current: int, proposal: int) -> int:
        # stabilizeRecommendation: the max of the last window (a sample exactly at the cutoff
        # is inside: Go keeps it unless it is Before the cutoff).
        cutoff = now - self.config.downscale_stabilization_s
        stabilized, old = proposal, None
        for i, (rec, t) in enumerate(self._recs):
            if t < cutoff:
                old = i
            elif rec > stabilized:
                stabilized = rec
        self._remember(old, proposal, now)
        # convertDesiredReplicasWithRules + calculateScaleUpLimit
        scale_up_limit = int(max(2.0 * current, 4.0))
        hi = min(self.spec.max_replicas, scale_up_limit)
        if stabilized < self.spec.min_replicas:
            return self.spec.min_replicas
        return min(stabilized, hi)

    def _remember(self, old: int | None, proposal: int, now: float) -> None:
        if old is None:
            self._recs.append((proposal, now))
        else:
            self._recs[old] = (proposal, now)

    # -- with behavior -----------------------------------------------------------------

    def _normalize_with_behaviors(self, now: float, current: int, proposal: int) -> int:
        stabilized = self._stabilize_with_behaviors(now, current, proposal)
        return self._rate_limited(now, current, stabilized)

    def _stabilize_with_behaviors(self, now: float, current: int, proposal: int) -> int:
        up_cut, down_cut = now - self._up.window_s, now - self._down.window_s
        if self.config.semantics == "v1.20":
            # v1.20: one direction's window, chosen by the proposal's direction.
            scaling_up = proposal >= current
            cut = up_cut if scaling_up else down_cut
            obsolete = now - max(self._up.window_s, self._down.window_s)
            rec, old = proposal, None
            for i, (r, t) in enumerate(self._recs):
                if t > cut:
                    rec = min(r, rec) if scaling_up else max(r, rec)
                if t < obsolete:
                    old = i
            self._remember(old, proposal, now)
            return rec
        up_rec = down_rec = proposal
        old = None
        for i, (r, t) in enumerate(self._recs):
            if t > up_cut:
                up_rec = min(r, up_rec)
            if t > down_cut:
                down_rec = max(r, down_rec)
            if t < up_cut and t < down_cut:
                old = i
        self._remember(old, proposal, now)
        return min(max(current, up_rec), down_rec)

    def _rate_limited(self, now: float, current: int, desired: int) -> int:
        limits = RateLimits(self._up, self._down, self._up_events, self._down_events)
        lo, hi = self.spec.min_replicas, self.spec.max_replicas
        return limits.convert(now, current, desired, lo, hi, self.config.semantics)

    def _store_scale_event(self, now: float, prev: int, new: int) -> None:
        if self.spec.behavior is None:
            return  # storeScaleEvent: events are only used by behavior policies
        up = new > prev
        events, rules = (self._up_events, self._up) if up else (self._down_events, self._down)
        cutoff = now - rules.longest_period_s
        old = None
        for i, e in enumerate(events):
            if e.t < cutoff:
                e.outdated = True
            if e.outdated:
                old = i
        event = ScaleEvent(abs(new - prev), now)
        if old is None:
            events.append(event)
        else:
            events[old] = event

    def _tolerances(self) -> rc.Tolerances:
        t = self.config.tolerance
        b = self.spec.behavior
        if self.config.semantics == "v1.20" or b is None or not self.config.configurable_tolerance:
            return rc.Tolerances(t, t, self.config.semantics)
        down = b.scale_down.tolerance if b.scale_down and b.scale_down.tolerance is not None else t
        up = b.scale_up.tolerance if b.scale_up and b.scale_up.tolerance is not None else t
        return rc.Tolerances(down, up)


def _changes(events: list[ScaleEvent], now: float, period_s: int) -> int:
    """``getReplicasChangePerPeriod``: changes strictly newer than ``now - period``."""
    cutoff = now - period_s
    return sum(e.change for e in events if e.t > cutoff)
