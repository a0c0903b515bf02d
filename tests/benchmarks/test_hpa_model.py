"""The HPA model against worked examples from the Kubernetes documentation and controller code.

Docs: https://kubernetes.io/docs/concepts/workloads/autoscaling/horizontal-pod-autoscale/
("Algorithm details", "Configurable scaling behavior"); the v1.33 configurable-tolerance blog
post's 50-replica example. Code: pkg/controller/podautoscaler/{horizontal,replica_calculator}.go.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pytest

from benchmarks.autoscale import replica_calc as rc
from benchmarks.autoscale.controller import Observation, PodSample, ReplicaStatus
from benchmarks.autoscale.hpa import HorizontalPodAutoscaler, RateLimits, ScaleEvent
from benchmarks.autoscale.hpa_api import (
    Behavior,
    ControllerConfig,
    HPASpec,
    MetricSpec,
    ScalingPolicy,
    ScalingRules,
    defaulted_rules,
)

PODS = MetricSpec("Pods", "m", "AverageValue", 0.1)  # 100m


def pods_obs(
    values: Mapping[str, float | None],
    *,
    pending: int = 0,
    unready: frozenset[str] = frozenset(),
    spec: int | None = None,
    metric: str = "m",
) -> Observation:
    """Running replicas named by ``values`` (None: no metric for it) plus ``pending`` Pending."""
    replicas = [ReplicaStatus(n, ready=n not in unready) for n in values]
    replicas += [
        ReplicaStatus(f"pending-{i}", phase="Pending", ready=False) for i in range(pending)
    ]
    samples = {n: PodSample(v) for n, v in values.items() if v is not None}
    n = len(replicas)
    return Observation(
        spec_replicas=n if spec is None else spec,
        status_replicas=n,
        replicas=tuple(replicas),
        pods={metric: samples},
    )


def each(n: int, value: float | None) -> dict[str, float | None]:
    return {f"r{i}": value for i in range(n)}


def external_obs(total: float, spec: int, *, ready: int | None = None) -> Observation:
    ready = spec if ready is None else ready
    replicas = tuple(ReplicaStatus(f"r{i}", ready=i < ready) for i in range(spec))
    return Observation(spec, spec, replicas, external={"queue": (total,)})


def proposal(obs: Observation, metric: MetricSpec = PODS, **config: object) -> int:
    """One sync with no history, no limits: the metric's raw proposal, clamped to [1, 1000]."""
    hpa = HorizontalPodAutoscaler(
        HPASpec((metric,), max_replicas=1000, behavior=_WIDE_OPEN),
        ControllerConfig(**config),  # type: ignore[arg-type]
    )
    hpa.reconcile(0.0, obs)
    result = hpa.history[-1].proposal
    assert result is not None
    return result


# No stabilisation, no rate limit: the raw proposal passes straight through.
_WIDE_OPEN = Behavior(
    ScalingRules(0, "Max", (ScalingPolicy("Percent", 100_000, 1),)),
    ScalingRules(0, "Max", (ScalingPolicy("Percent", 100, 1),)),
)


# -- Algorithm details ---------------------------------------------------------------------

