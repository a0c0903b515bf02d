"""Per-run measurements of a routing scenario: latency quantiles, replica gauges, losses.

All figures are over the *measured window*: requests that arrived in
``[warmup_s, warmup_s + duration_s)`` (each followed to completion, however late), and engine
steps and gauge samples taken in that window of virtual time.

Definitions (the report states them too):

* TTFT: client arrival at the gateway -> first token leaves the replica (gateway buffer,
  front-end latency, engine queue and prefill included). E2E likewise to the last token.
* ITL: per decode token, the time since the previous step of its replica ended
  (``VirtualCluster`` per-step pairs, weighted by tokens).
* Quantiles: nearest rank, ``benchmarks.load.report.nearest_rank``.
* ``max_waiting``: the largest ``num_requests_waiting`` any replica reached, checked at every
  step start. ``kv_spread``: the mean over gauge samples of (max - min) KV usage across
  replicas - how unevenly KV pressure is spread at a given instant.
* ``lost``: requests rejected by a gateway buffer plus requests unfinished when the drain limit
  ran out. Must be 0 for a valid comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.load.report import nearest_rank


def cdf_points(ordered: Sequence[float], points: int) -> list[float]:
    """``points + 1`` evenly spaced quantiles (0 to 100%) of a sorted sequence."""
    if not ordered:
        return []
    return [nearest_rank(ordered, 100.0 * i / points) for i in range(points + 1)]


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One run's figures over its measured window (see the module docstring)."""

    requests: int
    completed: int
    lost: int
    rejected: int
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    ttft_mean_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    output_tokens_per_s: float
    max_waiting: int
    max_waiting_per_replica: tuple[int, ...]
    kv_spread_mean: float
    kv_mean: float
    kv_mean_range: float  # busiest replica's mean KV usage minus the idlest's
    preemptions: int
    held: int  # requests that waited in a gateway buffer
    max_buffered: int
    buffer_wait_p99_s: float
    reasons: dict[str, int]  # routing decisions by reason, all gateways


@dataclass(frozen=True, slots=True)
class KvBalance:
    spread_mean: float
    mean: float
    mean_range: float


def kv_balance(samples: Sequence[Sequence[tuple[float, int, int, float]]]) -> KvBalance:
    """KV-usage balance from per-replica gauge samples taken at the same instants."""
    if not samples or not samples[0]:
        return KvBalance(math.nan, math.nan, math.nan)
    count = min(len(s) for s in samples)
    spreads = []
    for j in range(count):
        kvs = [s[j][3] for s in samples]
        spreads.append(max(kvs) - min(kvs))
    means = [sum(x[3] for x in s[:count]) / count for s in samples]
    return KvBalance(sum(spreads) / count, sum(means) / len(means), max(means) - min(means))
