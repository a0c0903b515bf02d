"""Everything the gateway publishes to Prometheus, defined in this one module.

The names, types and labels are the contract in ``docs/metrics.md``, which the autoscalers and
the dashboard under ``config/`` depend on; ``tests/config/test_metrics_contract.py`` compares
that table with the live ``/metrics`` output in both directions.

Invariants:

* One namespace, ``kvgate``; base units in names; ``_total`` only on counters. Labels are
  bounded: ``model`` is a model some replica serves or has served, or one configured in
  ``models.names`` — any other name is ``"unknown"`` (clients must not mint label values) —;
  ``replica``, ``code``, ``policy``, ``reason`` and ``state`` come from small fixed sets.
* Metrics live in an injected ``CollectorRegistry`` (one per gateway), never the default one, so
  two gateways in one test process do not collide.
* Values derived from the pool (per-replica state, per-model aggregates, the concurrency gauges)
  come from ``ReplicaStateCollector`` reading the pool at scrape time: a replica that leaves the
  pool leaves ``/metrics`` at the same moment, and a signal the gateway does not know (never
  scraped, not exposed by the engine, stale for a mean) is absent, never 0. A known model keeps
  its per-model series (at 0) while it has no replica, so an autoscaler that scaled it to zero
  still reads 0 rather than nothing.
* Nothing here runs per streamed chunk. The relay loop keeps two local updates per chunk (a
  newline count and the last two segments written); tokens and inter-token latency are
  accounted once per request from those (``stream_finished``). Observing every inter-chunk gap
  would cost a clock read and a histogram observation (~1.5 µs) per chunk.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway.pool import ReplicaPool
from gateway.usage import stream_token_estimate, usage_tokens
from policies.types import ReplicaId

NAMESPACE = "kvgate"
PHASES = ("starting", "ready", "draining", "ejected")
UNKNOWN_MODEL = "unknown"  # model label for requests whose model no replica serves
# kvgate_upstream_errors_total reasons, initialised at 0 so rate() sees them from the start.
UPSTREAM_ERROR_REASONS = ("connect", "timeout", "disconnect", "protocol", "http_5xx")

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
# The first bucket catches requests dispatched at once; the tail covers a cold start.
_QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_DECISION_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2)


def _le(bound: float) -> str:
    """A bucket's ``le`` label exactly as ``prometheus_client.Histogram`` writes it."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]  # untyped in the library


class CounterChild:
    """One labelled counter: a plain float, updated on the event loop only."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramChild:
    """One labelled histogram: a count per bucket (found by bisection) and the sum."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is the +Inf overflow
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self._bounds, amount)] += 1
        self.sum += amount


class FastCounter(Collector):
    """A labelled counter family for the per-request path, exposed like ``Counter``.

    ``prometheus_client``'s children take a lock and wrap a ``MutexValue`` per update; these
    are plain numbers, safe because every update and every collection (the admin port's
    ``/metrics`` handler) runs on the one event-loop thread.
    """

    def __init__(
        self, name: str, doc: str, labels: Iterable[str], *, registry: CollectorRegistry
    ) -> None:
        self._name = f"{NAMESPACE}_{name}"
        self._doc = doc
        self._labels = list(labels)
        self._children: dict[tuple[str, ...], CounterChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> CounterChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = CounterChild()
        return child

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labels)
        for values, child in self._children.items():
            family.add_metric(list(values), child.value)
        yield family


class FastHistogram(Collector):
    """A labelled histogram family for the per-request path, exposed like ``Histogram``
    (same bucket labels); lock-free for the reason ``FastCounter`` gives."""

    def __init__(
        self,
        name: str,
        doc: str,
        labels: Iterable[str],
        buckets: tuple[float, ...],
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._name = f"{NAMESPACE}_{name}"
        self._doc = doc
        self._labels = list(labels)
        self._bounds = tuple(float(b) for b in buckets)
        self._le = [_le(b) for b in self._bounds] + ["+Inf"]
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> HistogramChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = HistogramChild(self._bounds)
        return child

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labels)
        for values, child in self._children.items():
            total = 0
            buckets: list[tuple[str, float]] = []
            for le, n in zip(self._le, child.counts, strict=True):
                total += n
                buckets.append((le, total))
            family.add_metric(list(values), buckets, child.sum)
        yield family


