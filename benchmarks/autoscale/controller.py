"""What an autoscaling controller sees, and the one call the experiment driver makes on it.

A controller (``hpa.HorizontalPodAutoscaler``, ``keda.ScaledObjectController``) is pure and
clock-driven: the driver (the discrete-event simulator or the live demo) builds an
``Observation`` — what the real controller would read from the API server and the metrics APIs
at that instant — and calls ``observe(now, observation)``; the return value is what the
controller writes into the target's ``scale.spec.replicas``. Nothing here reads a clock.

Invariants:
- ``observe`` returns ``observation.spec_replicas`` unchanged when none of the controller's
  loops is due at ``now`` (a real controller writes the scale subresource only when it syncs).
- ``next_due_s()`` is the earliest virtual time at which ``observe`` can change anything; a
  driver that calls at exactly those times reproduces the controller's own schedule.
- A metric that could not be fetched is absent from the mapping (an error), never 0; a replica
  absent from a per-replica metric is a replica with a *missing* metric (the controller's
  ``missingPods``), which is a different thing again.

A driver loop::

    ctl = HorizontalPodAutoscaler(HPASpec((MetricSpec("Pods", "waiting", "AverageValue", 4),), 16))
    while sim.now < end:
        sim.run_until(ctl.next_due_s())
        sim.set_spec_replicas(ctl.observe(sim.now, sim.observation()))

Which source a signal is: per-replica scrapes (KV usage, ``num_requests_waiting``, the busy
fraction) are ``Pods`` metrics; the gateway's own series (concurrency, request rate) describe no
pod and reach the HPA as ``External`` (Prometheus Adapter external rules, or KEDA) — with an
``AverageValue`` target that is ``ceil(total / target)``, defined at zero replicas too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

Phase = Literal["Pending", "Running", "Succeeded", "Failed"]


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One replica (pod) matched by the target's selector, as the HPA's pod lister sees it.

    ``ready_transition_s`` is the PodReady condition's lastTransitionTime (None: the pod has no
    PodReady condition yet); ``start_s`` is pod.status.startTime (None: not started). Both only
    matter for CPU resource metrics. ``requests`` are container requests summed per resource,
    in the metric's unit (cores for cpu), needed for Utilization targets.
    """

    name: str
    phase: Phase = "Running"
    ready: bool = True
    deleting: bool = False
    start_s: float | None = 0.0
    ready_transition_s: float | None = 0.0
    requests: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PodSample:
    """One per-replica metric point: value, when it was taken and over what window."""

    value: float
    timestamp_s: float = 0.0
    window_s: float = 60.0  # metricServerDefaultMetricWindow in the HPA's REST metrics client


@dataclass(frozen=True, slots=True)
class Observation:
    """Everything one sync reads. Keys of the metric maps are metric names.

    ``spec_replicas`` / ``status_replicas`` are the target's scale subresource
    (``.spec.replicas`` and ``.status.replicas``; the latter counts replicas that exist, ready or
    not). ``pods`` is the custom metrics API (``Pods`` sources), ``resources`` the resource
    metrics API (``Resource`` sources: cpu, memory), ``objects`` one value per ``Object`` source,
    ``external`` the list of series values returned for an ``External`` source (the HPA sums
    them).
    """

    spec_replicas: int
    status_replicas: int
    replicas: tuple[ReplicaStatus, ...] = ()
    pods: Mapping[str, Mapping[str, PodSample]] = field(default_factory=dict)
    resources: Mapping[str, Mapping[str, PodSample]] = field(default_factory=dict)
    objects: Mapping[str, float] = field(default_factory=dict)
    external: Mapping[str, tuple[float, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SyncRecord:
    """One controller decision, for plots (the ``kubectl get hpa -w`` picture) and tests."""

    t: float
    controller: str
    current: int
    proposal: int | None  # raw metric proposal before stabilisation/limits (None: not computed)
    desired: int
    reason: str


class ScalingController(Protocol):
    """The interface the autoscaling experiment drives."""

    @property
    def name(self) -> str: ...

    def next_due_s(self) -> float:
        """Virtual time of the next loop that may act."""
        ...

    def observe(self, now: float, metrics: Observation) -> int:
        """Run every loop due at ``now``; return the desired ``scale.spec.replicas``."""
        ...
