"""An in-memory Kubernetes API server for EndpointSlices, served by a real aiohttp app.

It speaks the wire protocol kube-apiserver speaks to a list/watch client: a List response with
a resourceVersion; a chunked watch stream of JSON lines from a resourceVersion (backlog first,
then live events); 410 Gone for a compacted resourceVersion (as the HTTP status or as an ERROR
event); 404 for an API version it does not serve; 401 without the expected bearer token.
Tests seed it with recorded list responses and feed it recorded watch events, and can drop or
end the watch connections.
"""

from __future__ import annotations

import asyncio
import copy
import json
import ssl
from dataclasses import dataclass
from typing import Any

from aiohttp import web

_DROP = "drop"
_END = "end"
SERVICE_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True)
class SeenRequest:
    version: str
    watch: bool
    query: dict[str, str]
    authorization: str | None
    peer_cn: str | None


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeApiServer:
    def __init__(
        self,
        *,
        versions: tuple[str, ...] = ("v1",),
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.versions = set(versions)
        self.token = token
        self.ssl_context = ssl_context
        self.objects: dict[str, dict[str, Any]] = {}
        self.resource_version = 0
        self.compacted_before = 0
        self.gone_as_event = False
        self.fail_next: list[int] = []  # HTTP statuses for the next requests, in order
        self.chunk_bytes: int | None = None  # split watch writes to exercise line reassembly
        self.requests: list[SeenRequest] = []
        self.watch_streams = 0  # watch responses that started streaming
        self._stream_started = asyncio.Event()
        self._history: list[tuple[int, bytes]] = []
        self._watchers: set[asyncio.Queue[bytes | str]] = set()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    # -- state ---------------------------------------------------------------------------

    def load_list(self, body: dict[str, Any]) -> None:
        for item in body["items"]:
            self.objects[item["metadata"]["name"]] = copy.deepcopy(item)
        self.resource_version = int(body["metadata"]["resourceVersion"])

    def emit(self, event: dict[str, Any], *, broadcast: bool = True) -> None:
        """Apply a recorded watch event and send it to every open watch.

        ``broadcast=False`` models an event the current watchers miss (they are about to be
        dropped); it is still in the history a resuming watch replays.
        """
        line = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        obj = event["object"]
        if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
            rv = int(obj["metadata"]["resourceVersion"])
            stored = {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
            if event["type"] == "DELETED":
                self.objects.pop(obj["metadata"]["name"], None)
            else:
                self.objects[obj["metadata"]["name"]] = stored
            self.resource_version = max(self.resource_version, rv)
            self._history.append((rv, line))
        elif event["type"] == "BOOKMARK":
            rv = int(obj["metadata"]["resourceVersion"])
            self.resource_version = max(self.resource_version, rv)
        if broadcast:
            for queue in self._watchers:
                queue.put_nowait(line)

    def compact(self) -> None:
        """Forget history: resuming from any older resourceVersion gets 410 Gone (the current
        one, which a list returns, stays valid)."""
        self.compacted_before = self.resource_version
        self._history.clear()

    async def wait_streams(self, count: int, limit_s: float = 2.0) -> None:
        """Until ``count`` watch streams have been opened in total (events sent after that
        reach the client live)."""
        async with asyncio.timeout(limit_s):
            while self.watch_streams < count:
                self._stream_started.clear()
                await self._stream_started.wait()

    def drop_watches(self) -> None:
        for queue in self._watchers:
            queue.put_nowait(_DROP)

    def end_watches(self) -> None:
        for queue in self._watchers:
            queue.put_nowait(_END)

    def lists(self) -> list[SeenRequest]:
        return [r for r in self.requests if not r.watch]

    def watches(self) -> list[SeenRequest]:
        return [r for r in self.requests if r.watch]

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get(
            "/apis/discovery.k8s.io/{version}/namespaces/{namespace}/endpointslices", self._handle
        )
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=self.ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- HTTP ----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        version = request.match_info["version"]
        watch = request.query.get("watch") in ("true", "1")
        peercert = request.transport.get_extra_info("peercert") if request.transport else None
        peer_cn = None
        if peercert:
            peer_cn = dict(x[0] for x in peercert["subject"]).get("commonName")
        self.requests.append(
            SeenRequest(
                version, watch, dict(request.query), request.headers.get("Authorization"), peer_cn
            )
        )
        if (
            self.token is not None
            and request.headers.get("Authorization") != f"Bearer {self.token}"
        ):
            return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
        if self.fail_next:
            code = self.fail_next.pop(0)
            return web.json_response(_status(code, "InternalError", "injected"), status=code)
        if version not in self.versions:
            return web.json_response(
                _status(404, "NotFound", "the server could not find the requested resource"),
                status=404,
            )
        if watch:
            return await self._watch(request)
        selected = self._selected(
            request.match_info["namespace"], request.query.get("labelSelector", "")
        )
        items = [o for o in self.objects.values() if selected(o)]
        return web.json_response(
            {
                "kind": "EndpointSliceList",
                "apiVersion": f"discovery.k8s.io/{version}",
                "metadata": {"resourceVersion": str(self.resource_version)},
                "items": items,
            }
        )

    def _selected(self, namespace: str, selector: str) -> Any:
        key, _, value = selector.partition("=")

        def match(obj: dict[str, Any]) -> bool:
            labels = obj["metadata"].get("labels") or {}
            return obj["metadata"].get("namespace") == namespace and (
                not key or labels.get(key) == value
            )

        return match

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        since = int(request.query["resourceVersion"])
        gone = since < self.compacted_before
        if gone and not self.gone_as_event:
            message = f"too old resource version: {since} ({self.compacted_before})"
            return web.json_response(_status(410, "Expired", message), status=410)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if gone:
            event = {"type": "ERROR", "object": _status(410, "Expired", "too old resource version")}
            await resp.write(json.dumps(event).encode() + b"\n")
            await resp.write_eof()
            return resp
        queue: asyncio.Queue[bytes | str] = asyncio.Queue()
        self._watchers.add(queue)
        backlog = [line for rv, line in self._history if rv > since]
        self.watch_streams += 1
        self._stream_started.set()
        try:
            for line in backlog:
                await self._write(resp, line)
            while (item := await queue.get()) != _END:
                if item == _DROP:
                    assert request.transport is not None
                    request.transport.close()  # mid-stream: the client sees a broken chunked body
                    return resp
                assert isinstance(item, bytes)
                await self._write(resp, item)
        finally:
            self._watchers.discard(queue)
        await resp.write_eof()
        return resp

    async def _write(self, resp: web.StreamResponse, line: bytes) -> None:
        step = self.chunk_bytes or len(line)
        for start in range(0, len(line), step):
            await resp.write(line[start : start + step])
