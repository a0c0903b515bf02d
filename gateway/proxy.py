"""The OpenAI-compatible request path: validate, route, forward, stream back, retry, release.

Invariants:

* The body forwarded is the client's bytes (plus ``"model"`` spliced in when it was missing and
  a default applies); only ``model``, ``stream`` and the prompt prefix are read from it.
* Every ``router.pick`` that returns a replica is released exactly once, in a ``finally``:
  success, upstream failure, client disconnect (the handler is cancelled) and shutdown alike.
  The common case runs without a task (``serve_now``, ``gateway/exchange.py``), which releases
  in its own callbacks or hands the attempt, unreleased, to this path (``run`` with ``Resume``).
  The upstream response is closed in the same ``finally``, so an abandoned generation stops.
* Retries happen only before any byte reached the client, only for retryable errors (connect
  failure, disconnect before the first byte) and 502/503 answers, each on a replica not tried
  yet (``RequestInfo.exclude``), at most ``upstream.max_attempts`` attempts in all.
* Replicas are reached through ``gateway/replica_client.py`` (keep-alive connections on asyncio
  protocols); a streamed body is relayed at the transport level by ``gateway/relay.py``: from
  the replica connection's callbacks straight to the client's transport, with no task switch
  per chunk, and reading from the replica paused while the client's buffer is full.
* Response headers reach the client only with the first body byte, so a failure before it is
  still retryable. SSE is forwarded event by event as it arrives (a partial event is held back
  until its blank line), so a failure mid-stream is reported as one well-formed final
  ``data: {"error": ...}`` event, with no ``[DONE]``. A failed non-streaming response is a 502.
* A request that no replica can take yet waits in the ``RequestBuffer`` (``gateway/buffer.py``)
  before each attempt; a streaming one that waits long enough may be committed early (200 and
  SSE keep-alives), after which every failure, the buffer's refusals included, ends the stream
  with one ``data: {"error": ...}`` event instead of an HTTP status.
* Each attempt tells passive health whether the replica failed it (connection failure,
  disconnect, timeout, 5xx) or answered; a client that leaves first gives no verdict.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from gateway.auth import UpstreamCredentials
from gateway.buffer import RequestBuffer, SseKeepAlive, upstream_error_body
from gateway.catalog import ModelCatalog
from gateway.config import GatewayConfig, PrefixAffinityPolicy
from gateway.errors import (
    GatewayError,
    ModelRequired,
    NoReplicaAvailable,
    UnsupportedMediaType,
    UpstreamDisconnected,
    sse_error_event,
)
from gateway.exchange import Exchange, Host, Resume, Streaming
from gateway.exporter import GatewayMetrics, ModelLabels
from gateway.http_server import Request
from gateway.log import AccessRecord
from gateway.pool import ReplicaPool
from gateway.relay import SseRelay
from gateway.relay import event_boundary as _event_boundary  # noqa: F401  (tests)
from gateway.replica_client import (
    ReplicaClient,
    ReplicaConnection,
    ReplicaResponse,
    ResponseWaiter,
)
from gateway.request_info import (
    Endpoint,
    build_request_info,
    decode_body,
    requested_model,
    requested_stream,
    with_model,
)
from gateway.router import Router
from gateway.upstream import RETRY_STATUSES, error_reason, request_fields, response_fields
from policies.types import ReplicaId, RequestInfo

logger = logging.getLogger(__name__)

_KEPT_ERROR_BYTES = 64 * 1024  # a 502/503 body kept in case no other replica can be tried
_JSON = (("Content-Type", "application/json"),)
_ENDPOINTS: tuple[tuple[str, Endpoint], ...] = (
    ("/v1/chat/completions", "chat"),
    ("/v1/completions", "completions"),
    ("/v1/embeddings", "embeddings"),
)


@dataclass(slots=True)
class _Kept:
    status: int
    headers: list[tuple[bytes, bytes]]  # as the replica sent them
    body: bytes


class Proxy:
    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        pool: ReplicaPool,
        router: Router,
        catalog: ModelCatalog,
        client: Callable[[], ReplicaClient],
        metrics: GatewayMetrics,
        clock: Callable[[], float],
        buffer: RequestBuffer,
        credentials: UpstreamCredentials,
    ) -> None:
        self._cfg = cfg.upstream
        self._buffer = buffer
        self._default_model = cfg.models.default_model
        self._pool = pool
        self._router = router
        self._catalog = catalog
        self._client = client
        self._metrics = metrics
        self.labels = ModelLabels(pool, cfg.models.names)
        self._clock = clock
        self._auth = cfg.auth is not None  # priority then comes from the key, not the header
        self._credentials = credentials  # shared with the catalog's control-plane calls
        p = cfg.policy
        self._prefix: tuple[int, int] | None = None
        if router.needs_prefix and isinstance(p, PrefixAffinityPolicy):
            self._prefix = (p.block_chars, p.max_blocks)

    def routes(self) -> dict[str, tuple[str, Callable[[Request, AccessRecord], Awaitable[None]]]]:
        """The API paths the gateway serves: path -> (method, handler). Nothing else is ever
        forwarded (the gateway is not an open proxy)."""
        routes: dict[str, tuple[str, Callable[[Request, AccessRecord], Awaitable[None]]]] = {
            path: ("POST", self._endpoint(endpoint, path)) for path, endpoint in _ENDPOINTS
        }
        routes["/v1/models"] = ("GET", self.models)
        return routes

    async def models(self, request: Request, rec: AccessRecord) -> None:
        request.respond(
            200, (*_JSON, ("x-request-id", rec.request_id)), self._catalog.models_body()
        )

    def model_label(self, model: str | None) -> str:
        """The ``model`` metric label: the model if it is served, was served or is configured,
        "unknown" for any other name (clients must not mint label values), "" for none."""
        return self.labels.label(model)

    def _endpoint(
        self, endpoint: Endpoint, path: str
    ) -> Callable[[Request, AccessRecord], Awaitable[None]]:
        async def handle(request: Request, rec: AccessRecord) -> None:
            await self._handle(request, rec, endpoint, path)

        return handle

    def fast_routes(self) -> dict[str, Callable[[Request, AccessRecord, Host], bool]]:
        """The POST paths of ``routes`` that ``serve_now`` can take: path -> its entry."""

        def entry(endpoint: Endpoint, path: str) -> Callable[[Request, AccessRecord, Host], bool]:
            def serve(request: Request, rec: AccessRecord, host: Host) -> bool:
                return self.serve_now(request, rec, endpoint, path, host)

            return serve

        return {path: entry(endpoint, path) for path, endpoint in _ENDPOINTS}

    def serve_now(
        self, request: Request, rec: AccessRecord, endpoint: Endpoint, path: str, host: Host
    ) -> bool:
        """The common case without a task (``gateway/exchange.py``): the body is here, a
        replica can take the request now and has an idle connection. False, having changed
        nothing, for anything else (the task path then serves the request from the start,
        errors included)."""
        body = request.body_now()
        if body is None:
            return False
        ctype = request.header("Content-Type")
        if ctype is not None and not _is_json(ctype):
            return False
        try:
            info, headers, body = self._prepare(request, rec, endpoint, body)
        except GatewayError:
            return False
        if self._buffer.has_waiters(info.model):  # they go first
            return False
        decision = self._router.pick(info, count_miss=False)  # the task path counts a miss
        if decision is None:
            return False
        Exchange(self, request, rec, info, path, headers, body, decision, host).start()
        return True

    async def _handle(
        self, request: Request, rec: AccessRecord, endpoint: Endpoint, path: str
    ) -> None:
        ctype = request.header("Content-Type")
        if ctype is not None and not _is_json(ctype):
            raise UnsupportedMediaType(f"Content-Type must be application/json, got {ctype!r}")
        body = await request.read_body()
        info, headers, body = self._prepare(request, rec, endpoint, body)
        await self.run(request, rec, info, path, headers, body)

    def _prepare(
        self, request: Request, rec: AccessRecord, endpoint: Endpoint, body: bytes
    ) -> tuple[RequestInfo, bytes, bytes]:
        """The request's routing facts, the header lines for the replica, and the body to
        forward (``"model"`` spliced in when a default applies)."""
        obj = decode_body(body)
        model = requested_model(obj)
        stream = requested_stream(obj)
        if model is None:
            model = self._pick_default_model()
            body = with_model(body, model)
        rec.model = model
        info = build_request_info(
            obj,
            seq=self._router.next_seq(),
            model=model,
            stream=stream,
            endpoint=endpoint,
            prefix=self._prefix,
        )
        del obj
        # Under auth the key's class sets the priority and the header is ignored.
        priority = rec.priority if self._auth else self._buffer.priority(request.header)
        if priority:
            info = replace(info, priority=priority)
        credentials = self._credentials
        headers = request_fields(
            request.raw_headers,
            client_ip=request.remote,
            request_id=rec.request_id,
            forward_auth=credentials.forward_client_auth,
            authorization=credentials.authorization(),
        )
        return info, headers, body

    async def run(
        self,
        request: Request,
        rec: AccessRecord,
        info: RequestInfo,
        path: str,
        headers: bytes,
        body: bytes,
        resume: Resume | None = None,
    ) -> None:
        """Route, forward and answer (the task path); ``resume`` continues a request whose
        first attempt the callback path dispatched."""
        keepalive = (
            self._buffer.keepalive(request, rec.request_id, rec.started) if info.stream else None
        )
        try:
            await self._forward(request, rec, info, path, headers, body, keepalive, resume)
        except GatewayError as exc:
            committed = _committed(keepalive)
            if committed is None:
                raise
            rec.error = exc.code
            if exc.retry_after_s is not None:  # as the middleware counts uncommitted refusals
                self._metrics.rejections.labels(self.model_label(info.model), exc.code).inc()
            committed.fail(exc.body())

    def _pick_default_model(self) -> str:
        if self._default_model is not None:
            return self._default_model
        served = self._pool.served_models()
        if len(served) == 1:
            return next(iter(served))
        if not served:
            raise NoReplicaAvailable("no replica has listed its models yet; set 'model'")
        raise ModelRequired(
            f"'model' is required: the replicas serve {len(served)} models (see /v1/models)"
        )

    async def _forward(
        self,
        request: Request,
        rec: AccessRecord,
        info: RequestInfo,
        path: str,
        headers: bytes,
        body: bytes,
        keepalive: SseKeepAlive | None,
        resume: Resume | None,
    ) -> None:
        last_error: GatewayError | None = None
        kept: _Kept | None = None
        retry_reason: str | None = None  # why the previous attempt failed
        label = self.model_label(info.model)
        waiting_since: float | None = self._clock()  # until the first dispatch
        for attempt in range(1, self._cfg.max_attempts + 1):
            sent = info
            handed, resume = resume, None  # the first attempt, dispatched by the callback path
            if handed is not None:
                decision = handed.decision
            else:
                found = await self._buffer.acquire(
                    sent, since=rec.started, retry=attempt > 1, keepalive=keepalive
                )
                if found is None:  # a retry that no replica left untried can take
                    break
                decision = found
                if retry_reason is not None:  # counted only when another replica is tried
                    self._metrics.retries.labels(retry_reason).inc()
                waited = None if waiting_since is None else self._clock() - waiting_since
                self.dispatched(rec, label, decision.replica, attempt, waited)
            waiting_since = None
            rid = decision.replica
            ok = False
            healthy: bool | None = None  # passive health's verdict on the replica
            try:
                if handed is not None and handed.error is not None:
                    raise handed.error
                if handed is not None and handed.up is not None:
                    up = handed.up
                else:
                    up = await self._open(rid, request, path, headers, body)
                healthy = up.status < 500
                try:
                    if up.status >= 500:
                        self._metrics.upstream_errors.labels("http_5xx").inc()
                    if up.status not in RETRY_STATUSES or attempt == self._cfg.max_attempts:
                        ok = await self._respond(request, rec, rid, up, keepalive)
                        healthy = ok  # False also for a stream the replica broke off
                        return
                    kept, last_error = await self._keep(up), None
                    retry_reason = f"upstream_{up.status}"
                    logger.info("replica %s answered %d; trying another", rid, up.status)
                finally:
                    up.close()
            except GatewayError as exc:
                healthy = False
                # Retryable only while nothing reached the client (no first byte yet).
                if not exc.retryable or rec.ttfb_s is not None:
                    raise
                last_error, kept, retry_reason = exc, None, exc.code
                logger.info("replica %s failed before the first byte: %s", rid, exc.message)
            finally:
                self.attempt_done(rid, sent, label, ok=ok, healthy=healthy)
            info = replace(info, exclude=info.exclude | {rid})
        if kept is not None:
            committed = _committed(keepalive)
            if committed is not None:
                rec.error = "upstream_status"
                committed.fail(upstream_error_body(kept.status, kept.body))
                return
            fields = response_fields(kept.headers, rec.request_id)
            request.respond(kept.status, fields, kept.body)
            return
        if last_error is not None:
            raise last_error
        raise NoReplicaAvailable(f"no replica can take a request for model {info.model!r} now")

    def dispatched(
        self,
        rec: AccessRecord,
        label: str,
        rid: ReplicaId,
        attempt: int,
        waited_s: float | None,
    ) -> None:
        """An attempt handed to a replica: the access record and the dispatch metrics
        (``waited_s``: how long the request waited for its first dispatch; None after it)."""
        if waited_s is not None:
            self._metrics.queued(label, waited_s)
        self._metrics.dispatched(label)
        rec.replica, rec.attempts = rid, attempt

    def attempt_done(
        self, rid: ReplicaId, sent: RequestInfo, label: str, *, ok: bool, healthy: bool | None
    ) -> None:
        """The end of an attempt, whatever its outcome: the replica is released (once)."""
        self._router.release(rid, sent, ok=ok, healthy=healthy)
        self._metrics.finished(label)

    async def _open(
        self,
        rid: ReplicaId,
        request: Request,
        path: str,
        headers: bytes,
        body: bytes,
    ) -> ReplicaResponse:
        try:
            return await self._client().open(
                self._pool.url(rid),
                _with_query(path, request.query),
                headers,
                body,
                first_byte_timeout_s=self._cfg.first_byte_timeout_s,
            )
        except GatewayError as exc:
            self._metrics.upstream_errors.labels(error_reason(exc)).inc()
            raise

    async def _keep(self, up: ReplicaResponse) -> _Kept:
        try:
            body = await up.read_rest(_KEPT_ERROR_BYTES)
        except UpstreamDisconnected:
            body = b""
        return _Kept(up.status, up.raw_headers, body)

    async def _respond(
        self,
        request: Request,
        rec: AccessRecord,
        rid: ReplicaId,
        up: ReplicaResponse,
        keepalive: SseKeepAlive | None,
    ) -> bool:
        """Relay the replica's answer; whether the replica served it well."""
        committed = _committed(keepalive)
        if up.content_type == "text/event-stream":
            return await self._stream(request, rec, rid, up, committed)
        if committed is not None:  # an error answer; the client already has a 200 stream
            rec.error = "upstream_status"
            body = await self._keep(up)
            committed.fail(upstream_error_body(up.status, body.body))
            return up.status < 500
        return await self._buffered(request, rec, rid, up)

    def _first_byte(self, rec: AccessRecord) -> None:
        rec.ttfb_s = self._clock() - rec.started

    async def _stream(
        self,
        request: Request,
        rec: AccessRecord,
        rid: ReplicaId,
        up: ReplicaResponse,
        committed: SseKeepAlive | None,
    ) -> bool:
        s = self.stream_start(request, rec, up, committed)
        try:
            up.relay_to(s.relay)
            error = await s.relay.run(s.resp.drain)
            return self.stream_end(rec, rid, up, s, error)
        finally:
            self.stream_accounted(rec, s)

    def stream_start(
        self,
        request: Request,
        rec: AccessRecord,
        up: ReplicaResponse,
        committed: SseKeepAlive | None,
    ) -> Streaming:
        """The response head and the first whole events to the client, in one write; the
        caller then hands the replica's body to ``relay``. ``ConnectionResetError`` if the
        client is already gone."""
        if committed is not None and committed.response is not None:
            resp = committed.response  # 200 and SSE headers went out while the request waited
        else:
            resp = request.stream(up.status, response_fields(up.raw_headers, rec.request_id))
        transport = resp.transport
        if transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        # From here on the replica's bytes go to the client's transport from inside the replica
        # connection's callbacks (gateway/relay.py): no task switch or future per chunk.
        relay = SseRelay(transport, chunked=resp.chunked, source=up)
        first = relay.take_first(up.first)
        self._first_byte(rec)
        ttft = rec.ttfb_s or 0.0
        label = self.model_label(rec.model)
        self._metrics.first_token(label, ttft)
        resp.write(first)  # with the response head, in one write
        return Streaming(resp, relay, label, ttft)

    def stream_end(
        self,
        rec: AccessRecord,
        rid: ReplicaId,
        up: ReplicaResponse,
        s: Streaming,
        error: GatewayError | None,
    ) -> bool:
        """End the client's stream (with an error event if the replica broke it off);
        whether the replica served it well."""
        ok = up.status < 500
        if error is not None:
            self._metrics.upstream_errors.labels("disconnect").inc()
            rec.error = error.code
            logger.warning("stream from %s failed after its first byte: %s", rid, error.message)
            s.resp.write(sse_error_event(error))
            ok = False
        s.resp.end()
        return ok

    def stream_accounted(self, rec: AccessRecord, s: Streaming) -> None:
        """Tokens and timing of a stream, once, however it ended."""
        relay = s.relay
        self._metrics.stream_finished(
            s.label,
            span_s=self._clock() - rec.started - s.ttft,
            newlines=relay.newlines,
            tail=relay.before + relay.last,
            chat=rec.path == "/v1/chat/completions",
        )

    async def _buffered(
        self, request: Request, rec: AccessRecord, rid: ReplicaId, up: ReplicaResponse
    ) -> bool:
        parts = [up.first]
        size = len(up.first)
        try:
            while size <= self._cfg.max_buffered_response_bytes:
                chunk = await up.next_chunk()
                if not chunk:
                    body = parts[0] if len(parts) == 1 else b"".join(parts)
                    return self.buffered_done(request, rec, up, body)
                parts.append(chunk)
                size += len(chunk)
        except UpstreamDisconnected:
            self._metrics.upstream_errors.labels("disconnect").inc()
            raise
        return await self._pass_through(request, rec, rid, up, parts)

    def buffered_done(
        self, request: Request, rec: AccessRecord, up: ReplicaResponse, body: bytes
    ) -> bool:
        """Answer with a whole body; whether the replica served it well."""
        self._first_byte(rec)
        request.respond(up.status, response_fields(up.raw_headers, rec.request_id), body)
        if up.status == 200:
            self._metrics.response_finished(self.model_label(rec.model), body)
        return up.status < 500

    @property
    def max_attempts(self) -> int:
        return self._cfg.max_attempts

    @property
    def max_buffered_bytes(self) -> int:
        return self._cfg.max_buffered_response_bytes

    def send_now(
        self,
        request: Request,
        rid: ReplicaId,
        path: str,
        headers: bytes,
        body: bytes,
        waiter: ResponseWaiter,
    ) -> ReplicaConnection | None:
        """``ReplicaClient.send_now`` to ``rid``: None when it has no idle connection."""
        return self._client().send_now(
            self._pool.url(rid),
            _with_query(path, request.query),
            headers,
            body,
            first_byte_timeout_s=self._cfg.first_byte_timeout_s,
            waiter=waiter,
        )

    def count_upstream_error(self, reason: str) -> None:
        self._metrics.upstream_errors.labels(reason).inc()

    async def _pass_through(
        self,
        request: Request,
        rec: AccessRecord,
        rid: ReplicaId,
        up: ReplicaResponse,
        parts: list[bytes],
    ) -> bool:
        # Too large to hold: stream it, with the replica's length so a client detects truncation.
        fields = response_fields(up.raw_headers, rec.request_id)
        resp = request.stream(up.status, fields, length=up.content_length)
        self._first_byte(rec)
        for part in parts:
            resp.write(part)
        await resp.drain()
        before, last = b"", parts[-1]  # the usage object is at the end of the body
        try:
            while chunk := await up.next_chunk():
                resp.write(chunk)
                await resp.drain()
                before, last = last, chunk
        except UpstreamDisconnected as exc:
            self._metrics.upstream_errors.labels("disconnect").inc()
            rec.error = exc.code
            logger.warning("response from %s failed after its first byte: %s", rid, exc.message)
            resp.abort()  # the client sees a broken response, never a short 200
            return False
        resp.end()
        if up.status == 200:
            self._metrics.response_finished(self.model_label(rec.model), before + last)
        return up.status < 500


def _committed(keepalive: SseKeepAlive | None) -> SseKeepAlive | None:
    """The request's early-committed SSE answer, if it waited long enough to get one."""
    return keepalive if keepalive is not None and keepalive.response is not None else None


def _with_query(path: str, query: str) -> str:
    return f"{path}?{query}" if query else path


def _is_json(content_type: str) -> bool:
    mime = content_type.partition(";")[0].strip().lower()
    return mime == "application/json" or mime.endswith("+json")
