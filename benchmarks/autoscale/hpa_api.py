"""The ``autoscaling/v2`` HorizontalPodAutoscaler API objects the model takes: types, validation,
defaulting.

Followed: the API reference (HorizontalPodAutoscalerSpec, MetricSpec, HPAScalingRules,
HPAScalingPolicy), ``pkg/apis/autoscaling/v2/defaults.go`` (``SetDefaults_HorizontalPodAutoscaler``:
``minReplicas`` 1 and 80% CPU when no metrics; ``GenerateHPAScaleUpRules``: 0 s window, ``Max``
of +4 pods / +100% per 15 s; ``GenerateHPAScaleDownRules``: ``Max``, -100% per 15 s, window
left nil for the controller's ``--horizontal-pod-autoscaler-downscale-stabilization``) and
``pkg/apis/autoscaling/validation`` (policy value > 0, periodSeconds in (0, 1800], window in
[0, 3600], at least one policy, tolerance >= 0, minReplicas >= 1 unless HPAScaleToZero).
Invalid objects raise ``ValueError`` naming the field, as the API server would reject them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from benchmarks.autoscale import replica_calc as rc

SourceType = Literal["Resource", "Pods", "Object", "External"]
TargetType = Literal["Utilization", "Value", "AverageValue"]
SelectPolicy = Literal["Max", "Min", "Disabled"]

_ALLOWED_TARGETS: dict[str, tuple[str, ...]] = {
    "Resource": ("Utilization", "AverageValue"),
    "Pods": ("AverageValue",),
    "Object": ("Value", "AverageValue"),
    "External": ("Value", "AverageValue"),
}


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One ``spec.metrics[]`` entry. ``target`` is a percentage for Utilization."""

    source: SourceType
    name: str
    target_type: TargetType
    target: float

    def __post_init__(self) -> None:
        if self.target_type not in _ALLOWED_TARGETS[self.source]:
            raise ValueError(f"{self.source} metric {self.name!r}: bad target {self.target_type}")
        if self.target <= 0:
            raise ValueError(f"metric {self.name!r}: target must be > 0, got {self.target}")


@dataclass(frozen=True, slots=True)
class ScalingPolicy:
    type: Literal["Pods", "Percent"]
    value: int
    period_s: int

    def __post_init__(self) -> None:
        if self.value <= 0 or not 0 < self.period_s <= 1800:
            raise ValueError(f"policy {self}: value must be > 0 and periodSeconds in (0, 1800]")


@dataclass(frozen=True, slots=True)
class ScalingRules:
    """``HPAScalingRules``; None fields take the API defaults."""

    stabilization_window_s: int | None = None
    select_policy: SelectPolicy | None = None
    policies: tuple[ScalingPolicy, ...] | None = None
    tolerance: float | None = None

    def __post_init__(self) -> None:
        w = self.stabilization_window_s
        if w is not None and not 0 <= w <= 3600:
            raise ValueError(f"stabilizationWindowSeconds must be in [0, 3600], got {w}")
        if self.policies is not None and not self.policies:
            raise ValueError("policies: must specify at least one policy")
        if self.tolerance is not None and self.tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance}")


@dataclass(frozen=True, slots=True)
class Behavior:
    scale_up: ScalingRules | None = None
    scale_down: ScalingRules | None = None


@dataclass(frozen=True, slots=True)
class HPASpec:
    metrics: tuple[MetricSpec, ...]
    max_replicas: int
    min_replicas: int = 1
    behavior: Behavior | None = None


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """kube-controller-manager flags and feature gates (defaults: the controller's).

    ``semantics="v1.20"`` reproduces the v1.20.2 controller (the binary ``mk/autoscale.mk``
    builds for the conformance check) where its code differs from master; see ``hpa`` and
    ``replica_calc``.
    """

    sync_period_s: float = 15.0  # --horizontal-pod-autoscaler-sync-period
    tolerance: float = 0.1  # --horizontal-pod-autoscaler-tolerance
    downscale_stabilization_s: float = 300.0  # --horizontal-pod-autoscaler-downscale-stabilization
    readiness: rc.ReadinessFlags = field(default_factory=rc.ReadinessFlags)
    configurable_tolerance: bool = True  # HPAConfigurableTolerance (beta, on since 1.35)
    scale_to_zero: bool = False  # HPAScaleToZero (alpha, off)
    semantics: rc.Semantics = "current"


@dataclass(frozen=True, slots=True)
class DefaultedRules:
    """Fully defaulted rules for one direction."""

    window_s: float
    select: SelectPolicy
    policies: tuple[ScalingPolicy, ...]

    @property
    def longest_period_s(self) -> int:
        return max((p.period_s for p in self.policies), default=0)


_UP = DefaultedRules(0, "Max", (ScalingPolicy("Pods", 4, 15), ScalingPolicy("Percent", 100, 15)))
_DOWN_POLICIES = (ScalingPolicy("Percent", 100, 15),)


def validated(spec: HPASpec, config: ControllerConfig) -> HPASpec:
    """API validation and defaulting (an empty metric list defaults to 80% CPU)."""
    if not spec.metrics:
        spec = HPASpec(
            (MetricSpec("Resource", "cpu", "Utilization", 80),),
            spec.max_replicas,
            spec.min_replicas,
            spec.behavior,
        )
    has_obj_ext = any(m.source in ("Object", "External") for m in spec.metrics)
    floor = 0 if config.scale_to_zero and has_obj_ext else 1
    if spec.min_replicas < floor:
        raise ValueError(
            f"minReplicas must be >= {floor}, got {spec.min_replicas} (0 needs the alpha "
            "HPAScaleToZero gate and an Object or External metric)"
        )
    if spec.max_replicas < max(1, spec.min_replicas):
        raise ValueError(f"maxReplicas {spec.max_replicas} must be >= minReplicas and >= 1")
    return spec


def defaulted_rules(
    behavior: Behavior | None, downscale_stabilization_s: float
) -> tuple[DefaultedRules, DefaultedRules]:
    """(scale-up, scale-down) rules with every nil field defaulted, as the controller sees them.

    A nil scale-down window takes the controller flag (``maybeInitScaleDownStabilizationWindow``).
    """
    b = behavior or Behavior()
    up, down = b.scale_up or ScalingRules(), b.scale_down or ScalingRules()
    up_rules = DefaultedRules(
        _UP.window_s if up.stabilization_window_s is None else up.stabilization_window_s,
        up.select_policy or _UP.select,
        up.policies or _UP.policies,
    )
    down_window = (
        downscale_stabilization_s
        if down.stabilization_window_s is None
        else down.stabilization_window_s
    )
    return up_rules, DefaultedRules(
        down_window, down.select_policy or "Max", down.policies or _DOWN_POLICIES
    )