ALGORITHM: dict[str, tuple[Observation, int]] = {
    # "if the current metric value is 200m, and the desired value is 100m, the number of
    # replicas will be doubled"; "50m ... you'll halve the number of replicas"
    "doc_200m_vs_100m_doubles": (pods_obs(each(3, 0.2)), 6),
    "doc_50m_vs_100m_halves": (pods_obs(each(4, 0.05)), 2),
    # "skips any scaling action if the ratio is sufficiently close to 1.0 (within ... 0.1)"
    "within_tolerance_up": (pods_obs(each(10, 0.105)), 10),
    "within_tolerance_down": (pods_obs(each(10, 0.092)), 10),
    "just_outside_tolerance": (pods_obs(each(10, 0.111)), 12),  # ceil(1.11 * 10)
    "exact_boundary_is_inside": (pods_obs(each(10, 0.110)), 10),  # 1.1 <= 1.0 + 0.1
    # the mean is an int64 of milli-units: (100 + 101 + 101) // 3 = 100 -> ratio 1.0
    "mean_truncates_in_milli_units": (pods_obs({"a": 0.1, "b": 0.101, "c": 0.101}), 3),
    # missing metrics on a scale-down count as 100% of target: (3 x 50 + 100) // 4 = 62
    "missing_pod_dampens_scale_down": (pods_obs({**each(3, 0.05), "x": None}), 3),
    # ... and as 0 on a scale-up; a fill that reverses the direction means no action
    # (1 x 180 / 3 = 60 < 100 although 180 > 100): 3, never ceil(1.8 x 1) = 2
    "missing_pods_never_turn_up_into_down": (pods_obs({"a": 0.18, "x": None, "y": None}), 3),
    # not-yet-ready (Pending) pods count as 0 on a scale-up: (2 x 115) / 4 -> reversal
    "pending_pods_dampen_scale_up": (pods_obs(each(2, 0.115), pending=2), 4),
    "pending_pods_scale_up_fill": (pods_obs(each(2, 0.25), pending=1), 5),  # 500//3 -> 1.66
    # ... and are simply set aside on a scale-down
    "pending_pods_ignored_on_scale_down": (pods_obs(each(2, 0.05), pending=2), 1),
    # readiness only matters for CPU: a Running-but-unready replica's metric counts as is
    "unready_running_counts_for_pods_metrics": (
        pods_obs({"a": 0.2, "b": 0.2, "loading": 0.0}, unready=frozenset({"loading"})),
        4,
    ),
}


@pytest.mark.parametrize("obs,expected", ALGORITHM.values(), ids=ALGORITHM.keys())
def test_algorithm_details(obs: Observation, expected: int) -> None:
    assert proposal(obs) == expected


def test_v120_tolerance_test_differs_at_the_exact_boundary() -> None:
    # v1.20 tested |1 - ratio| <= 0.1, and |1 - 1.1| = 0.10000000000000009 in float64.
    obs = pods_obs(each(10, 0.110))
    assert proposal(obs) == 10
    assert proposal(obs, semantics="v1.20") == 11


def test_blog_example_50_replicas_90_percent_cpu_against_75() -> None:
    # kubernetes.io/blog/2025/04/28/kubernetes-v1-33-hpa-configurable-tolerance: 50 x 90/75 = 60
    # long-running, Ready pods: outside the CPU initialization period
    replicas = tuple(
        ReplicaStatus(f"r{i}", start_s=-1000.0, ready_transition_s=-990.0, requests={"cpu": 1.0})
        for i in range(50)
    )
    cpu = {r.name: PodSample(0.9, timestamp_s=-1.0) for r in replicas}
    obs = Observation(50, 50, replicas, resources={"cpu": cpu})
    metric = MetricSpec("Resource", "cpu", "Utilization", 75)
    assert proposal(obs, metric) == 60
    # the blog's point: with a 25% scale-up tolerance the same HPA would not move
    rules = ScalingRules(tolerance=0.25)
    hpa = HorizontalPodAutoscaler(HPASpec((metric,), 100, behavior=Behavior(scale_up=rules)))
    assert hpa.reconcile(0.0, obs) == 50


def test_configurable_tolerance_needs_the_gate() -> None:
    obs = pods_obs(each(10, 0.105))  # ratio 1.05: inside the default 10%
    rules = ScalingRules(tolerance=0.02)
    spec = HPASpec((PODS,), 100, behavior=Behavior(scale_up=rules))
    assert HorizontalPodAutoscaler(spec).reconcile(0.0, obs) == 11
    gate_off = ControllerConfig(configurable_tolerance=False)
    assert HorizontalPodAutoscaler(spec, gate_off).reconcile(0.0, obs) == 10


