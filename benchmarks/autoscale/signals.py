"""The scaling signals compared, as Prometheus and the metrics adapter would hand them to an HPA.

Five signals (``SIGNALS``), each with the HPA metric source a real deployment would use:

``concurrency``  kvgate_requests_in_flight + kvgate_requests_queued, summed over the gateway
    (the recording rule ``namespace_model:kvgate_requests_concurrency:sum``): ``External``,
    ``AverageValue`` target = concurrent requests per replica. Defined at zero replicas.
``kv``  mean KV-cache usage of the ready replicas (``kvgate_model_kv_cache_usage_ratio_mean``,
    the NIM recipe's signal; ``config/autoscaling/hpa-kv-cache``): ``External``, ``Value``.
``waiting``  vLLM's ``num_requests_waiting`` per replica: ``Pods``, ``AverageValue``. A
    replica still loading serves no ``/metrics``: its metric is *missing*.
``gpu_util``  DCGM's ``DCGM_FI_DEV_GPU_UTIL``: the percentage of the last sample period
    (``gpu_window_s``, 1 s) during which a kernel ran - for a continuous-batching engine, any
    step at all. Modelled as the engine's busy fraction over that window: ``Pods``,
    ``AverageValue`` in percent. DCGM exports for a loading replica too (0 %).
``rate``  ``rate(kvgate_requests_total[1m])`` at the gateway: ``External``, ``AverageValue`` =
    requests per second per replica.

Sampling (``Prometheus``): every ``scrape_interval_s`` (10 s, ``config/prometheus``) the
targets are scraped; every ``eval_interval_s`` (10 s) the recording rules evaluate on the
latest samples; the HPA (every 15 s) and KEDA (every ``pollingInterval``) read the recorded
value. So an External signal is 0-20 s old when a controller reads it, a Pods one 0-10 s.
``rate`` is computed as Prometheus does from counter samples in the window (first to last
sample, not extrapolated). Nothing is returned for a series with no sample yet: a missing
metric, never 0.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from benchmarks.autoscale.cluster import ElasticCluster
from benchmarks.autoscale.controller import Observation, PodSample, ReplicaStatus
from benchmarks.autoscale.hpa_api import MetricSpec

Signal = Literal["concurrency", "kv", "waiting", "gpu_util", "rate"]
SIGNALS: tuple[Signal, ...] = ("concurrency", "kv", "waiting", "gpu_util", "rate")

UNITS: dict[Signal, str] = {
    "concurrency": "requests in flight + queued per replica",
    "kv": "mean KV-cache usage ratio",
    "waiting": "num_requests_waiting per replica",
    "gpu_util": "GPU utilisation percent per replica",
    "rate": "requests/s per replica",
}


def metric_spec(signal: Signal, target: float) -> MetricSpec:
    """The ``spec.metrics[]`` entry a deployment would write for ``signal``."""
    if signal == "kv":
        return MetricSpec("External", signal, "Value", target)
    if signal in ("waiting", "gpu_util"):
        return MetricSpec("Pods", signal, "AverageValue", target)
    return MetricSpec("External", signal, "AverageValue", target)


@dataclass(frozen=True, slots=True)
class _Scrape:
    t: float
    concurrency: int
    requests_total: int
    kv_mean: float | None  # None: no ready replica
    waiting: Mapping[str, float]  # ready replicas
    gpu_util: Mapping[str, float]  # every live replica


class Prometheus:
    """Scrapes the cluster on a schedule; answers the adapter's and KEDA's queries."""

    def __init__(
        self,
        cluster: ElasticCluster,
        *,
        scrape_interval_s: float = 10.0,
        eval_interval_s: float = 10.0,
        rate_window_s: float = 60.0,
        gpu_window_s: float = 1.0,
        phase_s: float = 0.0,
    ) -> None:
        self.cluster = cluster
        self.scrape_interval_s = scrape_interval_s
        self.eval_interval_s = eval_interval_s
        self.rate_window_s = rate_window_s
        self.gpu_window_s = gpu_window_s
        self._scrapes: deque[_Scrape] = deque()
        self._busy_before: dict[str, float] = {}
        self._recorded: dict[str, float] = {}
        first = phase_s % scrape_interval_s
        cluster.call_at(max(0.0, first - gpu_window_s), self._mark_busy)
        cluster.call_at(first, self._scrape)
        cluster.call_at(first + eval_interval_s / 2, self._evaluate)

    # ------------------------------------------------------------------ queries
    def external(self) -> dict[str, tuple[float, ...]]:
        """Recorded series for External metrics (absent: no value yet)."""
        return {k: (v,) for k, v in self._recorded.items()}

    def pods(self) -> dict[str, dict[str, PodSample]]:
        """Per-replica series for Pods metrics, as of the latest scrape."""
        if not self._scrapes:
            return {}
        s = self._scrapes[-1]
        return {
            "waiting": {k: PodSample(v, s.t, self.scrape_interval_s) for k, v in s.waiting.items()},
            "gpu_util": {k: PodSample(v, s.t, self.gpu_window_s) for k, v in s.gpu_util.items()},
        }

    def observation(self, spec_replicas: int) -> Observation:
        live = self.cluster.live_pods()
        statuses = tuple(
            ReplicaStatus(
                name=p.name,
                ready=p.state == "ready",
                start_s=p.created_s,
                ready_transition_s=p.ready_s if p.ready_s is not None else p.created_s,
            )
            for p in live
        )
        return Observation(
            spec_replicas=spec_replicas,
            status_replicas=len(live),
            replicas=statuses,
            pods=self.pods(),
            external=self.external(),
        )

    def latest(self) -> dict[str, float]:
        """The recorded External values (for plots and the live demo)."""
        return dict(self._recorded)

    # ---------------------------------------------------------------- internals
    def _mark_busy(self) -> None:
        c = self.cluster
        self._busy_before = {p.name: c.busy_s(p) for p in c.live_pods()}
        c.call_at(c.now + self.scrape_interval_s, self._mark_busy)

    def _scrape(self) -> None:
        c = self.cluster
        now = c.now
        ready = c.ready_pods()
        kv = [c.engine(p).stats.kv_usage for p in ready]
        gpu: dict[str, float] = {}
        for p in c.live_pods():
            # busy_s counts a step when it starts; clamp the overhang of the step in progress.
            busy = c.busy_s(p) - self._busy_before.get(p.name, c.busy_s(p))
            gpu[p.name] = 100.0 * min(1.0, max(0.0, busy / self.gpu_window_s))
        self._scrapes.append(
            _Scrape(
                t=now,
                concurrency=c.concurrency(),
                requests_total=c.arrived,
                kv_mean=sum(kv) / len(kv) if kv else None,
                waiting={p.name: float(c.engine(p).stats.num_waiting) for p in ready},
                gpu_util=gpu,
            )
        )
        horizon = now - self.rate_window_s - self.scrape_interval_s
        while self._scrapes and self._scrapes[0].t < horizon:
            self._scrapes.popleft()
        c.call_at(now + self.scrape_interval_s, self._scrape)

    def _evaluate(self) -> None:
        c = self.cluster
        now = c.now
        if self._scrapes:
            last = self._scrapes[-1]
            self._recorded["concurrency"] = float(last.concurrency)
            if last.kv_mean is not None:
                self._recorded["kv"] = last.kv_mean
            else:
                self._recorded.pop("kv", None)
            window = [s for s in self._scrapes if s.t >= now - self.rate_window_s]
            if len(window) >= 2 and window[-1].t > window[0].t:
                dt = window[-1].t - window[0].t
                rate = (window[-1].requests_total - window[0].requests_total) / dt
                self._recorded["rate"] = rate
        c.call_at(now + self.eval_interval_s, self._evaluate)