class GatewayMetrics:
    """The gateway's own counters and histograms, and the per-model in-flight count.

    The per-request calls (``queued``, ``first_token``, ``stream_finished``,
    ``response_finished``, ``request_finished``) and the router's decision metrics use the
    lock-free families above; rarer events (retries, upstream errors, rejections, scrape
    errors) use ``prometheus_client`` families directly.
    """

    def __init__(self, registry: CollectorRegistry, *, version: str, policy: str) -> None:
        # No ``*_created`` series: they would double every counter and histogram child on
        # /metrics for a timestamp nobody queries. The switch is the library's (process-wide).
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in the library
        self.registry = registry
        # model label -> requests dispatched to a replica and not finished (the proxy writes it
        # at dispatch and release; ReplicaStateCollector reads it).
        self.in_flight: dict[str, int] = {}

        def counter(name: str, doc: str, labels: Iterable[str]) -> Counter:
            return Counter(name, doc, labels, namespace=NAMESPACE, registry=registry)

        # Updated per request: lock-free families (``FastCounter``/``FastHistogram``).
        def fast_counter(name: str, doc: str, labels: Iterable[str]) -> FastCounter:
            return FastCounter(name.removesuffix("_total"), doc, labels, registry=registry)

        def histogram(
            name: str, doc: str, labels: Iterable[str], buckets: tuple[float, ...]
        ) -> FastHistogram:
            return FastHistogram(name, doc, labels, buckets, registry=registry)

        self.requests = fast_counter(
            "requests_total",
            "Finished client requests, by model and HTTP status.",
            ["model", "code"],
        )
        self.request_duration = histogram(
            "request_duration_seconds",
            "Client request duration at the gateway, from arrival to the last byte.",
            ["model"],
            _LATENCY_BUCKETS,
        )
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds",
            "Streamed responses: from arrival at the gateway (buffer time included) to the first "
            "token relayed to the client.",
            ["model"],
            _TTFT_BUCKETS,
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds",
            "Streamed responses: mean time between consecutive tokens, one observation per "
            "request ((last - first token) / (tokens - 1)).",
            ["model"],
            _ITL_BUCKETS,
        )
        self.queue_wait = histogram(
            "queue_wait_seconds",
            "Time a request waited in the gateway before its first dispatch to a replica.",
            ["model"],
            _QUEUE_BUCKETS,
        )
        self.prompt_tokens = fast_counter(
            "prompt_tokens_total",
            "Prompt tokens, from the usage that replicas report (absent usage adds nothing).",
            ["model"],
        )
        self.generation_tokens = fast_counter(
            "generation_tokens_total",
            "Generated tokens, from the reported usage, or counted from the stream's events.",
            ["model"],
        )
        self.routing_decisions = fast_counter(
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
        self.retries = counter(
            "retries_total",
            "Requests retried on another replica before their first byte, by reason.",
            ["reason"],
        )
        self.upstream_errors = counter(
            "upstream_errors_total",
            "Failed exchanges with replicas, by reason (connect, timeout, disconnect, protocol, "
            "http_5xx).",
            ["reason"],
        )
        for reason in UPSTREAM_ERROR_REASONS:
            self.upstream_errors.labels(reason)
        self.rejections = counter(
            "rejections_total",
            "Requests the gateway refused for lack of capacity (answered with Retry-After), by "
            "model and reason.",
            ["model", "reason"],
        )
        self._scrape_errors = counter(
            "scrape_errors_total",
            "Failed engine-metrics scrapes, by replica and reason.",
            ["replica", "reason"],
        )
        self._scrape_error_labels: set[tuple[str, str]] = set()
        build_info = Gauge(
            "build_info",
            "kvgate build and routing policy (always 1).",
            ["version", "policy"],
            namespace=NAMESPACE,
            registry=registry,
        )
        build_info.labels(version, policy).set(1)
        self._requests = self.requests.labels
        self._duration = self.request_duration.labels
        self._ttft = self.time_to_first_token.labels
        self._itl = self.inter_token_latency.labels
        self._queue_wait = self.queue_wait.labels
        self._prompt = self.prompt_tokens.labels
        self._generation = self.generation_tokens.labels

    # -- per-request accounting (called once per request, never per chunk) ------------------

    def queued(self, model: str, seconds: float) -> None:
        """Time from the request's first routing attempt to its first dispatch."""
        self._queue_wait(model).observe(seconds)

    def dispatched(self, model: str) -> None:
        self.in_flight[model] = self.in_flight.get(model, 0) + 1

    def finished(self, model: str) -> None:
        self.in_flight[model] -= 1

    def first_token(self, model: str, seconds: float) -> None:
        self._ttft(model).observe(seconds)

    def request_finished(self, model: str, status: int, duration_s: float) -> None:
        self._requests(model, str(status)).inc()
        self._duration(model).observe(duration_s)

    def stream_finished(
        self, model: str, *, span_s: float, newlines: int, tail: bytes, chat: bool
    ) -> None:
        """Tokens and mean inter-token latency of one relayed SSE stream.

        ``span_s``: from the first byte relayed to the end of the stream; ``newlines``: newline
        bytes relayed; ``tail``: the last segments relayed (whole events), where a usage chunk
        would be.
        """
        usage = usage_tokens(tail)
        if usage is not None:
            prompt, generated = usage
            if prompt:
                self._prompt(model).inc(prompt)
        else:
            generated = stream_token_estimate(newlines, tail, chat=chat)
        if generated:
            self._generation(model).inc(generated)
            if generated >= 2 and span_s > 0:
                self._itl(model).observe(span_s / (generated - 1))

    def response_finished(self, model: str, body: bytes) -> None:
        """Tokens of one non-streamed response (its usage object; none counted without it)."""
        usage = usage_tokens(body)
        if usage is None:
            return
        prompt, generated = usage
        if prompt:
            self._prompt(model).inc(prompt)
        if generated:
            self._generation(model).inc(generated)

    # -- scrape errors (per replica, forgotten with the replica) ---------------------------

    def scrape_failed(self, replica: ReplicaId, reason: str) -> None:
        self._scrape_errors.labels(replica, reason).inc()
        self._scrape_error_labels.add((replica, reason))

    def forget_replicas(self, members: frozenset[ReplicaId]) -> None:
        """Pool listener: drop the scrape-error series of replicas that left, so replica names
        (pod names churn with every rollout) do not pile up for the process's lifetime."""
        gone = {labels for labels in self._scrape_error_labels if labels[0] not in members}
        for replica, reason in gone:
            self._scrape_errors.remove(replica, reason)
        self._scrape_error_labels -= gone


class ModelLabels:
    """The bounded ``model`` label: served, once-served and configured models; else "unknown"."""

    def __init__(self, pool: ReplicaPool, configured: Iterable[str] = ()) -> None:
        self._pool = pool
        self._known: set[str] = set(configured)
        self._served_seen: frozenset[str] = frozenset()

    def label(self, model: str | None) -> str:
        """The label for ``model``; "" when the request has none (it failed before that)."""
        if model is None:
            return ""
        if model in self._known:
            return model
        if model in self._pool.served_models():
            self._known.add(model)
            return model
        return UNKNOWN_MODEL

    def known(self) -> set[str]:
        """Every model with per-model series: configured, or served now or at some point."""
        served = self._pool.served_models()
        if served is not self._served_seen:  # the pool caches its frozenset between changes
            self._known |= served
            self._served_seen = served
        return self._known


QueuedByModel = Callable[[], Mapping[str, int]]


def _no_buffer() -> Mapping[str, int]:
    return {}


class ReplicaStateCollector(Collector):
    """Gauges computed from the pool at collection time: the concurrency signal per model,
    pool aggregates per model and the per-replica state."""

    def __init__(
        self,
        pool: ReplicaPool,
        clock: Callable[[], float],
        *,
        labels: ModelLabels | None = None,
        in_flight: Mapping[str, int] | None = None,
        queued: QueuedByModel = _no_buffer,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._labels = labels if labels is not None else ModelLabels(pool)
        self._in_flight: Mapping[str, int] = in_flight if in_flight is not None else {}
        self._queued = queued

    def describe(self) -> Iterable[Metric]:
        return list(self._families().values())

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        specs = (
            ("requests_in_flight", "Requests dispatched to replicas and not finished.", ["model"]),
            ("requests_queued", "Requests held in the gateway's buffer.", ["model"]),
            ("replica_state", "1 for the replica's current state.", ["replica", "state"]),
            ("replica_in_flight_requests", "Requests in flight at the replica.", ["replica"]),
            ("replica_queue_depth", "Requests waiting in the engine, last scrape.", ["replica"]),
            (
                "replica_running_requests",
                "Requests running in the engine, last scrape.",
                ["replica"],
            ),
            (
                "replica_kv_cache_usage_ratio",
                "Engine KV-cache usage 0..1, last scrape.",
                ["replica"],
            ),
            ("replica_metrics_age_seconds", "Age of the last successful scrape.", ["replica"]),
            ("model_ready_replicas", "Ready replicas serving the model.", ["model"]),
            ("model_replicas", "Replicas serving the model, by state.", ["model", "state"]),
            (
                "model_kv_cache_usage_ratio_mean",
                "Mean KV-cache usage of the model's ready replicas with a fresh scrape.",
                ["model"],
            ),
            (
                "model_queue_depth",
                "Requests waiting in the engines of the model's ready replicas with a fresh "
                "scrape.",
                ["model"],
            ),
        )
        return {
            name: GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, labels=labels)
            for name, doc, labels in specs
        }

    def collect(self) -> Iterable[Metric]:
        fams = self._families()
        self._concurrency(fams)
        self._replicas(fams)
        return list(fams.values())

    def _concurrency(self, fams: dict[str, GaugeMetricFamily]) -> None:
        queued = self._queued()
        known = self._labels.known()
        for name, counts in (("requests_in_flight", self._in_flight), ("requests_queued", queued)):
            for model in sorted(known | {m for m, n in counts.items() if n}):
                fams[name].add_metric([model], counts.get(model, 0))

    def _replicas(self, fams: dict[str, GaugeMetricFamily]) -> None:
        pool = self._pool
        now = self._clock()
        max_age = pool.max_metrics_age_s
        models = self._labels.known()
        by_state = {m: dict.fromkeys(PHASES, 0) for m in models}
        kv: dict[str, list[float]] = {m: [] for m in models}
        waiting: dict[str, list[int]] = {m: [] for m in models}
        for s in pool.view(now).replicas:
            rid = str(s.id)
            fams["replica_state"].add_metric([rid, s.phase], 1)
            fams["replica_in_flight_requests"].add_metric([rid], pool.inflight(s.id))
            if s.queue_depth is not None:
                fams["replica_queue_depth"].add_metric([rid], s.queue_depth)
            if s.running is not None:
                fams["replica_running_requests"].add_metric([rid], s.running)
            if s.kv_usage is not None:
                fams["replica_kv_cache_usage_ratio"].add_metric([rid], s.kv_usage)
            fresh = s.scraped_at is not None and now - s.scraped_at <= max_age
            if s.scraped_at is not None:
                fams["replica_metrics_age_seconds"].add_metric([rid], max(0.0, now - s.scraped_at))
            for model in s.models & models:
                by_state[model][s.phase] += 1
                if s.phase != "ready" or not fresh:
                    continue
                if s.kv_usage is not None:
                    kv[model].append(s.kv_usage)
                if s.queue_depth is not None:
                    waiting[model].append(s.queue_depth)
        for model in sorted(models):
            counts = by_state[model]
            fams["model_ready_replicas"].add_metric([model], counts["ready"])
            for phase, n in counts.items():
                fams["model_replicas"].add_metric([model, phase], n)
            if kv[model]:
                mean = sum(kv[model]) / len(kv[model])
                fams["model_kv_cache_usage_ratio_mean"].add_metric([model], mean)
            # No ready replica: nothing waits in an engine (0). Ready ones but none with a
            # fresh scrape: unknown (absent), never 0.
            if waiting[model] or not counts["ready"]:
                fams["model_queue_depth"].add_metric([model], sum(waiting[model]))


def metrics_handler(
    registry: CollectorRegistry,
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(_request: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    return handle
