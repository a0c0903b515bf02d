"""EndpointSlice objects (discovery.k8s.io v1 and v1beta1) decoded and turned into replicas.

Pure: no I/O. Only the fields kvgate needs are decoded; everything else is ignored, so newer
API servers that add fields cannot break decoding. v1 and v1beta1 share every field used here
(v1beta1 carries ``topology`` where v1 has ``nodeName``/``zone``; neither is read).

Condition mapping (nil values interpreted as the API documents them):

    ready        nil -> true     DiscoveredReplica.ready
    terminating  nil -> false    DiscoveredReplica.terminating
    serving      not used: a terminating replica that is still serving is exactly what
                 "draining" means (in-flight requests finish, nothing new is sent), so the pool
                 treats every terminating replica alike.

so: ready -> ready; not ready and not terminating -> starting; terminating -> draining.

Only the first address of an endpoint is used: the API says addresses are fungible and
consumers may use just the first. Replica names are the targetRef name (the pod) when present,
else "address:port".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from gateway.discovery.base import DiscoveredReplica, format_hostport

__all__ = [
    "EndpointSlice",
    "EndpointSliceList",
    "PortSpec",
    "SliceMembers",
    "Status",
    "WatchEvent",
    "merge_members",
    "slice_members",
]

PortSpec = int | str | None
"""Which port of the Service: a number (used as is), a port name, or None (the only port)."""


class _Base(msgspec.Struct, rename="camel"):
    pass


class _ObjectMeta(_Base):
    name: str = ""
    namespace: str = ""
    resource_version: str = ""


class _ListMeta(_Base):
    resource_version: str = ""
    continue_: str = msgspec.field(name="continue", default="")


class _Conditions(_Base):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class _ObjectReference(_Base):
    kind: str = ""
    name: str = ""
    namespace: str = ""


class _Endpoint(_Base):
    addresses: list[str]
    conditions: _Conditions = msgspec.field(default_factory=_Conditions)
    target_ref: _ObjectReference | None = None


class _Port(_Base):
    name: str | None = None
    port: int | None = None
    protocol: str | None = None


class EndpointSlice(_Base):
    metadata: _ObjectMeta
    address_type: str = ""
    # The API serialises empty lists as null.
    endpoints: list[_Endpoint] | None = None
    ports: list[_Port] | None = None


class EndpointSliceList(_Base):
    metadata: _ListMeta
    items: list[EndpointSlice] | None = None


class Status(_Base):
    """A metav1.Status, as sent in ERROR watch events and error responses."""

    code: int = 0
    reason: str = ""
    message: str = ""


class WatchEvent(_Base):
    type: str
    object: msgspec.Raw


class BookmarkObject(_Base):
    metadata: _ObjectMeta


@dataclass(frozen=True, slots=True)
class SliceMembers:
    """The replicas one slice contributes, or why it contributes none."""

    replicas: tuple[DiscoveredReplica, ...]
    problem: str | None = None


def select_port(slice_: EndpointSlice, want: PortSpec) -> int | None:
    if isinstance(want, int):
        return want
    tcp = [p for p in slice_.ports or () if (p.protocol or "TCP") == "TCP" and p.port is not None]
    if want is None:
        return tcp[0].port if len(tcp) == 1 else None
    for p in tcp:
        if p.name == want:
            return p.port
    return None


def slice_members(slice_: EndpointSlice, port: PortSpec, scheme: str) -> SliceMembers:
    endpoints = slice_.endpoints or []
    if not endpoints:
        return SliceMembers(())
    number = select_port(slice_, port)
    if number is None:
        names = sorted(p.name or str(p.port) for p in slice_.ports or ())
        wanted = "the only TCP port" if port is None else f"port {port!r}"
        return SliceMembers((), f"no {wanted} in EndpointSlice ports {names}")
    replicas = []
    for ep in endpoints:
        if not ep.addresses:
            continue
        hostport = format_hostport(ep.addresses[0], number)
        name = ep.target_ref.name if ep.target_ref and ep.target_ref.name else hostport
        cond = ep.conditions
        replicas.append(
            DiscoveredReplica(
                name=name,
                url=f"{scheme}://{hostport}",
                ready=cond.ready is not False,
                terminating=cond.terminating is True,
            )
        )
    return SliceMembers(tuple(replicas))


def merge_members(
    per_slice: Iterable[tuple[DiscoveredReplica, ...]],
) -> tuple[DiscoveredReplica, ...]:
    """Union of all slices, sorted by name.

    The EndpointSlice controller may briefly list one pod in two slices while it rebalances;
    the most available copy wins (not terminating, then ready), so a move between slices never
    looks like a departure.
    """
    merged: dict[str, DiscoveredReplica] = {}
    for replicas in per_slice:
        for r in replicas:
            seen = merged.get(r.name)
            if seen is None or _rank(r) > _rank(seen):
                merged[r.name] = r
    return tuple(merged[name] for name in sorted(merged))


def _rank(r: DiscoveredReplica) -> tuple[bool, bool]:
    return (not r.terminating, r.ready)
