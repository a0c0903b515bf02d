"""The HPA's per-metric replica proposal: a line-by-line port of Kubernetes' ReplicaCalculator.

Source followed: kubernetes/kubernetes ``pkg/controller/podautoscaler/replica_calculator.go``
(``GetResourceReplicas``, ``GetRawResourceReplicas``, ``GetMetricReplicas``,
``calcPlainMetricReplicas``, ``GetObjectMetricReplicas``, ``GetObjectPerPodMetricReplicas``,
``getUsageRatioReplicaCount``, ``getReadyPodsCount``, ``GetExternalMetricReplicas``,
``GetExternalPerPodMetricReplicas``, ``groupPods``, ``Tolerances.isWithin``) and
``metrics/utilization.go`` (``GetResourceUtilizationRatio``, ``GetMetricUsageRatio``), read at
master (2026, with per-direction ``Tolerances``) and at v1.20.2 (Debian's ``kubernetes``
source package, the version ``mk/kube.mk`` builds). The prose version is the "Algorithm
details" section of https://kubernetes.io/docs/concepts/workloads/autoscaling/horizontal-pod-autoscale/
(formerly /docs/tasks/run-application/horizontal-pod-autoscale/).

Numbers are handled as the controller handles them: every metric and target is a
``resource.Quantity`` read with ``MilliValue()`` (an int64 of thousandths, rounded up), averages
are int64 divisions (truncated), utilisation is an int32 percentage (truncated), ratios are
float64 and replica counts ``ceil``'d — so a model run and a real controller agree exactly, not
approximately.

Semantics that differ between v1.20 and current, selected by ``semantics``:
- tolerance test: v1.20 ``|1 - ratio| <= tolerance``; current ``1-down <= ratio <= 1+up``
  (they disagree at the exact boundary: ratio 1.1 is inside for current, outside for v1.20);
- plain (Pods) metrics with missing pods: v1.20 treats ``ratio == 1`` as a scale-up (fills 0);
  current leaves it alone, and adds the "metric count reverses the direction" guard;
- Resource Utilization, missing pods on scale-down: v1.20 assumes 100% of the request, current
  ``max(100%, target)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from benchmarks.autoscale.controller import PodSample, ReplicaStatus

Semantics = Literal["current", "v1.20"]
MAX_INT32 = 2**31 - 1


class MetricError(Exception):
    """The controller could not turn this metric into a proposal (it sets ScalingActive=False)."""


def milli(value: float) -> int:
    """``resource.Quantity.MilliValue()``: thousandths, rounded up (the float noise removed)."""
    return math.ceil(round(value * 1000.0, 6))


def _trunc_div(a: int, b: int) -> int:
    """Go's int64 division, which truncates toward zero (Python's ``//`` floors)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _ceil_replicas(x: float) -> int:
    # int32(math.Ceil(x)); the controller caps at MaxInt32 where it can overflow.
    if math.isnan(x):
        raise MetricError("replica proposal is NaN")
    return MAX_INT32 if x > MAX_INT32 else math.ceil(x)


@dataclass(frozen=True, slots=True)
class Tolerances:
    """``Tolerances`` (master) or the single ``c.tolerance`` (v1.20)."""

    scale_down: float = 0.1
    scale_up: float = 0.1
    semantics: Semantics = "current"

    def within(self, ratio: float) -> bool:
        if math.isnan(ratio):
            return False
        if self.semantics == "v1.20":
            return abs(1.0 - ratio) <= self.scale_up
        return (1.0 - self.scale_down) <= ratio <= (1.0 + self.scale_up)


@dataclass(frozen=True, slots=True)
class ReadinessFlags:
    """The two kube-controller-manager flags that only matter for CPU metrics."""

    cpu_initialization_period_s: float = (
        300.0  # --horizontal-pod-autoscaler-cpu-initialization-period
    )
    initial_readiness_delay_s: float = 30.0  # --horizontal-pod-autoscaler-initial-readiness-delay


@dataclass(slots=True)
class _Groups:
    ready: int
    unready: set[str]
    missing: set[str]
    ignored: set[str]