def test_cpu_readiness_sets_unready_pods_aside() -> None:
    # For cpu, a pod still in its initialization period whose sample predates one metric
    # window after it became ready is set aside (and counts 0 on a scale-up).
    now = 100.0
    fresh = ReplicaStatus("fresh", start_s=60.0, ready_transition_s=90.0, requests={"cpu": 1.0})
    old = ReplicaStatus("old", start_s=-1000.0, ready_transition_s=-990.0, requests={"cpu": 1.0})
    samples = {"fresh": PodSample(2.0, timestamp_s=99.0), "old": PodSample(2.0, timestamp_s=99.0)}
    groups = rc.group_pods((fresh, old), samples, "cpu", rc.ReadinessFlags(), now)
    assert groups.unready == {"fresh"} and groups.ready == 1
    # the same pods on a Pods metric are both ready: readiness is a CPU-only rule
    groups = rc.group_pods((fresh, old), samples, "", rc.ReadinessFlags(), now)
    assert groups.unready == set() and groups.ready == 2


EXTERNAL = MetricSpec("External", "queue", "AverageValue", 100)
EXTERNAL_VALUE = MetricSpec("External", "queue", "Value", 100)

EXTERNAL_CASES: dict[str, tuple[MetricSpec, Observation, int]] = {
    # AverageValue: ceil(total / target); readiness plays no part
    "average_value_is_total_over_target": (EXTERNAL, external_obs(950, 3, ready=1), 10),
    "average_value_tolerance_uses_status_replicas": (EXTERNAL, external_obs(310, 3), 3),
    "average_value_to_one": (EXTERNAL, external_obs(0, 3), 1),  # ceil(0) = 0, clamped to min
    # Value: ratio x the number of Running *and Ready* replicas
    "value_counts_ready_replicas": (EXTERNAL_VALUE, external_obs(300, 3, ready=2), 6),
    "value_within_tolerance": (EXTERNAL_VALUE, external_obs(105, 3, ready=1), 3),
}


@pytest.mark.parametrize(
    "metric,obs,expected",
    EXTERNAL_CASES.values(),
    ids=EXTERNAL_CASES.keys(),
)
def test_external_metric_semantics(metric: MetricSpec, obs: Observation, expected: int) -> None:
    hpa = HorizontalPodAutoscaler(HPASpec((metric,), 1000, behavior=_WIDE_OPEN))
    assert hpa.reconcile(0.0, obs) == expected


def test_multiple_metrics_take_the_largest_proposal() -> None:
    obs = pods_obs(each(4, 0.2))  # Pods metric says 8
    obs = Observation(4, 4, obs.replicas, obs.pods, external={"queue": (1200.0,)})  # says 12
    hpa = HorizontalPodAutoscaler(HPASpec((PODS, EXTERNAL), 100, behavior=_WIDE_OPEN))
    assert hpa.reconcile(0.0, obs) == 12


@pytest.mark.parametrize(
    "semantics,queue,expected",
    [
        ("current", 1200.0, 12),  # a failing metric does not stop a scale-up
        ("current", 100.0, 4),  # ... but does stop a scale-down
        ("v1.20", 100.0, 1),  # v1.20 scaled down on the metrics it had
    ],
)
def test_partially_failing_metrics(semantics: str, queue: float, expected: int) -> None:
    obs = Observation(4, 4, pods_obs(each(4, 0.1)).replicas, external={"queue": (queue,)})
    spec = HPASpec((PODS, EXTERNAL), 100, behavior=_WIDE_OPEN)  # PODS has no data at all
    hpa = HorizontalPodAutoscaler(spec, ControllerConfig(semantics=semantics))  # type: ignore[arg-type]
    assert hpa.reconcile(0.0, obs) == expected


def test_all_metrics_failing_means_no_action() -> None:
    hpa = HorizontalPodAutoscaler(HPASpec((EXTERNAL,), 100))
    assert hpa.reconcile(0.0, Observation(3, 3)) == 3
    assert hpa.history[-1].reason.startswith("FailedComputeMetrics")


# -- the controller loop: limits, windows, behavior -----------------------------------------

Step = Callable[[int], Observation]


def run(hpa: HorizontalPodAutoscaler, spec: int, obs: Step, until_s: float, dt: float) -> list[int]:
    """Sync at 0, dt, 2dt, ... < until_s; replicas appear at once (status = spec)."""
    out, t = [], 0.0
    while t < until_s:
        spec = hpa.observe(t, obs(spec))
        out.append(spec)
        t += dt
    return out


def queue(total: float) -> Step:
    return lambda spec: external_obs(total, spec)


