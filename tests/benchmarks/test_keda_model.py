"""The KEDA ScaledObject model against the keda.sh documentation's rules and examples.

Docs: https://keda.sh/docs/latest/reference/scaledobject-spec/ and
https://keda.sh/docs/latest/concepts/scaling-deployments/ ("Activating and Scaling
thresholds"); code: kedacore/keda pkg/scaling/executor/scale_scaledobjects.go.
"""

from __future__ import annotations

import pytest

from benchmarks.autoscale.controller import Observation, ReplicaStatus
from benchmarks.autoscale.hpa_api import Behavior, ScalingRules
from benchmarks.autoscale.keda import ScaledObjectController, ScaledObjectSpec, Trigger, keda_milli


def obs(value: float | None, spec: int) -> Observation:
    replicas = tuple(ReplicaStatus(f"r{i}") for i in range(spec))
    external = {} if value is None else {"queue": (value,)}
    return Observation(spec, spec, replicas, external=external)


def drive(
    so: ScaledObjectController, spec: int, values: dict[float, float | None], until_s: float
) -> list[tuple[float, int]]:
    """Call the controller at each of its due times; ``values`` is a step function of time."""
    changes: list[tuple[float, int]] = []
    times = sorted(values)
    while (t := so.next_due_s()) < until_s:
        value = values[max(x for x in times if x <= t)]
        new = so.observe(t, obs(value, spec))
        if new != spec:
            changes.append((t, new))
        spec = new
    return changes


def test_defaults_match_the_spec_reference() -> None:
    spec = ScaledObjectSpec((Trigger("queue", 10),))
    assert (spec.polling_interval_s, spec.cooldown_period_s) == (30.0, 300.0)
    assert (spec.min_replica_count, spec.max_replica_count) == (0, 100)
    assert spec.initial_cooldown_period_s == 0.0 and spec.idle_replica_count is None
    so = ScaledObjectController(spec)
    assert so.hpa.spec.min_replicas == 1 and so.hpa.spec.max_replicas == 100
    assert so.hpa.spec.behavior is None
    (metric,) = so.hpa.spec.metrics
    assert (metric.source, metric.target_type, metric.target) == ("External", "AverageValue", 10)


def test_activation_from_zero_happens_at_the_next_poll_only() -> None:
    so = ScaledObjectController(ScaledObjectSpec((Trigger("queue", 10),)))
    # activity arrives at t=40: KEDA polls at 0, 30, 60 ... so the target goes 0 -> 1 at 60
    # (the HPA, at 0 replicas, is disabled meanwhile); the HPA takes it on from there
    changes = drive(so, 0, {0.0: 0.0, 40.0: 35.0}, until_s=120)
    assert changes[0] == (60.0, 4)  # 1 by KEDA, then ceil(35 / 10) = 4 by the HPA at 60
    assert [r.reason for r in so.history if r.desired != r.current] == ["activated"]


def test_activation_is_strictly_greater_than_the_activation_value() -> None:
    so = ScaledObjectController(ScaledObjectSpec((Trigger("queue", 10, activation_target=5),)))
    assert drive(so, 0, {0.0: 5.0}, until_s=100) == []  # 5 is not > 5
    so = ScaledObjectController(ScaledObjectSpec((Trigger("queue", 10, activation_target=5),)))
    assert drive(so, 0, {0.0: 5.001}, until_s=1)[0] == (0.0, 1)


def test_activation_wins_over_scaling() -> None:
    # "threshold: 10 and activationThreshold: 50, in case of 40 messages the scaler is not
    # active and it'll be scaled to zero even the HPA requires 4 instances"
    spec = ScaledObjectSpec((Trigger("queue", 10, activation_target=50),))
    assert drive(ScaledObjectController(spec), 0, {0.0: 40.0}, until_s=900) == []
    so = ScaledObjectController(spec)
    changes = drive(so, 4, {0.0: 40.0}, until_s=900)
    # never active, so no lastActiveTime: scaled in once creation + initialCooldownPeriod (0) is
    # strictly in the past — at the first poll after the creation instant
    assert changes == [(30.0, 0)]