def group_pods(
    replicas: tuple[ReplicaStatus, ...],
    samples: Mapping[str, PodSample],
    resource: str,
    flags: ReadinessFlags,
    now: float,
) -> _Groups:
    """``groupPods``: deleted/failed pods ignored, Pending unready, no sample = missing.

    Only for the cpu resource does a Running pod's readiness matter (unready, or its sample
    predates one metric window after it became ready while still initialising).
    """
    g = _Groups(0, set(), set(), set())
    for r in replicas:
        if r.deleting or r.phase == "Failed":
            g.ignored.add(r.name)
            continue
        if r.phase == "Pending":
            g.unready.add(r.name)
            continue
        sample = samples.get(r.name)
        if sample is None:
            g.missing.add(r.name)
            continue
        if resource == "cpu" and _cpu_unready(r, sample, flags, now):
            g.unready.add(r.name)
            continue
        g.ready += 1
    return g


def _cpu_unready(r: ReplicaStatus, s: PodSample, flags: ReadinessFlags, now: float) -> bool:
    if r.ready_transition_s is None or r.start_s is None:
        return True
    if r.start_s + flags.cpu_initialization_period_s > now:
        return not r.ready or s.timestamp_s < r.ready_transition_s + s.window_s
    return not r.ready and r.start_s + flags.initial_readiness_delay_s > r.ready_transition_s


def _grouped_metrics(
    samples: Mapping[str, PodSample],
    replicas: tuple[ReplicaStatus, ...],
    resource: str,
    flags: ReadinessFlags,
    now: float,
) -> tuple[_Groups, dict[str, int]]:
    """The opening both per-pod calculations share: the pods grouped, and the milli-values of
    the samples of pods neither ignored nor unready (missing pods have none)."""
    if not replicas:
        raise MetricError("no pods returned by selector while calculating replica count")
    g = group_pods(replicas, samples, resource, flags, now)
    metrics = {
        name: milli(s.value)
        for name, s in samples.items()
        if name not in g.ignored and name not in g.unready
    }
    if not metrics:
        raise MetricError("did not receive metrics for targeted pods (pods might be unready)")
    return g, metrics


def _metric_usage_ratio(metrics: Mapping[str, int], target: int) -> tuple[float, int]:
    """``GetMetricUsageRatio``: the int64 mean of milli-values over the target."""
    usage = _trunc_div(sum(metrics.values()), len(metrics))
    return usage / target, usage


def plain_metric_replicas(
    samples: Mapping[str, PodSample],
    replicas: tuple[ReplicaStatus, ...],
    current: int,
    target: float,
    tol: Tolerances,
    *,
    resource: str = "",
    flags: ReadinessFlags = ReadinessFlags(),
    now: float = 0.0,
) -> tuple[int, int]:
    """``calcPlainMetricReplicas`` (Pods metrics, and Resource metrics with an AverageValue)."""
    g, metrics = _grouped_metrics(samples, replicas, resource, flags, now)
    target_m = milli(target)
    ratio, usage = _metric_usage_ratio(metrics, target_m)
    scale_up_with_unready = bool(g.unready) and ratio > 1.0
    if not scale_up_with_unready and not g.missing:
        if tol.within(ratio):
            return current, usage
        return _ceil_replicas(ratio * g.ready), usage

    legacy = tol.semantics == "v1.20"
    if g.missing:
        if ratio < 1.0:
            metrics.update(dict.fromkeys(g.missing, target_m))
        elif ratio > 1.0 or legacy:  # v1.20's plain `else` also fills 0 at ratio == 1.0
            metrics.update(dict.fromkeys(g.missing, 0))
    if scale_up_with_unready:
        metrics.update(dict.fromkeys(g.unready, 0))
    new_ratio, _ = _metric_usage_ratio(metrics, target_m)
    return _settle(current, ratio, new_ratio, len(metrics), tol, guard=not legacy), usage


def _settle(
    current: int, ratio: float, new_ratio: float, n: int, tol: Tolerances, *, guard: bool
) -> int:
    """The common tail: no action inside the tolerance or when the fill reversed direction."""
    if (
        tol.within(new_ratio)
        or (ratio < 1.0 and new_ratio > 1.0)
        or (ratio > 1.0 and new_ratio < 1.0)
    ):
        return current
    proposal = _ceil_replicas(new_ratio * n)
    if guard and (
        (new_ratio < 1.0 and proposal > current) or (new_ratio > 1.0 and proposal < current)
    ):
        return current
    return proposal