@pytest.mark.parametrize(
    "current,max_replicas,expected",
    [(1, 100, 4), (3, 100, 6), (10, 100, 20), (10, 15, 15)],
)
def test_no_behavior_scale_up_cap_is_max_of_double_and_four(
    current: int, max_replicas: int, expected: int
) -> None:
    hpa = HorizontalPodAutoscaler(HPASpec((EXTERNAL,), max_replicas))
    assert hpa.reconcile(0.0, external_obs(100_000, current)) == expected


def test_no_behavior_downscale_stabilization_is_the_max_of_the_last_300_s() -> None:
    hpa = HorizontalPodAutoscaler(HPASpec((EXTERNAL,), 100))
    specs = run(hpa, 10, queue(500), until_s=330, dt=15)
    # recommendations of 10 from t=0 (the initial one and the first sync) hold the count
    # until they are older than the window: Go keeps a sample exactly at the cutoff (t=300)
    assert specs[:21] == [10] * 21
    assert specs[21:] == [5]


def test_doc_example_scale_down_4_pods_or_10_percent_per_minute() -> None:
    # "if there are 80 replicas and the target has to be scaled down to 10 replicas then during
    # the first step 8 replicas will be reduced ... When the number of replicas falls below 40
    # the first policy (Pods) is applied and 4 replicas will be reduced at a time."
    down = ScalingRules(0, None, (ScalingPolicy("Pods", 4, 60), ScalingPolicy("Percent", 10, 60)))
    hpa = HorizontalPodAutoscaler(HPASpec((EXTERNAL,), 100, behavior=Behavior(scale_down=down)))
    specs = run(hpa, 80, queue(1000), until_s=1200, dt=15)
    per_minute = specs[::4]
    assert specs[:4] == [72, 72, 72, 72]  # held while the 8 removed are inside the period
    assert per_minute[:9] == [72, 64, 57, 51, 45, 40, 36, 32, 28]
    assert per_minute[-1] == 10


def test_doc_example_select_policy_min_limits_to_5_pods_per_minute() -> None:
    down = ScalingRules(0, "Min", (ScalingPolicy("Percent", 10, 60), ScalingPolicy("Pods", 5, 60)))
    hpa = HorizontalPodAutoscaler(HPASpec((EXTERNAL,), 100, behavior=Behavior(scale_down=down)))
    assert run(hpa, 80, queue(1000), until_s=120, dt=15)[::4] == [75, 70]


def test_doc_example_disable_scale_down() -> None:
    down = ScalingRules(select_policy="Disabled")
    hpa = HorizontalPodAutoscaler(HPASpec((EXTERNAL,), 100, behavior=Behavior(scale_down=down)))
    assert run(hpa, 8, queue(100), until_s=600, dt=15) == [8] * 40


def test_default_behavior_scales_up_by_4_pods_or_100_percent_per_15_s() -> None:
    hpa = HorizontalPodAutoscaler(HPASpec((EXTERNAL,), 100, behavior=Behavior()))
    assert run(hpa, 1, queue(2000), until_s=45, dt=15) == [5, 10, 20]
    # syncing faster than the policy period: the period-start count holds the limit
    hpa = HorizontalPodAutoscaler(HPASpec((EXTERNAL,), 100, behavior=Behavior()))
    assert run(hpa, 1, queue(2000), until_s=35, dt=5) == [5, 5, 5, 10, 10, 10, 20]


def test_default_behavior_scale_down_waits_300_s_then_drops_at_once() -> None:
    hpa = HorizontalPodAutoscaler(HPASpec((EXTERNAL,), 100, behavior=Behavior()))
    specs = run(hpa, 10, queue(200), until_s=330, dt=15)
    # behavior windows exclude a sample exactly at the cutoff (Go: After(cutoff))
    assert specs[:20] == [10] * 20 and specs[20:] == [2, 2]


def test_scale_up_stabilization_window_takes_the_lowest_recent_recommendation() -> None:
    up = ScalingRules(stabilization_window_s=60)
    hpa = HorizontalPodAutoscaler(HPASpec((EXTERNAL,), 100, behavior=Behavior(scale_up=up)))
    totals = iter([400.0, 900.0, 500.0, 900.0, 900.0, 900.0, 900.0, 900.0])
    specs = run(hpa, 4, lambda s: external_obs(next(totals), s), until_s=120, dt=15)
    # the lowest recommendation of the last 60 s: the 4s of t=0 until t=60, then the 5 of
    # t=30 until it is 60 s old (t=90), then 9
    assert specs == [4, 4, 4, 4, 5, 5, 9, 9]


