"""Reading engine metrics: what a replica's /metrics page says about its load.

(Contract stub written by the lead; the parser and engine detection are filled in by the
scraping work. ``EngineSample`` is the shape the pool consumes and must stay stable.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineSample:
    """One scrape's worth of load signals. ``None`` = the replica does not expose it (unknown)."""

    engine: str  # detected or configured flavour, e.g. "vllm-v1", "sglang", "nim", "tgi"
    queue_depth: int | None  # requests waiting in the engine scheduler (summed over engines)
    running: int | None  # requests in the running batch (summed over engines)
    kv_usage: float | None  # KV-cache usage ratio 0..1
