"""One autoscaling run in virtual time: scenario x signal x controller x front end -> measures.

A run couples ``benchmarks.autoscale.cluster.ElasticCluster`` (replicas with a cold start,
kvgate's buffer or a plain Service), ``benchmarks.autoscale.signals.Prometheus`` (what the
metrics pipeline shows, when) and one controller model (``hpa.HorizontalPodAutoscaler`` or
``keda.ScaledObjectController``), called at exactly the times the controller itself would run
(``next_due_s``). Arrivals follow the scenario's rate curve ``rate(t)`` as a Gamma renewal
process in operational time (``Lambda(t) = integral of rate``), so ``burstiness`` keeps its
meaning (CV = 1/sqrt(b)) while the rate changes.

"Enough replicas" for an offered rate r is ``ceil(r / REPLICA_RPS)`` with ``REPLICA_RPS`` = 1.5
req/s: the calibrated A10G cluster serves 12 req/s on 8 replicas with p99 TTFT 0.57 s under
least-request balancing (benchmarks/results/sim-calibration.md); the talk's knee is 12-14.

Everything is seeded from ``RunSpec.seed``; results are plain JSON-able dicts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal

from benchmarks.autoscale.cluster import ClusterSpec, ElasticCluster
from benchmarks.autoscale.controller import ScalingController
from benchmarks.autoscale.hpa import HorizontalPodAutoscaler
from benchmarks.autoscale.hpa_api import Behavior, HPASpec, ScalingPolicy, ScalingRules
from benchmarks.autoscale.keda import ScaledObjectController, ScaledObjectSpec, Trigger
from benchmarks.autoscale.signals import Prometheus, Signal, metric_spec
from benchmarks.des.scenario import Arrival, GatewaySpec
from benchmarks.load.workloads import Arrivals, make_workload
from benchmarks.sim.profiles import get_profile
from policies.types import Saturation

PROFILE = "a10g-llama3-8b"
REPLICA_RPS = 1.5
THRASH_WINDOW_S = 600.0  # a direction reversal within this long after a change is thrashing
SERIES_STEP_S = 5.0
TTFT_BIN_S = 30.0

ControllerKind = Literal["hpa", "hpa-default", "keda"]

# config/autoscaling/*: fast up (+100 % or +2 pods per 30 s), slow down (300 s, 1 pod/min).
RECOMMENDED = Behavior(
    scale_up=ScalingRules(
        stabilization_window_s=0,
        select_policy="Max",
        policies=(ScalingPolicy("Percent", 100, 30), ScalingPolicy("Pods", 2, 30)),
    ),
    scale_down=ScalingRules(
        stabilization_window_s=300,
        select_policy="Max",
        policies=(ScalingPolicy("Pods", 1, 60),),
    ),
)


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    duration_s: float
    burstiness: float
    initial_replicas: int
    step_at_s: float | None  # when the load reaches its peak (time-to-enough is measured from)
    peak_rps: float

    def rate(self, t: float) -> float:
        return RATE_CURVES[self.name](t)


def _step(t: float) -> float:
    return 2.0 if t < 300.0 else 12.0


def _day(t: float) -> float:
    """A day compressed into 40 minutes: night, morning ramp, peak, evening, night."""
    pts = ((0, 1.0), (300, 1.0), (1200, 12.0), (1500, 12.0), (2100, 1.0), (2400, 1.0))
    for (t0, r0), (t1, r1) in itertools.pairwise(pts):
        if t0 <= t < t1:
            return r0 + (r1 - r0) * (t - t0) / (t1 - t0)
    return 1.0


def _bursts(t: float) -> float:
    return 6.0


def _from_zero(t: float) -> float:
    return 6.0 if 300.0 <= t < 600.0 else 0.0


RATE_CURVES: dict[str, Callable[[float], float]] = {
    "step": _step,
    "ramp": _day,
    "bursts": _bursts,
    "from_zero": _from_zero,
}

SCENARIOS: dict[str, Scenario] = {
    "step": Scenario("step", 1200.0, 1.0, 2, 300.0, 12.0),
    "ramp": Scenario("ramp", 2400.0, 1.0, 1, 1200.0, 12.0),
    "bursts": Scenario("bursts", 1200.0, 0.1, 4, None, 6.0),  # Gamma CV ~3.2
    "from_zero": Scenario("from_zero", 2100.0, 1.0, 0, 300.0, 6.0),
}


@dataclass(frozen=True, slots=True)
class RunSpec:
    scenario: str
    signal: Signal
    target: float
    controller: ControllerKind = "hpa"
    buffered: bool = True
    cold_start_s: float = 75.0
    max_wait_s: float = 120.0  # kvgate buffer.max_wait_s (default)
    max_inflight: int | None = None  # kvgate saturation.max_inflight_per_replica (default off)
    max_queued: int = 1000  # kvgate buffer.max_queued_per_model (default)
    min_replicas: int = 1
    max_replicas: int = 16
    seed: int = 0
    duration_s: float | None = None  # override (quick mode)
    slo_s: float = 2.0  # the configurable TTFT objective, besides the fixed 1 s one

    @property
    def label(self) -> str:
        front = "kvgate" if self.buffered else "service"
        if self.buffered and self.max_inflight is not None:
            front += f"+bound{self.max_inflight}"
        return f"{self.scenario}/{self.controller}/{self.signal}={self.target:g}/{front}"


def arrival_stream(sc: Scenario, duration_s: float, seed: int, max_len: int) -> Iterator[Arrival]:
    """Gamma renewal arrivals at rate ``sc.rate(t)`` (1 s resolution), OpenOrca-like lengths."""
    gaps = Arrivals(1.0, sc.burstiness).gaps(seed)
    lengths = iter(make_workload("openorca", seed, max_total_tokens=max_len))
    target, lam, i = next(gaps), 0.0, 0
    for s in range(int(duration_s)):
        r = sc.rate(s + 0.5)
        end = lam + r
        while r > 0 and target < end:
            spec = next(lengths)
            yield Arrival(f"req-{i}", s + (target - lam) / r, spec.prompt_tokens, spec.max_tokens)
            i += 1
            target += next(gaps)
        lam = end


def make_controller(spec: RunSpec) -> ScalingController:
    if spec.controller == "keda":
        trigger = Trigger(spec.signal, spec.target, activation_target=0.0)
        so = ScaledObjectSpec(
            (trigger,),
            polling_interval_s=10.0,
            cooldown_period_s=900.0,
            min_replica_count=0,
            max_replica_count=spec.max_replicas,
            behavior=RECOMMENDED,
        )
        return ScaledObjectController(so)
    behavior = RECOMMENDED if spec.controller == "hpa" else None
    hpa = HPASpec(
        (metric_spec(spec.signal, spec.target),),
        max_replicas=spec.max_replicas,
        min_replicas=spec.min_replicas,
        behavior=behavior,
    )
    return HorizontalPodAutoscaler(hpa)


def simulate(spec: RunSpec) -> dict[str, object]:
    sc = SCENARIOS[spec.scenario]
    duration = spec.duration_s or sc.duration_s
    profile = get_profile(PROFILE)
    bound = None if spec.max_inflight is None else Saturation(max_inflight=spec.max_inflight)
    gw = GatewaySpec(
        buffer_deadline_s=spec.max_wait_s or None, saturation=bound, max_buffered=spec.max_queued
    )
    # An HPA cannot scale from zero (without the alpha gate): it starts at minReplicas.
    initial = sc.initial_replicas
    if spec.controller != "keda":
        initial = max(initial, spec.min_replicas)
    cluster = ElasticCluster(
        profile,
        ClusterSpec(cold_start_s=spec.cold_start_s, buffered=spec.buffered, gateway=gw),
        spec.seed,
        initial=initial,
    )
    prom = Prometheus(cluster, phase_s=3.0)
    ctl = make_controller(spec)
    cluster.submit(arrival_stream(sc, duration, spec.seed, profile.max_model_len))
    state = {"spec": initial}
    changes: list[tuple[float, int]] = []
    series: list[tuple[float, float, int, int, int, float | None]] = []

    def tick() -> None:
        now = cluster.now
        desired = ctl.observe(now, prom.observation(state["spec"]))
        if desired != state["spec"]:
            state["spec"] = desired
            cluster.scale_to(desired)
            changes.append((now, desired))
        cluster.call_at(max(ctl.next_due_s(), now + 1e-6), tick)

    def sample() -> None:
        now = cluster.now
        value = prom.latest().get(spec.signal)
        if value is None:
            pods = prom.pods().get(spec.signal, {})
            value = sum(p.value for p in pods.values()) / len(pods) if pods else None
        series.append(
            (
                now,
                sc.rate(now),
                state["spec"],
                len(cluster.ready_pods()),
                cluster.concurrency(),
                value,
            )
        )
        cluster.call_at(now + SERIES_STEP_S, sample)

    cluster.call_at(0.0, tick)
    cluster.call_at(0.0, sample)
    cluster.run(duration)
    gpu_s = cluster.gpu_seconds(duration)
    limit = duration + 3600.0
    while any(f.outcome == "pending" for f in cluster.fates.values()) and cluster.now < limit:
        cluster.run(cluster.now + 60.0)
    cluster.check()
    return _measure(spec, sc, duration, cluster, gpu_s, [(0.0, initial), *changes], series)


def _measure(
    spec: RunSpec,
    sc: Scenario,
    duration: float,
    cluster: ElasticCluster,
    gpu_s: float,
    changes: list[tuple[float, int]],
    series: list[tuple[float, float, int, int, int, float | None]],
) -> dict[str, object]:
    fates = list(cluster.fates.values())
    ttft = sorted(f.first_token_s - f.arrival_s for f in fates if f.first_token_s is not None)
    n = len(fates)
    good1 = sum(1 for x in ttft if x <= 1.0)
    good_slo = sum(1 for x in ttft if x <= spec.slo_s)
    bins: dict[int, list[float]] = {}
    for f in fates:
        b = int(f.arrival_s // TTFT_BIN_S)
        x = f.first_token_s - f.arrival_s if f.first_token_s is not None else math.inf
        bins.setdefault(b, []).append(x)
    ttft_series = [
        (b * TTFT_BIN_S, _q(sorted(v), 50), _q(sorted(v), 99)) for b, v in sorted(bins.items())
    ]
    gpu_h = gpu_s / 3600.0
    attain = good1 / n if n else 1.0
    return {
        "label": spec.label,
        "spec": asdict(spec),
        "requests": n,
        "served": len(ttft),
        "rejected": sum(1 for f in fates if f.outcome == "rejected"),
        "lost": cluster.lost,
        "ttft_p50_s": _q(ttft, 50),
        "ttft_p99_s": _q(ttft, 99),
        "slo_1s": attain,
        "slo_custom": good_slo / n if n else 1.0,
        "gpu_hours": gpu_h,
        "good_per_gpu_hour": good1 / gpu_h if gpu_h > 0 else 0.0,
        "attainment_per_gpu_hour": attain / gpu_h if gpu_h > 0 else 0.0,
        "scale_events": len(changes) - 1,
        "reversals": _reversals(changes),
        "time_to_enough_s": _time_to_enough(sc, series),
        "underprovisioned_s": _underprovisioned(sc, series),
        "max_replicas_seen": max((s[2] for s in series), default=0),
        "changes": changes,
        "series": series,
        "ttft_series": ttft_series,
        "duration_s": duration,
    }


def _q(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


def _reversals(changes: list[tuple[float, int]]) -> int:
    """Direction changes of the replica count within ``THRASH_WINDOW_S`` of the last change.

    ``changes`` starts with the initial count at time 0.
    """
    out, last_dir, last_t = 0, 0, -math.inf
    for (_, prev), (t, n) in itertools.pairwise(changes):
        d = 1 if n > prev else -1
        if last_dir and d != last_dir and t - last_t <= THRASH_WINDOW_S:
            out += 1
        last_dir, last_t = d, t
    return out


def enough(rate: float) -> int:
    return math.ceil(rate / REPLICA_RPS - 1e-9)


def _time_to_enough(
    sc: Scenario, series: list[tuple[float, float, int, int, int, float | None]]
) -> float | None:
    if sc.step_at_s is None:
        return None
    need = enough(sc.peak_rps)
    for t, _, _, ready, _, _ in series:
        if t >= sc.step_at_s and ready >= need:
            return t - sc.step_at_s
    return None


def _underprovisioned(
    sc: Scenario, series: list[tuple[float, float, int, int, int, float | None]]
) -> float:
    """Seconds during which fewer replicas were ready than the offered rate needs."""
    return sum(SERIES_STEP_S for _, r, _, ready, _, _ in series if ready < enough(r))