def test_stabilization_of_current_and_v120_differ() -> None:
    # A low recommendation (3) inside a 60 s scale-up window, then a high proposal (8). Current
    # semantics keep *current* between the lowest scale-up and the highest scale-down
    # recommendation (no change); v1.20 looked only at the window of the proposal's direction
    # and took its lowest value: it scaled *down* to 3 while the metric asked for 8.
    rules = Behavior(scale_up=ScalingRules(stabilization_window_s=60))
    for semantics, expected in (("current", [5, 5]), ("v1.20", [5, 3])):
        hpa = HorizontalPodAutoscaler(
            HPASpec((EXTERNAL,), 100, behavior=rules),
            ControllerConfig(semantics=semantics),  # type: ignore[arg-type]
        )
        out = [hpa.reconcile(t, external_obs(q, 5)) for t, q in ((0.0, 300.0), (15.0, 800.0))]
        assert out == expected, semantics


def test_min_max_and_disabled_at_zero() -> None:
    spec = HPASpec((EXTERNAL,), max_replicas=10, min_replicas=2)
    hpa = HorizontalPodAutoscaler(spec)
    assert hpa.reconcile(0, external_obs(100_000, 0)) == 0  # "implicit maintenance mode"
    assert hpa.history[-1].reason == "ScalingDisabled"
    assert hpa.reconcile(15, external_obs(0, 14)) == 10  # above max: to max, no metrics read
    assert hpa.reconcile(30, external_obs(100_000, 1)) == 2  # below min: to min
    assert hpa.reconcile(45, external_obs(0, 2)) == 2  # proposal 0, clamped to min


def test_hpa_cannot_scale_to_zero_without_the_alpha_gate() -> None:
    with pytest.raises(ValueError, match="minReplicas must be >= 1"):
        HorizontalPodAutoscaler(HPASpec((EXTERNAL,), 10, min_replicas=0))
    with pytest.raises(ValueError, match="minReplicas must be >= 1"):  # gate, but Pods only
        HorizontalPodAutoscaler(
            HPASpec((PODS,), 10, min_replicas=0), ControllerConfig(scale_to_zero=True)
        )


def test_alpha_scale_to_zero_gate_scales_to_and_from_zero() -> None:
    gate = ControllerConfig(scale_to_zero=True)
    metric = MetricSpec("External", "queue", "Value", 100)
    no_window = Behavior(scale_down=ScalingRules(stabilization_window_s=0))
    hpa = HorizontalPodAutoscaler(HPASpec((metric,), 10, 0, no_window), gate)
    assert hpa.reconcile(0, external_obs(0, 2)) == 0  # ceil(0 x ready) = 0 with min 0
    assert hpa.reconcile(15, external_obs(250, 0)) == 3  # from zero: ceil(ratio)
    # a Percent-only scale-up policy can never leave zero: ceil(0 x (1 + p)) = 0
    percent_only = Behavior(
        ScalingRules(0, "Max", (ScalingPolicy("Percent", 900, 15),)), no_window.scale_down
    )
    hpa = HorizontalPodAutoscaler(HPASpec((metric,), 10, 0, percent_only), gate)
    assert hpa.reconcile(0, external_obs(0, 2)) == 0
    assert hpa.reconcile(15, external_obs(250, 0)) == 0


def test_api_validation() -> None:
    with pytest.raises(ValueError, match="bad target"):
        MetricSpec("Pods", "m", "Value", 1)
    with pytest.raises(ValueError, match="periodSeconds"):
        ScalingPolicy("Pods", 1, 1801)
    with pytest.raises(ValueError, match="stabilizationWindowSeconds"):
        ScalingRules(stabilization_window_s=3601)
    with pytest.raises(ValueError, match="at least one policy"):
        ScalingRules(policies=())
    with pytest.raises(ValueError, match="maxReplicas"):
        HorizontalPodAutoscaler(HPASpec((PODS,), max_replicas=1, min_replicas=2))


