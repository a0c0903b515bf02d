"""Render an ``EngineStats`` as the Prometheus text page of a real engine flavour.

Each flavour reproduces the names, labels, bucket sets and ordering quirks of the captures in
``reference/metrics-samples/`` (sim-fidelity §1-2):

- ``vllm-v0`` (vLLM 0.4.3): ``vllm:gpu_cache_usage_perc``, ``num_requests_swapped``,
  ``cache_config_info``, ``model_name`` label only, TTFT buckets to 10 s, no ``_created``.
- ``vllm-v1`` (vLLM >= 0.10): ``vllm:kv_cache_usage_perc`` (the deprecated gpu_cache name is
  hidden, as by default in 0.11), ``engine="0"`` before ``model_name``, prefix-cache counters in
  tokens, ``inter_token_latency_seconds``, V1 bucket sets, and a ``*_created`` gauge family after
  every counter and histogram (prometheus_client's text format).
- ``nim`` (NIM for LLMs 1.0): unprefixed vLLM-0.4-era names, ``num_request_max``,
  ``request_finish_total`` + unlabelled ``request_success_total``; served on ``/v1/metrics``.
- ``sglang`` (docs capture, late 2024): ``sglang:num_queue_reqs``, ``num_running_reqs``,
  ``token_usage``; histogram ``_sum`` printed before the buckets.

Labels are written in sorted order (``{le="0.5",model_name=...}``), as every capture shows.
Values use prometheus_client's float formatting (``1.048576e+06``). The output parses with
``prometheus_client.parser`` and passes ``promtool check metrics`` where the real page does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

from benchmarks.sim.stats import (
    SGLANG_E2E,
    SGLANG_TPOT,
    SGLANG_TTFT,
    V0_E2E,
    V0_TPOT,
    V0_TTFT,
    V1_ITERATION_TOKENS,
    V1_ITL,
    V1_LATENCY,
    V1_TTFT,
    EngineStats,
    Histogram,
    one_two_five,
)

Flavour = Literal["vllm-v0", "vllm-v1", "nim", "sglang"]
FLAVOURS: tuple[Flavour, ...] = get_args(Flavour)
METRICS_PATH: dict[Flavour, str] = {
    "vllm-v0": "/metrics",
    "vllm-v1": "/metrics",
    "nim": "/v1/metrics",
    "sglang": "/metrics",
}

_Labels = dict[str, str]


def floatToGoString(d: float) -> str:
    """prometheus_client.utils.floatToGoString: Go-style exponents (``1.048576e+06``)."""
    d = float(d)
    if d == math.inf:
        return "+Inf"
    if d == -math.inf:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return s


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: _Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


class _Page:
    """Accumulates families in order; ``created`` adds prometheus_client's `_created` gauges."""

    def __init__(self, created: float | None) -> None:
        self.lines: list[str] = []
        self.created = created

    def family(self, name: str, kind: str, doc: str) -> None:
        self.lines.append(f"# HELP {name} {doc}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: _Labels, value: float) -> None:
        self.lines.append(f"{name}{_labels(labels)} {floatToGoString(value)}")

    def _created_family(self, base: str, doc: str, series: Sequence[_Labels]) -> None:
        if self.created is None or not series:
            return
        self.family(f"{base}_created", "gauge", doc)
        for labels in series:
            self.sample(f"{base}_created", labels, self.created)

    def gauge(self, name: str, doc: str, labels: _Labels, value: float) -> None:
        self.family(name, "gauge", doc)
        self.sample(name, labels, value)

    def counter(self, base: str, doc: str, series: Sequence[tuple[_Labels, float]]) -> None:
        self.family(f"{base}_total", "counter", doc)
        for labels, value in series:
            self.sample(f"{base}_total", labels, value)
        self._created_family(base, doc, [labels for labels, _ in series])

    def histogram(
        self,
        name: str,
        doc: str,
        labels: _Labels,
        hist: Histogram,
        bounds: Sequence[float],
        *,
        sum_first: bool = False,
    ) -> None:
        self.family(name, "histogram", doc)
        total = floatToGoString(hist.sum)
        if sum_first:
            self.lines.append(f"{name}_sum{_labels(labels)} {total}")
        cumulative = hist.cumulative(bounds)
        for bound, count in zip((*bounds, float("inf")), cumulative, strict=True):
            self.sample(f"{name}_bucket", {**labels, "le": floatToGoString(bound)}, count)
        self.sample(f"{name}_count", labels, hist.count)
        if not sum_first:
            self.lines.append(f"{name}_sum{_labels(labels)} {total}")
        self._created_family(name, doc, [labels])

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render_metrics(stats: EngineStats, flavour: Flavour, model: str) -> str:
    """The `/metrics` page of ``flavour`` serving ``model`` for the current ``stats``."""
    if flavour == "vllm-v0":
        return _vllm_v0(stats, model)
    if flavour == "vllm-v1":
        return _vllm_v1(stats, model)
    if flavour == "nim":
        return _nim(stats, model)
    if flavour == "sglang":
        return _sglang(stats, model)
    raise ValueError(f"unknown engine flavour {flavour!r}; known: {', '.join(FLAVOURS)}")


def _success(stats: EngineStats, labels: _Labels, *, aborts: bool) -> list[tuple[_Labels, float]]:
    return [
        ({**labels, "finished_reason": reason}, float(n))
        for reason, n in sorted(stats.request_success.items())
        if aborts or reason != "abort"
    ]


def _cache_config(stats: EngineStats, extra: _Labels) -> _Labels:
    p = stats.profile
    swap_bytes = 4 * 1024**3
    return {
        **extra,
        "block_size": str(p.block_size),
        "cache_dtype": "auto",
        "cpu_kvcache_space_bytes": str(swap_bytes),
        "enable_prefix_caching": str(p.enable_prefix_caching),
        "gpu_memory_utilization": str(p.gpu_memory_utilization),
        "num_cpu_blocks": str(swap_bytes // (p.block_size * p.kv_bytes_per_token)),
        "num_gpu_blocks": str(p.num_gpu_blocks),
        "num_gpu_blocks_override": "None",
        "sliding_window": "None",
        "swap_space_bytes": str(swap_bytes),
    }


def _token_counters(page: _Page, stats: EngineStats, prefix: str, labels: _Labels) -> None:
    """The prompt and generation token counters every flavour exports, under its prefix."""
    page.counter(
        f"{prefix}prompt_tokens", "Number of prefill tokens processed.",
        [(labels, stats.prompt_tokens)],
    )  # fmt: skip
    page.counter(
        f"{prefix}generation_tokens", "Number of generation tokens processed.",
        [(labels, stats.generation_tokens)],
    )  # fmt: skip


def _request_tail(page: _Page, stats: EngineStats, prefix: str, labels: _Labels) -> None:
    """The per-request histograms vLLM 0.4.3 and NIM 1.0 share (token counts, n, best_of)."""
    tokens = one_two_five(stats.profile.max_model_len)
    page.histogram(
        f"{prefix}request_prompt_tokens",
        "Number of prefill tokens processed.",
        labels,
        stats.request_prompt_tokens,
        tokens,
    )
    page.histogram(
        f"{prefix}request_generation_tokens",
        "Number of generation tokens processed.",
        labels,
        stats.request_generation_tokens,
        tokens,
    )


def _vllm_v0(stats: EngineStats, model: str) -> str:
    page = _Page(created=None)
    m = {"model_name": model}
    page.gauge(
        "vllm:cache_config_info", "information of cache_config", _cache_config(stats, {}), 1.0
    )
    page.gauge(
        "vllm:num_requests_running",
        "Number of requests currently running on GPU.",
        m,
        stats.num_running,
    )
    page.gauge(
        "vllm:num_requests_waiting", "Number of requests waiting to be processed.", m,
        stats.num_waiting,
    )  # fmt: skip
    page.gauge("vllm:num_requests_swapped", "Number of requests swapped to CPU.", m, 0.0)
    page.gauge(
        "vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.", m,
        stats.kv_usage,
    )  # fmt: skip
    page.gauge(
        "vllm:cpu_cache_usage_perc", "CPU KV-cache usage. 1 means 100 percent usage.", m, 0.0
    )
    page.counter(
        "vllm:num_preemptions", "Cumulative number of preemption from the engine.",
        [(m, stats.num_preemptions)],
    )  # fmt: skip
    _token_counters(page, stats, "vllm:", m)
    _latency_v0(page, stats, "vllm:", m)
    _request_tail(page, stats, "vllm:", m)
    finished = sum(n for r, n in stats.request_success.items() if r != "abort")
    for param in ("best_of", "n"):
        ones = Histogram((1.0, 2.0, 5.0, 10.0, 20.0))
        ones.observe(1.0, finished)
        page.histogram(
            f"vllm:request_params_{param}",
            f"Histogram of the {param} request parameter.",
            m,
            ones,
            ones.bounds,
        )
    page.counter(
        "vllm:request_success", "Count of successfully processed requests.",
        _success(stats, m, aborts=False),
    )  # fmt: skip
    page.gauge(
        "vllm:avg_prompt_throughput_toks_per_s", "Average prefill throughput in tokens/s.", m,
        stats.prompt_throughput,
    )  # fmt: skip
    page.gauge(
        "vllm:avg_generation_throughput_toks_per_s", "Average generation throughput in tokens/s.",
        m, stats.generation_throughput,
    )  # fmt: skip
    return page.text()


def _latency_v0(page: _Page, stats: EngineStats, prefix: str, labels: _Labels) -> None:
    page.histogram(
        f"{prefix}time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        labels,
        stats.ttft,
        V0_TTFT,
    )
    page.histogram(
        f"{prefix}time_per_output_token_seconds",
        "Histogram of time per output token in seconds.",
        labels,
        stats.itl,
        V0_TPOT,
    )
    page.histogram(
        f"{prefix}e2e_request_latency_seconds",
        "Histogram of end to end request latency in seconds.",
        labels,
        stats.e2e,
        V0_E2E,
    )


def _vllm_v1(stats: EngineStats, model: str) -> str:
    page = _Page(created=stats.start_unix_s)
    m = {"engine": "0", "model_name": model}
    page.gauge(
        "vllm:num_requests_running", "Number of requests in model execution batches.", m,
        stats.num_running,
    )  # fmt: skip
    page.gauge(
        "vllm:num_requests_waiting", "Number of requests waiting to be processed.", m,
        stats.num_waiting,
    )  # fmt: skip
    page.gauge(
        "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", m,
        stats.kv_usage,
    )  # fmt: skip
    page.counter(
        "vllm:prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
        [(m, stats.prefix_cache_queries)],
    )
    page.counter(
        "vllm:prefix_cache_hits",
        "Prefix cache hits, in terms of number of cached tokens.",
        [(m, stats.prefix_cache_hits)],
    )
    page.counter(
        "vllm:num_preemptions", "Cumulative number of preemption from the engine.",
        [(m, stats.num_preemptions)],
    )  # fmt: skip
    _token_counters(page, stats, "vllm:", m)
    page.counter(
        "vllm:request_success", "Count of successfully processed requests.",
        _success(stats, m, aborts=True),
    )  # fmt: skip
    tokens = one_two_five(stats.profile.max_model_len)
    hists: tuple[tuple[str, str, Histogram, Sequence[float]], ...] = (
        ("request_prompt_tokens", "Number of prefill tokens processed.",
         stats.request_prompt_tokens, tokens),
        ("request_generation_tokens", "Number of generation tokens processed.",
         stats.request_generation_tokens, tokens),
        ("iteration_tokens_total", "Histogram of number of tokens per engine_step.",
         stats.iteration_tokens, V1_ITERATION_TOKENS),
        ("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
         stats.ttft, V1_TTFT),
        ("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
         stats.itl, V1_ITL),
        ("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
         stats.e2e, V1_LATENCY),
        ("request_queue_time_seconds",
         "Histogram of time spent in WAITING phase for request.", stats.queue_time, V1_LATENCY),
        ("request_inference_time_seconds",
         "Histogram of time spent in RUNNING phase for request.", stats.inference_time,
         V1_LATENCY),
        ("request_prefill_time_seconds",
         "Histogram of time spent in PREFILL phase for request.", stats.prefill_time,
         V1_LATENCY),
        ("request_decode_time_seconds",
         "Histogram of time spent in DECODE phase for request.", stats.decode_time,
         V1_LATENCY),
    )  # fmt: skip
    for name, doc, hist, bounds in hists:
        page.histogram(f"vllm:{name}", doc, m, hist, bounds)
    page.gauge(
        "vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
        _cache_config(stats, {"engine": "0"}), 1.0,
    )  # fmt: skip
    return page.text()


def _nim(stats: EngineStats, model: str) -> str:
    page = _Page(created=None)
    m = {"model_name": model}
    page.gauge(
        "num_requests_running", "Number of requests currently running on GPU.", m,
        stats.num_running,
    )  # fmt: skip
    page.gauge(
        "num_requests_waiting", "Number of requests waiting to be processed.", m,
        stats.num_waiting,
    )  # fmt: skip
    page.gauge(
        "num_request_max", "Max number of concurrently running requests.", m,
        stats.profile.max_num_seqs,
    )  # fmt: skip
    page.gauge(
        "gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.", m,
        stats.kv_usage,
    )  # fmt: skip
    _token_counters(page, stats, "", m)
    _latency_v0(page, stats, "", m)
    _request_tail(page, stats, "", m)
    page.counter(
        "request_finish",
        "Count of finished requests, differentiated by finish reason as label.",
        _success(stats, m, aborts=False),
    )
    finished = sum(n for r, n in stats.request_success.items() if r != "abort")
    page.counter("request_success", "Count of successful requests.", [(m, finished)])
    page.counter("request_failure", "Count of failed requests.", [(m, 0.0)])
    return page.text()


def _sglang(stats: EngineStats, model: str) -> str:
    page = _Page(created=None)
    m = {"model_name": model}
    _token_counters(page, stats, "sglang:", m)
    page.gauge("sglang:token_usage", "The token usage", m, stats.kv_usage)
    queries = stats.prefix_cache_queries
    hit_rate = stats.prefix_cache_hits / queries if queries else 0.0
    page.gauge("sglang:cache_hit_rate", "The cache hit rate", m, hit_rate)
    page.histogram(
        "sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.", m,
        stats.ttft, SGLANG_TTFT, sum_first=True,
    )  # fmt: skip
    page.histogram(
        "sglang:e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds",
        m, stats.e2e, SGLANG_E2E, sum_first=True,
    )  # fmt: skip
    page.histogram(
        "sglang:time_per_output_token_seconds", "Histogram of time per output token in seconds.",
        m, stats.itl, SGLANG_TPOT, sum_first=True,
    )  # fmt: skip
    page.gauge("sglang:num_running_reqs", "The number of running requests", m, stats.num_running)
    page.gauge("sglang:num_used_tokens", "The number of used tokens", m, stats.used_tokens)
    page.gauge(
        "sglang:gen_throughput", "The generate throughput (token/s)", m,
        stats.generation_throughput,
    )  # fmt: skip
    page.gauge(
        "sglang:num_queue_reqs", "The number of requests in the waiting queue", m,
        stats.num_waiting,
    )  # fmt: skip
    return page.text()
