"""What one simulated engine publishes: gauges, counters and histograms, engine-neutral.

The engine writes an ``EngineStats``; ``exposition.render_metrics`` turns it into the text of
a given engine flavour. Histograms are stored over the *union* of every flavour's bucket
bounds, so each flavour's own bucket set is rendered exactly (cumulative counts at a subset of
the stored bounds), whatever flavour a scrape asks for.

Bucket sets are vLLM's (``vllm/v1/metrics`` and the 0.4.3 capture in metrics-samples/), NIM's
(same as vLLM 0.4.3) and SGLang's (docs capture), sim-fidelity §2.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.sim.profiles import Profile

V0_TTFT = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
V1_TTFT = (*V0_TTFT, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
V0_TPOT = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
V1_ITL = (*V0_TPOT, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
V0_E2E = (1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
V1_LATENCY = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
SGLANG_TTFT = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 15.0, 20.0, 25.0, 30.0,
)  # fmt: skip
SGLANG_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
SGLANG_TPOT = (
    0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5,
)  # fmt: skip
V1_ITERATION_TOKENS = (1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
                       8192.0, 16384.0)  # fmt: skip


def one_two_five(limit: float) -> tuple[float, ...]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to ``limit`` (inclusive)."""
    out: list[float] = []
    scale = 1.0
    while True:
        for m in (1.0, 2.0, 5.0):
            if m * scale > limit:
                return tuple(out)
            out.append(m * scale)
        scale *= 10.0


TOKEN_COUNTS = one_two_five(10_000_000)


class Histogram:
    """Cumulative-on-render histogram over fixed bounds; ``observe`` is O(log buckets)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, *bound_sets: Sequence[float]) -> None:
        self.bounds: tuple[float, ...] = tuple(sorted({b for s in bound_sets for b in s}))
        self.counts = [0] * (len(self.bounds) + 1)  # last slot is +Inf only
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n
        self.count += n

    def cumulative(self, bounds: Sequence[float]) -> list[int]:
        """Cumulative counts at ``bounds`` (each must be a stored bound), then at +Inf."""
        out: list[int] = []
        acc = 0
        i = 0
        for b in bounds:
            j = bisect.bisect_left(self.bounds, b)
            if j == len(self.bounds) or self.bounds[j] != b:
                raise ValueError(f"bucket bound {b} is not stored by this histogram")
            while i <= j:
                acc += self.counts[i]
                i += 1
            out.append(acc)
        out.append(self.count)
        return out


@dataclass(slots=True)
class EngineStats:
    """Gauges as of the last schedule/complete, monotonic counters, histograms (seconds, tokens).

    ``kv_usage`` is vLLM V1's ``1 - free / (num_gpu_blocks - 1)`` with idle prefix-cache blocks
    counted free; ``num_waiting`` includes preempted requests; ``num_running`` includes
    requests mid-way through a chunked prefill.
    """

    profile: Profile
    start_unix_s: float = 0.0  # set by a live server; rendered as the `_created` series
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0  # tokens
    prefix_cache_hits: int = 0  # tokens
    request_success: dict[str, int] = field(default_factory=dict)  # by finish reason
    prompt_throughput: float = 0.0  # tokens/s, smoothed (V0/SGLang gauges)
    generation_throughput: float = 0.0
    ttft: Histogram = field(default_factory=lambda: Histogram(V1_TTFT, SGLANG_TTFT))
    itl: Histogram = field(default_factory=lambda: Histogram(V1_ITL, SGLANG_TPOT))
    e2e: Histogram = field(default_factory=lambda: Histogram(V1_LATENCY, V0_E2E, SGLANG_E2E))
    queue_time: Histogram = field(default_factory=lambda: Histogram(V1_LATENCY))
    inference_time: Histogram = field(default_factory=lambda: Histogram(V1_LATENCY))
    prefill_time: Histogram = field(default_factory=lambda: Histogram(V1_LATENCY))
    decode_time: Histogram = field(default_factory=lambda: Histogram(V1_LATENCY))
    request_prompt_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_COUNTS))
    request_generation_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_COUNTS))
    iteration_tokens: Histogram = field(default_factory=lambda: Histogram(V1_ITERATION_TOKENS))

    @property
    def used_tokens(self) -> int:
        """KV tokens held by running requests (block-granular), SGLang's num_used_tokens."""
        return round(self.kv_usage * self.profile.kv_capacity_tokens)
