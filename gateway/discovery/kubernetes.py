"""Kubernetes membership: list then watch the EndpointSlices of one Service via the API server.

Protocol (what client-go's reflector does, minus the cache machinery):

1. LIST  /apis/discovery.k8s.io/{v1|v1beta1}/namespaces/{ns}/endpointslices
         ?labelSelector=kubernetes.io/service-name={service}   (paged with limit/continue)
   -> the complete set of slices and the list's resourceVersion. v1 is tried first; a 404
   means an old cluster (< 1.21) and v1beta1 is used. Every relist probes again, so a cluster
   upgrade is followed without a restart.
2. WATCH the same path from that resourceVersion, allowWatchBookmarks=true, timeoutSeconds=N.
   The response is a chunked stream of JSON lines {"type", "object"}; ADDED/MODIFIED replace a
   slice, DELETED removes it, BOOKMARK only advances the resourceVersion.
3. When the stream ends (server timeout, dropped connection), watch again from the last
   resourceVersion seen, so nothing is missed and nothing is relisted needlessly.
4. 410 Gone (as the HTTP status, or as an ERROR event with code 410) means that
   resourceVersion is too old to resume from: relist at once. Any other failure (connect
   error, timeout, 5xx, 401/403 while RBAC is being fixed) is retried with capped exponential
   backoff and jitter; HTTP errors also force a relist, connection errors resume the watch.

Invariants:
- The snapshot pushed to the sink is the merge of all slices (see endpointslice.py for the
  condition mapping); it is pushed after the first list and then only when it changes.
- While the API server is unreachable nothing is pushed: the last good membership stays.
- Errors are counted by reason in ``errors`` and logged on transitions only.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
import msgspec

from gateway.discovery.base import DiscoveredReplica, DiscoveryErrors, MembershipSink
from gateway.discovery.endpointslice import (
    BookmarkObject,
    EndpointSlice,
    EndpointSliceList,
    PortSpec,
    SliceMembers,
    Status,
    WatchEvent,
    merge_members,
    slice_members,
)
from gateway.discovery.kube_auth import KubeConfigError, KubeCredentials

__all__ = ["API_VERSIONS", "KubernetesDiscovery"]

logger = logging.getLogger(__name__)

API_VERSIONS: Final = ("v1", "v1beta1")
_LIST_PAGE_SIZE: Final = 500
_MAX_LINE_BYTES: Final = 64 * 1024 * 1024  # far above the largest possible slice (1000 endpoints)
_ERROR_BODY_BYTES: Final = 4096


class _Gone(Exception):
    """The resourceVersion is too old: relist."""


class _ApiError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class KubernetesDiscovery:
    """Replicas of one Service, from its EndpointSlices."""

    def __init__(
        self,
        credentials: KubeCredentials,
        service: str,
        *,
        namespace: str | None = None,
        port: PortSpec = None,
        scheme: str = "http",
        watch_timeout_s: float = 300.0,
        request_timeout_s: float = 10.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        rng: random.Random | None = None,
        source: str = "kubernetes",
    ) -> None:
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s")
        if watch_timeout_s < 1 or request_timeout_s <= 0:
            raise ValueError("watch_timeout_s must be >= 1 and request_timeout_s > 0")
        self.source = source
        self.errors = DiscoveryErrors(source, logger)
        self.relists_total = 0
        self.watches_total = 0
        """Watch streams opened (a server-side timeout or a drop opens the next one)."""
        self.api_version: str | None = None
        """The EndpointSlice API version in use, once the first list succeeded."""
        self._creds = credentials
        self._service = service
        self._namespace = namespace or credentials.namespace or "default"
        self._port = port
        self._scheme = scheme
        self._watch_timeout_s = watch_timeout_s
        self._request_timeout_s = request_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._rng = rng or random.Random()
        self._slices: dict[str, SliceMembers] = {}
        self._resource_version: str | None = None
        self._pushed: tuple[DiscoveredReplica, ...] | None = None
        self._watch_delivered = False

    async def run(self, sink: MembershipSink) -> None:
        connector = aiohttp.TCPConnector(ssl=self._creds.ssl_context or True, limit=2)
        async with aiohttp.ClientSession(connector=connector) as session:
            attempt = 0
            while True:
                self._watch_delivered = False
                try:
                    if self._resource_version is None:
                        await self._list(session, sink)
                    await self._watch(session, sink)
                except _Gone:
                    self._resource_version = None
                    self.relists_total += 1
                except _ApiError as exc:
                    self.errors.failure(exc.reason, str(exc))
                    self._resource_version = None
                except KubeConfigError as exc:
                    self.errors.failure("credentials", str(exc))
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.errors.failure(_reason(exc), f"{type(exc).__name__}: {exc}")
                # Only a watch that delivered events proves the loop is healthy; a list that
                # succeeds before a watch that keeps failing (e.g. RBAC allows list, not watch)
                # must still back off.
                if self._watch_delivered:
                    attempt = 0
                    continue
                await asyncio.sleep(self._backoff(attempt))
                attempt += 1

    def _backoff(self, attempt: int) -> float:
        delay = min(self._backoff_max_s, self._backoff_initial_s * 2.0 ** min(attempt, 32))
        # Jitter spreads the reconnects of many gateway replicas after an API server restart.
        return delay * (0.5 + 0.5 * self._rng.random())

    def _path(self, version: str) -> str:
        return f"/apis/discovery.k8s.io/{version}/namespaces/{self._namespace}/endpointslices"

    async def _get(
        self, session: aiohttp.ClientSession, url: str, params: dict[str, str], watch: bool
    ) -> aiohttp.ClientResponse:
        if watch:
            timeout = aiohttp.ClientTimeout(
                total=None,
                sock_connect=self._request_timeout_s,
                # The server ends the watch after timeoutSeconds and sends bookmarks meanwhile;
                # silence well past that means a dead connection.
                sock_read=self._watch_timeout_s + 30.0,
            )
        else:
            timeout = aiohttp.ClientTimeout(total=self._request_timeout_s)
        headers = {"Accept": "application/json", **await self._creds.auth_headers()}
        return await session.get(
            url,
            params=params,
            headers=headers,
            timeout=timeout,
            server_hostname=self._creds.server_hostname,
        )

    async def _list(self, session: aiohttp.ClientSession, sink: MembershipSink) -> None:
        for version in API_VERSIONS:
            listed = await self._list_version(session, version)
            if listed is not None:
                break
        else:
            raise _ApiError(
                "not_found", f"API server {self._creds.server} serves no EndpointSlice API"
            )
        slices, resource_version = listed
        if version != self.api_version:
            logger.info(
                "discovery %s: watching EndpointSlices of %s/%s via discovery.k8s.io/%s",
                self.source,
                self._namespace,
                self._service,
                version,
            )
            self.api_version = version
        self._slices = {s.metadata.name: self._members_of(s) for s in slices}
        self._resource_version = resource_version
        # Success is declared when the watch opens, not here: with RBAC that allows list but
        # not watch, each round would otherwise log a recovery and a new failure.
        self._push(sink)

    async def _list_version(
        self, session: aiohttp.ClientSession, version: str
    ) -> tuple[list[EndpointSlice], str] | None:
        slices: list[EndpointSlice] = []
        params = {"labelSelector": self._selector(), "limit": str(_LIST_PAGE_SIZE)}
        while True:
            async with await self._get(
                session, self._creds.server + self._path(version), params, watch=False
            ) as resp:
                if resp.status == 404:
                    return None
                await self._raise_for_status(resp)
                body = await resp.read()
            try:
                page = msgspec.json.decode(body, type=EndpointSliceList)
            except msgspec.DecodeError as exc:
                raise _ApiError("protocol", f"bad EndpointSliceList: {exc}") from exc
            slices.extend(page.items or ())
            if not page.metadata.continue_:
                return slices, page.metadata.resource_version
            params["continue"] = page.metadata.continue_

    async def _watch(self, session: aiohttp.ClientSession, sink: MembershipSink) -> None:
        """Follow one watch stream to its end (sets ``_watch_delivered`` on the first event)."""
        assert self._resource_version is not None and self.api_version is not None
        params = {
            "labelSelector": self._selector(),
            "watch": "true",
            "resourceVersion": self._resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(int(self._watch_timeout_s)),
        }
        url = self._creds.server + self._path(self.api_version)
        async with await self._get(session, url, params, watch=True) as resp:
            if resp.status == 410:
                raise _Gone
            await self._raise_for_status(resp)
            self.errors.success()
            self.watches_total += 1
            async for line in _lines(resp.content):
                self._apply(line, sink)
                self._watch_delivered = True  # not for ERROR events: they raise above

    def _apply(self, line: bytes, sink: MembershipSink) -> None:
        try:
            event = msgspec.json.decode(line, type=WatchEvent)
            if event.type == "ERROR":
                status = msgspec.json.decode(event.object, type=Status)
                if status.code == 410:
                    raise _Gone
                raise _ApiError("watch_error", f"watch ERROR {status.code}: {status.message}")
            if event.type == "BOOKMARK":
                bookmark = msgspec.json.decode(event.object, type=BookmarkObject)
                self._resource_version = bookmark.metadata.resource_version
                return
            obj = msgspec.json.decode(event.object, type=EndpointSlice)
        except msgspec.DecodeError as exc:
            raise _ApiError("protocol", f"bad watch event: {exc}") from exc
        if event.type in ("ADDED", "MODIFIED"):
            self._slices[obj.metadata.name] = self._members_of(obj)
        elif event.type == "DELETED":
            self._slices.pop(obj.metadata.name, None)
        else:
            raise _ApiError("protocol", f"unknown watch event type {event.type!r}")
        self._resource_version = obj.metadata.resource_version
        self._push(sink)

    def _members_of(self, slice_: EndpointSlice) -> SliceMembers:
        members = slice_members(slice_, self._port, self._scheme)
        previous = self._slices.get(slice_.metadata.name)
        if members.problem and (previous is None or previous.problem != members.problem):
            logger.warning(
                "discovery %s: EndpointSlice %s ignored: %s",
                self.source,
                slice_.metadata.name,
                members.problem,
            )
        return members

    def _push(self, sink: MembershipSink) -> None:
        members = merge_members(s.replicas for s in self._slices.values())
        if members != self._pushed:
            self._pushed = members
            sink.set_members(self.source, members)

    def _selector(self) -> str:
        return f"kubernetes.io/service-name={self._service}"

    @staticmethod
    async def _raise_for_status(resp: aiohttp.ClientResponse) -> None:
        if resp.status == 200:
            return
        body = await resp.content.read(_ERROR_BODY_BYTES)
        try:
            message = msgspec.json.decode(body, type=Status).message
        except msgspec.DecodeError:
            message = body.decode("utf-8", "replace")
        reason = "auth" if resp.status in (401, 403) else "http"
        raise _ApiError(reason, f"HTTP {resp.status}: {message}")


def _reason(exc: aiohttp.ClientError | TimeoutError) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "tls"
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return "disconnect"
    return "connect"


async def _lines(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    # StreamReader.readline caps lines at 128 KiB; a slice with 1000 endpoints is larger.
    buffer = bytearray()
    async for chunk in stream.iter_any():
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end]).strip()
            del buffer[: end + 1]
            if line:
                yield line
        if len(buffer) > _MAX_LINE_BYTES:
            raise _ApiError("protocol", "watch event larger than 64 MiB")
    if buffer.strip():
        yield bytes(buffer).strip()
