"""The contract between membership sources and the replica pool.

A discovery source (static list, DNS headless Service, Kubernetes EndpointSlices) knows *which*
replicas exist; the pool knows what they are doing. They meet at one narrow interface:

    Discovery.run(sink)  -- runs until cancelled, calling sink.set_members(source, snapshot)

Snapshot semantics (invariants every source keeps):

- Every call carries the **complete** membership of that source, never a delta. The pool keeps
  one snapshot per ``source`` name and diffs consecutive snapshots itself, so a lost or repeated
  call can never leave a ghost replica behind, and a source that resyncs from scratch (a
  Kubernetes relist) needs no special path.
- A source pushes its first snapshot as soon as it has a trustworthy answer (possibly empty:
  "zero replicas" is an answer), and afterwards only when the snapshot changes.
- While a source cannot reach its authority (DNS server down, API server unreachable) it pushes
  nothing: the last good snapshot stays in force. Emptiness is only ever pushed because the
  authority said so (NXDOMAIN, an empty EndpointSlice list), never because of an error.
- ``name`` is unique within a snapshot and stable across snapshots for the same replica; it is
  the pool's key and the ``replica`` metric label. ``url`` may change under a stable name (a pod
  that got a new IP); the pool should treat that as remove + add.

What the pool does with a snapshot (the mapping, per replica ``name``):

    in snapshot, ready, not terminating      -> eligible; a new one is *starting* until its own
                                                health probe passes, then *ready*
    in snapshot, not ready, not terminating  -> *starting* (capacity is coming; take no traffic)
    in snapshot, terminating                 -> *draining* (no new requests, in-flight finish)
    was in the previous snapshot, now absent -> *draining*, removed once its in-flight reach 0

``ready`` here is the authority's opinion (Kubernetes readiness, or always True for static and
DNS, which only list what should serve); the pool's own health probing still decides when a
replica actually takes traffic.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "DiscoveredReplica",
    "Discovery",
    "DiscoveryErrors",
    "MembershipSink",
    "format_hostport",
]


@dataclass(frozen=True, slots=True)
class DiscoveredReplica:
    """One replica as a discovery source sees it."""

    name: str
    """Stable id: "host:port" for static/DNS, the pod name for Kubernetes."""
    url: str
    """Base URL without a trailing slash, e.g. "http://10.0.0.5:8000"."""
    ready: bool
    """The authority says it may receive traffic (always True for static/DNS)."""
    terminating: bool = False
    """Shutting down: finish in-flight requests, send nothing new."""


class MembershipSink(Protocol):
    def set_members(self, source: str, members: Sequence[DiscoveredReplica]) -> None:
        """Replace the whole membership of ``source`` with ``members`` (a full snapshot)."""
        ...


class Discovery(Protocol):
    source: str
    """The name this source reports under (the pool's snapshot key)."""

    async def run(self, sink: MembershipSink) -> None:
        """Push a full snapshot on every change until cancelled.

        Expected, transient failures are retried inside; only programming errors escape.
        """
        ...


def format_hostport(host: str, port: int) -> str:
    """Join host and port, bracketing IPv6 literals so the result is URL-safe."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


@dataclass(slots=True)
class DiscoveryErrors:
    """Failure bookkeeping for one source: counts by reason, logs only on transitions.

    A discovery loop that fails every interval must not log every interval; the exporter reads
    ``errors_total`` (a bounded set of reasons) and ``failing`` to publish the detail.
    """

    source: str
    logger: logging.Logger
    errors_total: dict[str, int] = field(default_factory=dict)
    failing: bool = False
    last_error: str | None = None

    def failure(self, reason: str, detail: str) -> None:
        self.errors_total[reason] = self.errors_total.get(reason, 0) + 1
        self.last_error = detail
        if not self.failing:
            self.failing = True
            self.logger.warning(
                "discovery %s failing (%s): %s; keeping the last good membership",
                self.source,
                reason,
                detail,
            )

    def success(self) -> None:
        if self.failing:
            self.failing = False
            self.logger.info("discovery %s recovered", self.source)