def test_sync_schedule() -> None:
    hpa = HorizontalPodAutoscaler(HPASpec((EXTERNAL,), 100), created_s=100.0)
    assert hpa.next_due_s() == 100.0  # master syncs a new HPA at once
    assert hpa.observe(99.0, external_obs(1000, 2)) == 2 and not hpa.history
    assert hpa.observe(100.0, external_obs(1000, 2)) == 4
    assert hpa.next_due_s() == 115.0
    assert hpa.observe(110.0, external_obs(1000, 4)) == 4 and len(hpa.history) == 1
    legacy = HorizontalPodAutoscaler(
        HPASpec((EXTERNAL,), 100), ControllerConfig(semantics="v1.20"), created_s=100.0
    )
    assert legacy.next_due_s() == 115.0  # v1.20 enqueued it rate-limited


# -- rows ported from upstream's TestScalingWithRules (horizontal_test.go, v1.20.2) ---------


def rules(
    pods: int, pods_period: int, percent: int, percent_period: int, window: int
) -> ScalingRules:
    """``generateScalingRules``: policies only for non-zero values (none: the defaults)."""
    policies = []
    if pods:
        policies.append(ScalingPolicy("Pods", pods, pods_period))
    if percent:
        policies.append(ScalingPolicy("Percent", percent, percent_period))
    return ScalingRules(window, "Max", tuple(policies) or None)


def events(changes: tuple[int, ...], period_s: int) -> list[ScaleEvent]:
    """``generateEventsUniformDistribution``: one event in the middle of each equal segment of
    the last ``period_s`` (whole seconds, as the Go helper's Duration cast truncates)."""
    segment = period_s / max(1, len(changes))
    return [
        ScaleEvent(c, -float(int(period_s - segment * (i + 1) + segment / 2)))
        for i, c in enumerate(changes)
    ]


E159, E2468, E101010, E812911 = (1, 5, 9), (2, 4, 6), (10, 10, 10), (8, 12, 9, 11)


@dataclass(frozen=True)
class Rate:
    """One TestScalingWithRules row: bounds, current -> desired, expected; rules; events."""

    lo: int
    hi: int
    current: int
    desired: int
    expected: int
    up: ScalingRules | None = None
    down: ScalingRules | None = None
    up_ev: tuple[int, ...] = ()
    down_ev: tuple[int, ...] = ()