def test_cooldown_counts_from_the_last_active_poll() -> None:
    so = ScaledObjectController(ScaledObjectSpec((Trigger("queue", 10),), cooldown_period_s=300))
    changes = drive(so, 0, {0.0: 25.0, 100.0: 0.0}, until_s=1000)
    assert changes[0] == (0.0, 3)
    # last active poll at t=90; scaled to 0 at the first poll with 90 + 300 < t: t=420
    # (the HPA meanwhile steps down to its own minimum of 1 after its 300 s window)
    assert so.last_active_s == 90.0
    assert changes[-1] == (420.0, 0)
    assert all(n >= 1 for _, n in changes[:-1])


def test_cooldown_boundary_is_strict() -> None:
    spec = ScaledObjectSpec((Trigger("queue", 10),), polling_interval_s=30, cooldown_period_s=60)
    so = ScaledObjectController(spec)
    changes = drive(so, 1, {0.0: 5.0, 1.0: 0.0}, until_s=200)
    assert changes == [(90.0, 0)]  # active at 0; 0 + 60 < 60 is false; at 90 it is true


def test_initial_cooldown_delays_scaling_to_zero_after_creation() -> None:
    spec = ScaledObjectSpec((Trigger("queue", 10),), initial_cooldown_period_s=120)
    assert drive(ScaledObjectController(spec), 1, {0.0: 0.0}, until_s=400) == [(150.0, 0)]


def test_min_replica_count_is_a_floor_and_activation_is_ignored() -> None:
    spec = ScaledObjectSpec((Trigger("queue", 10, activation_target=100),), min_replica_count=2)
    so = ScaledObjectController(spec)
    assert so.hpa.spec.min_replicas == 2
    assert drive(so, 0, {0.0: 0.0}, until_s=900) == [(0.0, 2)]  # below min: set to min


def test_idle_replica_count_jumps_between_idle_and_min() -> None:
    # "If there's no activity on triggers the target resource is scaled down to
    # idleReplicaCount (0), once there is an activity the target resource is immediately
    # scaled to minReplicaCount (10)"
    spec = ScaledObjectSpec(
        (Trigger("queue", 10),), min_replica_count=10, idle_replica_count=0, cooldown_period_s=60
    )
    changes = drive(ScaledObjectController(spec), 0, {0.0: 0.0, 50.0: 5.0, 100.0: 0.0}, 400)
    assert changes == [(60.0, 10), (180.0, 0)]  # active polls 60, 90; 90 + 60 < 180


def test_idle_replica_count_must_be_below_min() -> None:
    with pytest.raises(ValueError, match="IdleReplicaCount=2 must be less than MinReplicaCount=2"):
        ScaledObjectSpec((Trigger("queue", 1),), min_replica_count=2, idle_replica_count=2)


def test_scaling_between_one_and_n_is_the_hpa_external_average_value() -> None:
    behavior = Behavior(scale_down=ScalingRules(stabilization_window_s=0))
    so = ScaledObjectController(ScaledObjectSpec((Trigger("queue", 10),), behavior=behavior))
    changes = drive(so, 1, {0.0: 95.0, 50.0: 31.0}, until_s=90)
    # 1 -> 5 at t=0 (default behavior: +4 pods / 15 s), 5 -> 10 at 15, then ceil(31/10) = 4
    assert changes == [(0.0, 5), (15.0, 10), (60.0, 4)]


def test_a_failing_trigger_changes_nothing() -> None:
    so = ScaledObjectController(ScaledObjectSpec((Trigger("queue", 10),)))
    assert drive(so, 3, {0.0: None}, until_s=1000) == []
    assert so.history[0].reason.startswith("trigger error")


def test_values_reach_the_hpa_as_truncated_milli_quantities() -> None:
    assert keda_milli(0.0019) == 0.001
    assert keda_milli(2.5) == 2.5
    # 10.0009 -> 10.000, inside the tolerance of a 10-per-replica target at one replica
    so = ScaledObjectController(ScaledObjectSpec((Trigger("queue", 10),)))
    assert so.observe(0.0, obs(10.0009, 1)) == 1


def test_cached_metrics_feed_the_hpa_the_value_of_the_last_poll() -> None:
    trigger = Trigger("queue", 10, use_cached_metrics=True)
    so = ScaledObjectController(ScaledObjectSpec((trigger,)), poll_phase_s=0.0)
    assert so.observe(0.0, obs(10.0, 1)) == 1  # poll caches 10; HPA: 10/10 -> 1
    assert so.observe(15.0, obs(80.0, 1)) == 1  # HPA sees the cached 10, not 80
    assert so.observe(30.0, obs(80.0, 1)) == 4  # poll refreshes; HPA: 8, capped at 4 (x2 or 4)