def resource_utilization_replicas(
    samples: Mapping[str, PodSample],
    replicas: tuple[ReplicaStatus, ...],
    current: int,
    target_percent: int,
    resource: str,
    tol: Tolerances,
    *,
    flags: ReadinessFlags = ReadinessFlags(),
    now: float = 0.0,
) -> tuple[int, int]:
    """``GetResourceReplicas``: a Utilization target, as a percentage of the pods' requests."""
    g, metrics = _grouped_metrics(samples, replicas, resource, flags, now)
    requests: dict[str, int] = {}
    for r in replicas:
        if resource not in r.requests:
            raise MetricError(f"missing request for {resource} in pod {r.name}")
        requests[r.name] = milli(r.requests[resource])

    def utilization(m: Mapping[str, int]) -> tuple[float, int]:
        used = sum(v for k, v in m.items() if k in requests)
        requested = sum(requests[k] for k in m if k in requests)
        if requested == 0:
            raise MetricError("no metrics returned matched known pods")
        percent = _trunc_div(used * 100, requested)
        return percent / target_percent, percent

    ratio, percent = utilization(metrics)
    scale_up_with_unready = bool(g.unready) and ratio > 1.0
    if not scale_up_with_unready and not g.missing:
        if tol.within(ratio):
            return current, percent
        return _ceil_replicas(ratio * g.ready), percent
    if g.missing:
        if ratio < 1.0:
            fill = 100 if tol.semantics == "v1.20" else max(100, target_percent)
            metrics.update({p: _trunc_div(requests[p] * fill, 100) for p in g.missing})
        elif ratio > 1.0:
            metrics.update(dict.fromkeys(g.missing, 0))
    if scale_up_with_unready:
        metrics.update(dict.fromkeys(g.unready, 0))
    new_ratio, _ = utilization(metrics)
    return _settle(current, ratio, new_ratio, len(metrics), tol, guard=True), percent


def ready_replica_count(replicas: tuple[ReplicaStatus, ...]) -> int:
    """``getReadyPodsCount``: Running and Ready (a terminating pod that is still Ready counts)."""
    if not replicas:
        raise MetricError("no pods returned by selector while calculating replica count")
    return sum(1 for r in replicas if r.phase == "Running" and r.ready)


def usage_ratio_replicas(
    current: int, ratio: float, tol: Tolerances, replicas: tuple[ReplicaStatus, ...]
) -> int:
    """``getUsageRatioReplicaCount`` (Object and External metrics with a Value target)."""
    if current == 0:
        return _ceil_replicas(ratio)  # only reachable with the HPAScaleToZero gate
    if tol.within(ratio):
        return current
    return _ceil_replicas(ratio * ready_replica_count(replicas))


def value_replicas(
    usage: float | tuple[float, ...],
    target: float,
    current: int,
    tol: Tolerances,
    replicas: tuple[ReplicaStatus, ...],
) -> tuple[int, int]:
    """Object (one value) or External (summed series) metric against a Value target."""
    used = _sum_milli(usage)
    return usage_ratio_replicas(current, used / milli(target), tol, replicas), used


def average_value_replicas(
    usage: float | tuple[float, ...], target: float, status_replicas: int, tol: Tolerances
) -> tuple[int, int]:
    """``GetObjectPerPodMetricReplicas`` / ``GetExternalPerPodMetricReplicas``.

    The proposal is ``ceil(total / target)``: readiness plays no part, and ``status_replicas``
    (replicas that exist, ready or not) only decides whether the change is inside the tolerance.
    """
    used = _sum_milli(usage)
    target_m = milli(target)
    if status_replicas == 0:
        ratio = math.nan if used == 0 else math.inf  # Go's float64 x/0
    else:
        ratio = used / (target_m * status_replicas)
    proposal = status_replicas
    if not tol.within(ratio):
        proposal = _ceil_replicas(used / target_m)
    average = used if status_replicas == 0 else math.ceil(used / status_replicas)
    return proposal, average


def _sum_milli(usage: float | tuple[float, ...]) -> int:
    if isinstance(usage, tuple):
        if not usage:
            raise MetricError("no metrics returned from external metrics API")
        return sum(milli(v) for v in usage)
    return milli(usage)