r = rules
SCALING_WITH_RULES: dict[str, Rate] = {
    "within range": Rate(3, 8, 5, 7, 7),
    "below minReplicas": Rate(2, 8, 3, 1, 2),
    "max < scaleUpLimit": Rate(1, 10, 20, 1000, 10),
    "more than max": Rate(100, 150, 100, 1000, 150),
    "up limit, user policy": Rate(1, 2000, 3, 1000, 4, up=r(0, 0, 1, 60, 0)),
    "down limit, user policy": Rate(3, 2000, 1000, 3, 980, down=r(20, 60, 0, 0, 0)),
    "up default behavior": Rate(1, 1000, 10, 50, 20),
    "up pods > percent": Rate(1, 1000, 10, 500, 110, up=r(100, 60, 100, 60, 0)),
    "up percent > pods": Rate(1, 1000, 10, 500, 20, up=r(2, 60, 100, 60, 0)),
    "up large pods policy": Rate(1, 1000, 10, 50, 50, up=r(100, 60, 0, 0, 0)),
    "up large percent policy": Rate(1, 1000, 10, 50, 50, up=r(10000, 60, 0, 0, 0)),
    "up pods limit": Rate(1, 1000, 10, 50, 40, up=r(30, 60, 0, 0, 0)),
    "up percent limit": Rate(1, 1000, 10, 50, 30, up=r(0, 0, 200, 60, 0)),
    "down percent > pods": Rate(1, 1000, 100, 2, 80, down=r(20, 60, 1, 60, 300)),
    "down pods > percent": Rate(1, 1000, 100, 2, 98, down=r(2, 60, 1, 60, 300)),
    "down min, large pods": Rate(1, 1000, 10, 0, 1, down=r(100, 60, 0, 0, 300)),
    "down min, large percent": Rate(5, 1000, 10, 2, 5, down=r(0, 0, 100, 60, 300)),
    "down pods limit": Rate(1, 1000, 10, 2, 5, down=r(5, 60, 0, 0, 300)),
    "down percent limit": Rate(1, 1000, 10, 5, 5, down=r(0, 0, 50, 60, 300)),
    "up max, pods, events": Rate(1, 200, 100, 500, 200, r(300, 60, 0, 0, 0), up_ev=E159),
    "up max, percent, events": Rate(1, 200, 100, 500, 200, r(0, 0, 10000, 60, 0), up_ev=E159),
    "up events block": Rate(1, 1000, 100, 500, 100, r(5, 120, 0, 0, 0), up_ev=E159),
    "up pods and events": Rate(1, 1000, 100, 500, 235, r(150, 120, 0, 0, 0), up_ev=E159),
    "up percent and events": Rate(1, 1000, 100, 500, 255, r(0, 0, 200, 120, 0), up_ev=E159),
    "down default and events": Rate(1, 1000, 10, 5, 5, down_ev=E159),
    "down min 1, pods, events": Rate(1, 1000, 100, 0, 1, None, r(115, 120, 0, 0, 300), (), E159),
    "down min 5, pods, events": Rate(5, 1000, 100, 0, 5, None, r(130, 120, 0, 0, 300), (), E159),
    "down min, percent, events": Rate(5, 1000, 100, 2, 5, None, r(0, 0, 100, 120, 300), (), E159),
    "down pods and events": Rate(1, 1000, 100, 2, 100, None, r(5, 120, 0, 0, 300), (), E159),
    "down percent and events": Rate(1, 1000, 100, 0, 56, None, r(0, 0, 50, 120, 300), (), E2468),
    "down events block": Rate(1, 1000, 100, 0, 100, None, r(0, 0, 10, 120, 300), (), E101010),
    "down events allow more": Rate(1, 1000, 10, 5, 5, None, r(0, 0, 1000, 120, 300), (), E101010),
    "up outdated, one policy": Rate(1, 1000, 100, 200, 200, r(1000, 60, 0, 0, 0), None, E812911),
    "up two, not outdated": Rate(1, 1000, 100, 200, 200, r(1000, 120, 100, 60, 0), None, E812911),
    "up two, outdated": Rate(1, 1000, 100, 200, 200, r(1000, 30, 100, 60, 0), None, E812911),
    "down outdated, one": Rate(1, 1000, 100, 5, 5, None, r(1000, 60, 0, 0, 300), (), E812911),
    "down two, not outdated": Rate(
        1, 1000, 100, 5, 5, None, r(1000, 120, 100, 60, 300), (), E812911
    ),
    "down two, outdated": Rate(1, 1000, 100, 5, 5, None, r(1000, 30, 100, 60, 300), (), E812911),
}


@pytest.mark.parametrize("row", SCALING_WITH_RULES.values(), ids=SCALING_WITH_RULES.keys())
def test_upstream_scaling_with_rules(row: Rate) -> None:
    up, down = defaulted_rules(Behavior(row.up, row.down), 300)
    limits = RateLimits(up, down, events(row.up_ev, 120), events(row.down_ev, 120))
    for semantics in ("current", "v1.20"):  # one direction of events only: both agree
        got = limits.convert(0.0, row.current, row.desired, row.lo, row.hi, semantics)
        assert got == row.expected, semantics


def test_upstream_limits_with_select_policy_min() -> None:
    # TestCalculateScaleUpLimitWithScalingRules / TestCalculateScaleDownLimitWithBehaviors
    both = (ScalingPolicy("Pods", 2, 60), ScalingPolicy("Percent", 50, 60))
    up, down = defaulted_rules(
        Behavior(ScalingRules(300, "Min", both), ScalingRules(300, "Min", both)), 300
    )
    limits = RateLimits(up, down, [], [])
    assert limits.scale_up_limit(0.0, 1, "v1.20") == 2
    assert limits.scale_down_limit(0.0, 5, "v1.20") == 3
