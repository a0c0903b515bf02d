"""The OpenAI-compatible request path: validate, route, forward, stream back, retry, release.

Invariants:

* The body forwarded is the client's bytes (plus ``"model"`` spliced in when it was missing and
  a default applies); only ``model``, ``stream`` and the prompt prefix are read from it.
* Every ``router.pick`` that returns a replica is released exactly once, in a ``finally``:
  success, upstream failure, client disconnect (the handler is cancelled) and shutdown alike.
  The upstream response is closed in the same ``finally``, so an abandoned generation stops.
* Retries happen only before any byte reached the client, only for retryable errors (connect
  failure, disconnect before the first byte) and 502/503 answers, each on a replica not tried
  yet (``RequestInfo.exclude``), at most ``upstream.max_attempts`` attempts in all.
* Response headers reach the client only with the first body byte, so a failure before it is
  still retryable. SSE is forwarded event by event as it arrives (a partial event is held back
  until its blank line), so a failure mid-stream is reported as one well-formed final
  ``data: {"error": ...}`` event, with no ``[DONE]``. A failed non-streaming response is a 502.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.catalog import ModelCatalog
from gateway.config import GatewayConfig, PrefixAffinityPolicy
from gateway.errors import (
    GatewayError,
    ModelNotFound,
    ModelRequired,
    NoReplicaAvailable,
    RequestTooLarge,
    UnsupportedMediaType,
    UpstreamDisconnected,
    sse_error_event,
)
from gateway.exporter import GatewayMetrics
from gateway.log import AccessRecord
from gateway.pool import ReplicaPool
from gateway.request_info import (
    Endpoint,
    build_request_info,
    decode_body,
    requested_model,
    requested_stream,
    with_model,
)
from gateway.router import Router
from gateway.upstream import (
    UpstreamResponse,
    error_reason,
    join_url,
    open_response,
    request_headers,
    response_headers,
)
from policies.types import ReplicaId, RequestInfo

logger = logging.getLogger(__name__)

ACCESS = web.RequestKey("access", AccessRecord)  # filled by the request middleware
_KEPT_ERROR_BYTES = 64 * 1024  # a 502/503 body kept in case no other replica can be tried
_MAX_SSE_HOLDBACK = 1024 * 1024  # an upstream that never ends an event is forwarded anyway
_RETRY_STATUSES = (502, 503)


@dataclass(slots=True)
class _Kept:
    status: int
    headers: CIMultiDict[str]
    body: bytes


class Proxy:
    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        pool: ReplicaPool,
        router: Router,
        catalog: ModelCatalog,
        session: Callable[[], aiohttp.ClientSession],
        metrics: GatewayMetrics,
        clock: Callable[[], float],
    ) -> None:
        self._cfg = cfg.upstream
        self._default_model = cfg.models.default_model
        self._pool = pool
        self._router = router
        self._catalog = catalog
        self._session = session
        self._metrics = metrics
        self._clock = clock
        p = cfg.policy
        self._prefix: tuple[int, int] | None = None
        if router.needs_prefix and isinstance(p, PrefixAffinityPolicy):
            self._prefix = (p.block_chars, p.max_blocks)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._endpoint("chat", "/v1/chat/completions"))
        app.router.add_post("/v1/completions", self._endpoint("completions", "/v1/completions"))
        app.router.add_post("/v1/embeddings", self._endpoint("embeddings", "/v1/embeddings"))
        app.router.add_get("/v1/models", self.models)

    async def models(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._catalog.models_body(), content_type="application/json")

    def model_label(self, model: str | None) -> str:
        """The ``model`` metric label: the model if some replica serves it, "unknown" for any
        other name (clients must not mint label values), "" for requests without a model."""
        if model is None:
            return ""
        return model if model in self._pool.served_models() else "unknown"

    def _endpoint(
        self, endpoint: Endpoint, path: str
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._handle(request, endpoint, path)

        return handle

    async def _handle(
        self, request: web.Request, endpoint: Endpoint, path: str
    ) -> web.StreamResponse:
        rec = request[ACCESS]
        ctype = request.headers.get("Content-Type")
        if ctype is not None and not _is_json(request.content_type):
            raise UnsupportedMediaType(
                f"Content-Type must be application/json, got {request.content_type!r}"
            )
        body = await self._read_body(request)
        obj = decode_body(body)
        model = requested_model(obj)
        stream = requested_stream(obj)
        if model is None:
            model = self._pick_default_model()
            body = with_model(body, model)
        rec.model = model
        self._check_model(model)
        info = build_request_info(
            obj,
            seq=self._router.next_seq(),
            model=model,
            stream=stream,
            endpoint=endpoint,
            prefix=self._prefix,
        )
        del obj
        headers = request_headers(
            request.headers, client_ip=request.remote, request_id=rec.request_id
        )
        return await self._forward(request, rec, info, path, headers, body)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self._cfg.max_body_bytes
        too_large = RequestTooLarge(f"request body exceeds {limit} bytes")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        parts: list[bytes] = []
        size = 0
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > limit:
                raise too_large
            parts.append(chunk)
        return b"".join(parts)

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

    def _check_model(self, model: str) -> None:
        if model in self._pool.served_models():
            return
        if len(self._pool) == 0 or self._pool.has_unlisted():
            raise NoReplicaAvailable(f"no replica is ready to serve model {model!r} yet")
        raise ModelNotFound(f"The model `{model}` does not exist.")

    async def _forward(
        self,
        request: web.Request,
        rec: AccessRecord,
        info: RequestInfo,
        path: str,
        headers: CIMultiDict[str],
        body: bytes,
    ) -> web.StreamResponse:
        last_error: GatewayError | None = None
        kept: _Kept | None = None
        retry_reason: str | None = None  # why the previous attempt failed
        for attempt in range(1, self._cfg.max_attempts + 1):
            sent = info
            decision = self._router.pick(sent)
            if decision is None:  # nothing routable: the cold-start buffer (issue 5) waits here
                break
            if retry_reason is not None:  # counted only when another replica is really tried
                self._metrics.retries.labels(retry_reason).inc()
            rid = decision.replica
            rec.replica, rec.attempts = rid, attempt
            ok = False
            try:
                up = await self._open(rid, request, path, headers, body)
                try:
                    self._metrics.upstream_requests.labels(rid, str(up.status)).inc()
                    if up.status not in _RETRY_STATUSES or attempt == self._cfg.max_attempts:
                        response, ok = await self._respond(request, rec, rid, up)
                        return response
                    kept, last_error = await self._keep(up), None
                    retry_reason = f"upstream_{up.status}"
                    logger.info("replica %s answered %d; trying another", rid, up.status)
                finally:
                    up.close()
            except GatewayError as exc:
                # Retryable only while nothing reached the client (no first byte yet).
                if not exc.retryable or rec.ttfb_s is not None:
                    raise
                last_error, kept, retry_reason = exc, None, exc.code
                logger.info("replica %s failed before the first byte: %s", rid, exc.message)
            finally:
                self._router.release(rid, sent, ok=ok)
            info = replace(info, exclude=info.exclude | {rid})
        if kept is not None:
            return web.Response(status=kept.status, headers=kept.headers, body=kept.body)
        if last_error is not None:
            raise last_error
        raise NoReplicaAvailable(f"no replica can take a request for model {info.model!r} now")

    async def _open(
        self,
        rid: ReplicaId,
        request: web.Request,
        path: str,
        headers: CIMultiDict[str],
        body: bytes,
    ) -> UpstreamResponse:
        try:
            return await open_response(
                self._session(),
                join_url(self._pool.url(rid), path, request.query_string),
                headers=headers,
                body=body,
                first_byte_timeout_s=self._cfg.first_byte_timeout_s,
            )
        except GatewayError as exc:
            self._metrics.upstream_errors.labels(rid, error_reason(exc)).inc()
            raise

    async def _keep(self, up: UpstreamResponse) -> _Kept:
        try:
            body = await up.read_rest(_KEPT_ERROR_BYTES)
        except UpstreamDisconnected:
            body = b""
        return _Kept(up.status, response_headers(up.headers), body)

    async def _respond(
        self, request: web.Request, rec: AccessRecord, rid: ReplicaId, up: UpstreamResponse
    ) -> tuple[web.StreamResponse, bool]:
        if up.content_type == "text/event-stream":
            return await self._stream(request, rec, rid, up)
        return await self._buffered(request, rec, rid, up)

    async def _start(
        self, request: web.Request, rec: AccessRecord, up: UpstreamResponse
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=up.status, headers=response_headers(up.headers))
        resp.headers["x-request-id"] = rec.request_id
        await resp.prepare(request)
        self._first_byte(rec)
        return resp

    def _first_byte(self, rec: AccessRecord) -> None:
        rec.ttfb_s = self._clock() - rec.started
        self._metrics.time_to_first_byte.labels(self.model_label(rec.model)).observe(rec.ttfb_s)

    async def _stream(
        self, request: web.Request, rec: AccessRecord, rid: ReplicaId, up: UpstreamResponse
    ) -> tuple[web.StreamResponse, bool]:
        resp = await self._start(request, rec, up)
        pending = b""
        chunk = up.first
        ok = up.status < 500
        while chunk:
            pending += chunk
            cut = _event_boundary(pending)
            if cut or len(pending) > _MAX_SSE_HOLDBACK:
                cut = cut or len(pending)
                await resp.write(pending[:cut])  # waits while the client is slow: backpressure
                pending = pending[cut:]
            try:
                chunk = await up.next_chunk()
            except UpstreamDisconnected as exc:
                self._metrics.upstream_errors.labels(rid, "disconnect").inc()
                self._metrics.request_errors.labels(exc.code).inc()
                rec.error = exc.code
                logger.warning("stream from %s failed after its first byte: %s", rid, exc.message)
                await resp.write(sse_error_event(exc))
                ok = False
                break
        else:
            if pending:
                await resp.write(pending)
        await resp.write_eof()
        return resp, ok

    async def _buffered(
        self, request: web.Request, rec: AccessRecord, rid: ReplicaId, up: UpstreamResponse
    ) -> tuple[web.StreamResponse, bool]:
        parts = [up.first]
        size = len(up.first)
        try:
            while size <= self._cfg.max_buffered_response_bytes:
                chunk = await up.next_chunk()
                if not chunk:
                    resp = web.Response(
                        status=up.status, headers=response_headers(up.headers), body=b"".join(parts)
                    )
                    resp.headers["x-request-id"] = rec.request_id
                    self._first_byte(rec)
                    return resp, up.status < 500
                parts.append(chunk)
                size += len(chunk)
        except UpstreamDisconnected:
            self._metrics.upstream_errors.labels(rid, "disconnect").inc()
            raise
        return await self._pass_through(request, rec, rid, up, parts)

    async def _pass_through(
        self,
        request: web.Request,
        rec: AccessRecord,
        rid: ReplicaId,
        up: UpstreamResponse,
        parts: list[bytes],
    ) -> tuple[web.StreamResponse, bool]:
        # Too large to hold: stream it, with the replica's length so a client detects truncation.
        resp = web.StreamResponse(status=up.status, headers=response_headers(up.headers))
        length = up.headers.get("Content-Length")
        if length is not None and length.isdigit():
            resp.content_length = int(length)
        resp.headers["x-request-id"] = rec.request_id
        await resp.prepare(request)
        self._first_byte(rec)
        for part in parts:
            await resp.write(part)
        try:
            while chunk := await up.next_chunk():
                await resp.write(chunk)
        except UpstreamDisconnected as exc:
            self._metrics.upstream_errors.labels(rid, "disconnect").inc()
            self._metrics.request_errors.labels(exc.code).inc()
            rec.error = exc.code
            logger.warning("response from %s failed after its first byte: %s", rid, exc.message)
            if request.transport is not None:
                request.transport.close()  # the client sees a broken response, never a short 200
            return resp, False
        await resp.write_eof()
        return resp, up.status < 500


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def _event_boundary(buf: bytes) -> int:
    """Length of the prefix of ``buf`` made of whole SSE events (0 when none is complete)."""
    lf = buf.rfind(b"\n\n")
    crlf = buf.rfind(b"\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
