"""Builders for hand-made routing states (pure data; shared by the policy tests)."""

from __future__ import annotations

from collections.abc import Mapping

from policies.types import (
    Phase,
    PoolView,
    ReplicaId,
    ReplicaState,
    RequestInfo,
    Saturation,
)

MODEL = "m"
NOW = 100.0
MAX_AGE = 1.0


def rid(i: int | str) -> ReplicaId:
    return ReplicaId(f"r{i:04d}" if isinstance(i, int) else i)


def replica(
    i: int | str,
    *,
    queue: int | None = None,
    kv: float | None = None,
    running: int | None = None,
    age: float | None = 0.1,
    phase: Phase = "ready",
    models: frozenset[str] = frozenset({MODEL}),
    inflight_at_scrape: int = 0,
    ready_since: float | None = None,
) -> ReplicaState:
    """A replica scraped ``age`` seconds before NOW (None: never scraped)."""
    scraped = queue is not None or kv is not None or running is not None
    return ReplicaState(
        id=rid(i),
        models=models,
        phase=phase,
        ready_since=ready_since,
        queue_depth=queue,
        running=running,
        kv_usage=kv,
        scraped_at=(NOW - age) if scraped and age is not None else None,
        inflight_at_scrape=inflight_at_scrape,
    )


def view(
    *replicas: ReplicaState,
    inflight: Mapping[ReplicaId, int] | None = None,
    saturation: Saturation | None = None,
    slow_start_s: float = 0.0,
) -> PoolView:
    return PoolView(
        now=NOW,
        replicas=tuple(sorted(replicas, key=lambda r: r.id)),
        inflight=dict(inflight or {}),
        max_metrics_age_s=MAX_AGE,
        saturation=saturation,
        slow_start_s=slow_start_s,
    )


def request(
    seq: int = 1,
    *,
    model: str = MODEL,
    exclude: frozenset[ReplicaId] = frozenset(),
    prefix: tuple[int, ...] = (),
) -> RequestInfo:
    return RequestInfo(seq=seq, model=model, exclude=exclude, prefix_hashes=prefix)
