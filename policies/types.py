"""The routing vocabulary: what a policy may look at and what it returns.

Standard library only (see DESIGN.md: the same objects decide in the live proxy, in unit tests
with hand-built states and in the discrete-event simulator). These are plain frozen records with
no behaviour; the rules that interpret them live in ``policies.base``.

Units: times are monotonic seconds from an injected clock (virtual time in the simulator);
``kv_usage`` is a ratio in [0, 1]. ``None`` always means *unknown*, never zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, NewType

ReplicaId = NewType("ReplicaId", str)

# Lifecycle as the gateway sees it. Only "ready" replicas receive new requests; "starting"
# ones tell the buffer that capacity is coming; "draining" ones finish what they have.
Phase = Literal["starting", "ready", "draining", "ejected"]


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """What the gateway believes about one replica, as of its last scrape or membership change.

    Rebuilt by the pool when a scrape lands or the phase changes; the fast-changing in-flight
    count is not here but in ``PoolView.inflight``.
    """

    id: ReplicaId
    models: frozenset[str]
    phase: Phase = "ready"
    ready_since: float | None = None  # when it last became ready (slow start)
    queue_depth: int | None = None  # engine waiting requests at scraped_at
    running: int | None = None  # engine running requests at scraped_at
    kv_usage: float | None = None  # 0..1 at scraped_at
    scraped_at: float | None = None  # time of the last successful scrape
    inflight_at_scrape: int = 0  # gateway in-flight count when that scrape landed


@dataclass(frozen=True, slots=True)
class Saturation:
    """Bounds past which a ready replica takes no more requests and they wait at the gateway.

    Each bound is optional; a replica is saturated when any set bound is reached. Bounds on
    scraped signals apply only while those signals are fresh.
    """

    max_inflight: int | None = None  # gateway in-flight to this replica
    max_queue: int | None = None  # effective queue (scraped waiting + dispatched since)
    max_kv_usage: float | None = None  # scraped KV usage ratio


@dataclass(frozen=True, slots=True)
class PoolView:
    """Everything a policy may look at; valid only during one synchronous ``choose`` call."""

    now: float
    replicas: tuple[ReplicaState, ...]  # sorted by id
    inflight: Mapping[ReplicaId, int]  # exact, gateway-local, live (read-only for policies)
    max_metrics_age_s: float  # a scrape older than this is stale (treated as unknown)
    saturation: Saturation | None = None
    slow_start_s: float = 0.0  # ramp window for a freshly ready replica; 0 disables


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What routing knows about one request: parsed once, never the body itself."""

    seq: int  # gateway-assigned, strictly increasing
    model: str
    stream: bool = False
    prefix_hashes: tuple[int, ...] = ()  # chained prompt-block hashes (prefix affinity)
    prompt_chars: int = 0
    priority: int = 0  # higher is more important; < 0 is sheddable
    exclude: frozenset[ReplicaId] = frozenset()  # replicas that already failed this request


Reason = Literal[
    "only_candidate",
    "round_robin",
    "random",
    "least_request",
    "p2c",
    "p2c_kv",
    "p2c_inflight_fallback",
    "affinity_hit",
    "affinity_miss",
    "affinity_overloaded",
    "oracle",
]


@dataclass(frozen=True, slots=True)
class Decision:
    replica: ReplicaId
    reason: Reason  # bounded set: usable as a metric label


@dataclass(frozen=True, slots=True)
class Dispatched:
    replica: ReplicaId
    request: RequestInfo
    at: float


@dataclass(frozen=True, slots=True)
class Completed:
    replica: ReplicaId
    request: RequestInfo
    at: float
    ok: bool


@dataclass(frozen=True, slots=True)
class MembershipChanged:
    replicas: frozenset[ReplicaId]


PolicyEvent = Dispatched | Completed | MembershipChanged
