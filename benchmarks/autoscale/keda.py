"""A model of a KEDA ScaledObject: KEDA's own 0 <-> 1 activation on top of the HPA it creates.

Sources followed:
- https://keda.sh/docs/latest/reference/scaledobject-spec/ — ``pollingInterval`` (30 s),
  ``cooldownPeriod`` (300 s; "only applies when scaling to 0"), ``initialCooldownPeriod`` (0),
  ``idleReplicaCount`` ("must be less than minReplicaCount"; only 0 works), ``minReplicaCount``
  (0), ``maxReplicaCount`` (100), ``advanced.horizontalPodAutoscalerConfig.behavior`` (passed
  to the HPA as is), ``useCachedMetrics``;
- https://keda.sh/docs/latest/concepts/scaling-deployments/ — "Activating and Scaling
  thresholds": the activation phase (0 <-> 1) is KEDA's, the scaling phase (1 <-> N) the HPA's;
  a trigger is active only when its value is *greater than* the activation value (default 0);
  activation wins over scaling (threshold 10, activationThreshold 50, 40 messages -> scaled to 0
  even though the HPA wants 4);
- kedacore/keda ``pkg/scaling/executor/scale_scaledobjects.go`` (``RequestScale``,
  ``scaleToZeroOrIdle``, ``scaleFromZeroOrIdle``, ``getIdleOrMinimumReplicaCount``),
  ``pkg/scaling/scale_handler.go`` (``startScaleLoop``: check now, then every pollingInterval),
  ``controllers/keda/hpa.go`` (``newHPAForScaledObject``: one External metric per trigger, HPA
  ``minReplicas`` = max(minReplicaCount, 1), ``maxReplicas`` = maxReplicaCount, ``behavior``
  from the ScaledObject or nil), ``apis/keda/v1alpha1`` (``GetHPAMinReplicas``), and
  ``pkg/scalers`` (``GenerateMetricInMili``/``GetMetricTargetMili``: values and targets are
  sent as ``int64(x * 1000)`` milli-quantities — truncated).

Per poll (``RequestScale``): active and at 0 (or below min with idle mode) -> min (or 1), and
lastActiveTime = now; active otherwise -> lastActiveTime = now; inactive and above idle (or >0
with minReplicaCount 0) -> idle/min once lastActiveTime + cooldown < now (or, never active,
creation + initialCooldownPeriod < now); inactive below min without idle mode -> min. A trigger
whose metric is missing is an error: not active, and with no fallback KEDA does nothing.
Between 1 and N the embedded ``HorizontalPodAutoscaler`` decides on the External metric
(``AverageValue`` by default: ``ceil(sum / threshold)``); at 0 that HPA is disabled
("scaling is disabled since the replica count of the target is zero").

When both loops are due at the same instant the KEDA poll runs first and the HPA reads its
result. Not modelled: fallback replicas, scaling modifiers, pause annotations, jittered first
tick (use ``poll_phase_s``), ScaledJobs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Literal

from benchmarks.autoscale.controller import Observation, SyncRecord
from benchmarks.autoscale.hpa import HorizontalPodAutoscaler
from benchmarks.autoscale.hpa_api import Behavior, ControllerConfig, HPASpec, MetricSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Trigger:
    """One trigger: ``metric`` is the value it reads (a key of ``Observation.external``)."""

    metric: str
    target: float  # `threshold` / `value`: the scaling phase
    activation_target: float = 0.0  # `activationThreshold`: the activation phase
    metric_type: Literal["AverageValue", "Value"] = "AverageValue"
    use_cached_metrics: bool = False

    def __post_init__(self) -> None:
        if self.target <= 0:
            raise ValueError(f"trigger {self.metric!r}: target must be > 0, got {self.target}")


@dataclass(frozen=True, slots=True)
class ScaledObjectSpec:
    triggers: tuple[Trigger, ...]
    polling_interval_s: float = 30.0
    cooldown_period_s: float = 300.0
    initial_cooldown_period_s: float = 0.0
    min_replica_count: int = 0
    max_replica_count: int = 100
    idle_replica_count: int | None = None
    behavior: Behavior | None = None  # advanced.horizontalPodAutoscalerConfig.behavior

    def __post_init__(self) -> None:
        if not self.triggers:
            raise ValueError("ScaledObject needs at least one trigger")
        if self.min_replica_count > self.max_replica_count:
            raise ValueError(
                f"MinReplicaCount={self.min_replica_count} must be less than "
                f"MaxReplicaCount={self.max_replica_count}"
            )
        idle = self.idle_replica_count
        if idle is not None and idle >= self.min_replica_count:
            lo = self.min_replica_count
            raise ValueError(f"IdleReplicaCount={idle} must be less than MinReplicaCount={lo}")


def keda_milli(value: float) -> float:
    """What KEDA hands the HPA: ``resource.NewMilliQuantity(int64(value * 1000))``."""
    return math.trunc(value * 1000.0) / 1000.0


class ScaledObjectController:
    """KEDA's scale loop for one ScaledObject plus the HPA it owns (``keda-hpa-<name>``)."""

    def __init__(
        self,
        spec: ScaledObjectSpec,
        hpa_config: ControllerConfig | None = None,
        *,
        created_s: float = 0.0,
        poll_phase_s: float = 0.0,
        name: str = "keda",
    ) -> None:
        self.spec = spec
        self._name = name
        self._created_s = created_s
        self._next_poll = created_s + poll_phase_s
        self._last_active_s: float | None = None
        self._cached: dict[str, float] = {}
        metrics = tuple(
            MetricSpec("External", t.metric, t.metric_type, keda_milli(t.target))
            for t in spec.triggers
        )
        hpa_spec = HPASpec(
            metrics,
            max_replicas=spec.max_replica_count,
            min_replicas=max(spec.min_replica_count, 1),  # GetHPAMinReplicas
            behavior=spec.behavior,
        )
        self.hpa = HorizontalPodAutoscaler(
            hpa_spec, hpa_config, created_s=created_s, name=f"keda-hpa-{name}"
        )
        self.history: list[SyncRecord] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def last_active_s(self) -> float | None:
        return self._last_active_s

    def next_due_s(self) -> float:
        return min(self._next_poll, self.hpa.next_due_s())

    def observe(self, now: float, metrics: Observation) -> int:
        spec = metrics.spec_replicas
        if now >= self._next_poll:
            self._next_poll = now + self.spec.polling_interval_s
            spec = self._request_scale(now, metrics)
        if now >= self.hpa.next_due_s():
            spec = self.hpa.observe(now, self._hpa_view(metrics, spec))
        return spec

    def _hpa_view(self, obs: Observation, spec: int) -> Observation:
        """What the HPA gets from KEDA's metrics server: each trigger's value, milli-truncated."""
        external: dict[str, tuple[float, ...]] = {}
        for t in self.spec.triggers:
            value = self._cached.get(t.metric) if t.use_cached_metrics else _value(obs, t.metric)
            if value is not None:
                external[t.metric] = (keda_milli(value),)
        return replace(obs, spec_replicas=spec, external=external)

    def _request_scale(self, now: float, obs: Observation) -> int:
        """``RequestScale`` after ``checkScalers`` decided ``is_active`` / ``is_error``."""
        active, error = False, False
        for t in self.spec.triggers:
            value = _value(obs, t.metric)
            if value is None:
                error = True
                continue
            self._cached[t.metric] = value
            active = active or value > t.activation_target
        current = obs.spec_replicas
        lo, idle = self.spec.min_replica_count, self.spec.idle_replica_count
        desired, why = current, "no change"
        if active:
            if (idle is not None and current < lo) or current == 0:
                desired, why = (lo if lo > 0 else 1), "activated"
            if not error or desired != current:
                self._last_active_s = now
        elif error:
            why = "trigger error (no fallback): no change"
        elif (idle is not None and current > idle) or (current > 0 and lo == 0):
            if self._cooled_down(now):
                desired, why = (idle if idle is not None else lo), "deactivated"
            else:
                why = "cooling down"
        elif idle is None and current < lo:
            desired, why = lo, "below minReplicaCount"
        self.history.append(SyncRecord(now, self._name, current, None, desired, why))
        if desired != current:
            logger.debug("%s: %d -> %d (%s)", self._name, current, desired, why)
        return desired

    def _cooled_down(self, now: float) -> bool:
        if self._last_active_s is None:
            return self._created_s + self.spec.initial_cooldown_period_s < now
        return self._last_active_s + self.spec.cooldown_period_s < now


def _value(obs: Observation, metric: str) -> float | None:
    series = obs.external.get(metric)
    if not series:
        return None
    return sum(series)
