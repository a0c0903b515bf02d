"""Everything the gateway publishes to Prometheus, defined in this one module.

Invariants:

* One namespace, ``kvgate``; base units in names; ``_total`` only on counters; labels bounded
  (model — only models some replica serves —, replica, code, policy, reason, state).
* Metrics live in an injected ``CollectorRegistry`` (one per gateway), never the default one, so
  two gateways in one test process do not collide.
* Per-replica values come from ``ReplicaStateCollector`` reading the pool at scrape time, so a
  replica that leaves the pool leaves ``/metrics`` at the same moment; a signal the gateway does
  not know (never scraped, or not exposed by the engine) is absent, never 0.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from gateway.pool import ReplicaPool

NAMESPACE = "kvgate"
PHASES = ("starting", "ready", "draining", "ejected")
UNKNOWN_MODEL = "unknown"  # model label for requests whose model no replica serves

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DECISION_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2)
_SCRAPE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class GatewayMetrics:
    """The gateway's own counters and histograms, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry, *, version: str, policy: str) -> None:
        self.registry = registry

        def counter(name: str, doc: str, labels: Iterable[str]) -> Counter:
            return Counter(name, doc, labels, namespace=NAMESPACE, registry=registry)

        def histogram(
            name: str, doc: str, labels: Iterable[str], buckets: tuple[float, ...]
        ) -> Histogram:
            return Histogram(
                name, doc, labels, namespace=NAMESPACE, registry=registry, buckets=buckets
            )

        self.requests = counter(
            "requests_total",
            "Client requests finished, by model and HTTP status.",
            ["model", "code"],
        )
        self.request_duration = histogram(
            "request_duration_seconds",
            "Client request duration at the gateway, to the last byte.",
            ["model"],
            _LATENCY_BUCKETS,
        )
        self.time_to_first_byte = histogram(
            "time_to_first_byte_seconds",
            "From request arrival to the first response byte sent (≈ TTFT when streaming).",
            ["model"],
            _TTFB_BUCKETS,
        )
        self.request_errors = counter(
            "request_errors_total", "Requests answered with a gateway error, by code.", ["code"]
        )
        self.upstream_requests = counter(
            "upstream_requests_total",
            "Responses received from replicas, by replica and HTTP status.",
            ["replica", "code"],
        )
        self.upstream_errors = counter(
            "upstream_errors_total",
            "Failed exchanges with replicas, by reason (connect, timeout, disconnect, protocol).",
            ["replica", "reason"],
        )
        self.retries = counter(
            "retries_total", "Requests retried on another replica, by reason.", ["reason"]
        )
        self.routing_decisions = counter(
            "routing_decisions_total",
            "Routing decisions by policy and reason.",
            ["policy", "reason"],
        )
        self.routing_decision_duration = histogram(
            "routing_decision_duration_seconds",
            "Time spent in policy.choose per decision.",
            ["policy"],
            _DECISION_BUCKETS,
        )
        self.scrape_errors = counter(
            "scrape_errors_total", "Failed engine-metrics scrapes.", ["replica", "reason"]
        )
        self.scrape_duration = histogram(
            "scrape_duration_seconds",
            "Duration of one replica's metrics scrape.",
            [],
            _SCRAPE_BUCKETS,
        )
        build_info = Gauge(
            "build_info",
            "kvgate build and routing policy (always 1).",
            ["version", "policy"],
            namespace=NAMESPACE,
            registry=registry,
        )
        build_info.labels(version, policy).set(1)


class ReplicaStateCollector(Collector):
    """Per-replica gauges computed from the pool at collection time."""

    def __init__(self, pool: ReplicaPool, clock: Callable[[], float]) -> None:
        self._pool = pool
        self._clock = clock

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> list[GaugeMetricFamily]:
        def fam(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, labels=labels)

        return [
            fam("replicas", "Replicas known to the gateway, by phase.", ["state"]),
            fam(
                "replica_state",
                "Current phase of each replica (1 for its phase).",
                ["replica", "state"],
            ),
            fam(
                "inflight_requests",
                "Requests this gateway has in flight, per replica.",
                ["replica"],
            ),
            fam("replica_queue_depth", "Requests waiting in the engine, last scrape.", ["replica"]),
            fam(
                "replica_running_requests",
                "Requests running in the engine, last scrape.",
                ["replica"],
            ),
            fam(
                "replica_kv_cache_usage_ratio",
                "Engine KV-cache usage 0..1, last scrape.",
                ["replica"],
            ),
            fam("replica_metrics_age_seconds", "Age of the last successful scrape.", ["replica"]),
        ]

    def collect(self) -> Iterable[Metric]:
        replicas, state, inflight, queue, running, kv, age = self._families()
        pool = self._pool
        now = self._clock()
        counts = dict.fromkeys(PHASES, 0)
        for s in pool.view(now).replicas:
            rid = str(s.id)
            counts[s.phase] = counts.get(s.phase, 0) + 1
            state.add_metric([rid, s.phase], 1)
            inflight.add_metric([rid], pool.inflight(s.id))
            if s.queue_depth is not None:
                queue.add_metric([rid], s.queue_depth)
            if s.running is not None:
                running.add_metric([rid], s.running)
            if s.kv_usage is not None:
                kv.add_metric([rid], s.kv_usage)
            if s.scraped_at is not None:
                age.add_metric([rid], max(0.0, now - s.scraped_at))
        for phase, n in counts.items():
            replicas.add_metric([phase], n)
        return [replicas, state, inflight, queue, running, kv, age]


def metrics_handler(
    registry: CollectorRegistry,
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(_request: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    return handle
