"""The HTTP face of a ``SimReplica``: vLLM's routes, the gate in front of them, SSE shaping.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
``GET /v1/models``, ``GET /health`` (NIM also ``/v1/health/ready`` and ``/v1/health/live``),
``GET /metrics`` (``/v1/metrics`` instead for the ``nim`` flavour), and the simulator's own
``POST /sim/control`` (see ``faults``) and ``GET /sim/state``.

API key (``ReplicaSettings.api_key``, CLI ``--api-key``): as vLLM's ``--api-key``, every path
under ``/v1`` answers 401 ``{"error": "Unauthorized"}`` unless the request carries
``Authorization: Bearer <key>``; ``/health``, the metrics page (``/v1/metrics`` too, for ``nim``)
and ``/sim/*`` stay open. ``SimReplica.api_key`` may be changed at run time (key rotation).

Handlers are stateless functions: the replica is ``request.app[REPLICA]``. A generation request
is admitted into the replica's engine and always settled (finished or aborted) in a ``finally``
before its handler returns, whatever ends it: that keeps the replica's KV invariant.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from benchmarks.sim import openai_shapes as shapes
from benchmarks.sim.engine import SimRequest
from benchmarks.sim.engine_loop import Flow
from benchmarks.sim.exposition import METRICS_PATH, render_metrics
from benchmarks.sim.faults import DOWN, apply_control, is_disruptive, parse_control

if TYPE_CHECKING:
    from benchmarks.sim.server import SimReplica

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}

REPLICA: web.AppKey[SimReplica] = web.AppKey("replica")


def build_app(replica: SimReplica) -> web.Application:
    """A new app serving ``replica`` (lifecycle hooks are the replica's to add)."""
    app = web.Application(middlewares=[_gate])
    app[REPLICA] = replica
    flavour = replica.settings.flavour
    routes = app.router
    routes.add_post("/v1/chat/completions", _chat)
    routes.add_post("/v1/completions", _completions)
    routes.add_post("/v1/embeddings", _embeddings)
    routes.add_get("/v1/models", _models)
    routes.add_get("/health", _health)
    if flavour == "nim":
        routes.add_get("/v1/health/ready", _health)
        routes.add_get("/v1/health/live", _live)
    routes.add_get(METRICS_PATH[flavour], _metrics)
    routes.add_post("/sim/control", _control)
    routes.add_get("/sim/state", _state)
    return app


@web.middleware
async def _gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Hang, lifecycle and the API key apply to every route but the simulator's ``/sim/*``."""
    if request.path.startswith("/sim/"):
        return await handler(request)
    replica = request.app[REPLICA]
    life = replica.life
    if life.hung:
        await life.wait_unhung()
    phase = life.phase
    if phase in DOWN and request.transport is not None:
        request.transport.abort()  # only reachable under someone else's runner: act dead
    if phase not in ("ready", "draining"):
        return _error(503, "the model is loading", "ServiceUnavailableError")
    if not _authorized(replica, request):
        replica.requests_unauthorized += 1
        replica.notify()
        # vLLM's exact answer: a bare string, not the OpenAI error object.
        return web.json_response({"error": "Unauthorized"}, status=401)
    return await handler(request)


def _authorized(replica: SimReplica, request: web.Request) -> bool:
    """vLLM's rule: with a key set, only paths under ``/v1`` are guarded (OPTIONS never)."""
    key = replica.api_key
    if key is None or request.method == "OPTIONS" or not request.path.startswith("/v1"):
        return True
    if request.path == METRICS_PATH[replica.settings.flavour]:
        return True  # a scraper must not need the key (vLLM's /metrics is outside /v1)
    presented = request.headers.get("Authorization", "")
    expected = f"Bearer {key}".encode()
    return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), expected)


async def _read_json(request: web.Request) -> object:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise shapes.RequestError(400, f"invalid JSON body: {exc}") from None


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def _generate(request: web.Request, kind: shapes.Kind) -> web.StreamResponse:
    replica = request.app[REPLICA]
    arrival = replica.engine_loop.now()  # the engine measures TTFT from here, front end included
    replica.requests_seen += 1
    replica.notify()
    profile = replica.profile
    try:
        if replica.phase == "draining":
            raise shapes.RequestError(503, "the replica is draining", "ServiceUnavailableError")
        req = shapes.parse_generation(
            await _read_json(request),
            kind,
            served_model=replica.model,
            max_model_len=profile.max_model_len,
            block_size=profile.block_size,
        )
    except shapes.RequestError as exc:
        replica.requests_rejected += 1
        return _error(exc.status, exc.message, exc.err_type)
    if profile.frontend_latency_s > 0:
        await asyncio.sleep(profile.frontend_latency_s)
        if replica.life.phase not in ("ready", "draining"):  # went down meanwhile
            return _error(503, "the replica is not ready", "ServiceUnavailableError")
    rid = replica.new_request_id("chatcmpl" if kind == "chat" else "cmpl")
    output_tokens, finish_reason = replica.draw_output(req)
    flow = replica.engine_loop.admit(
        SimRequest(rid, req.prompt_tokens, output_tokens, arrival, req.block_hashes, finish_reason)
    )
    try:
        if req.stream:
            return await _stream(replica, request, req, rid, flow, finish_reason)
        return await _respond(replica, request, req, rid, flow, finish_reason)
    finally:
        replica.engine_loop.settle(rid, flow)


async def _wait(replica: SimReplica, flow: Flow, sent: int) -> int | None:
    """Wait for tokens beyond ``sent`` or the end; returns the count to cut at, if cutting.

    The drop fault cuts a response once it has ``after_tokens`` tokens, unless the whole
    response fits in them.
    """
    while True:
        drop = replica.drop_after_tokens
        n = flow.generated
        if drop is not None and n >= drop and not (flow.finished and n <= drop):
            return max(sent, drop)
        if n > sent or flow.finished or flow.dead:
            return None
        fut = asyncio.get_running_loop().create_future()
        flow.waiter = fut
        await fut


def _cut(replica: SimReplica, request: web.Request) -> None:
    replica.streams_dropped += 1
    replica.notify()
    if request.transport is not None:
        request.transport.close()  # flushes what was written, then FIN: no [DONE]


async def _respond(
    replica: SimReplica,
    request: web.Request,
    req: shapes.GenerationRequest,
    rid: str,
    flow: Flow,
    finish_reason: str,
) -> web.StreamResponse:
    while not flow.finished:
        cut_at = await _wait(replica, flow, flow.generated)
        if flow.dead:
            return web.Response(status=503)  # never sent: the connection was reset
        if cut_at is not None:
            _cut(replica, request)
            return web.Response(status=503)  # never sent: the connection is closed
    body = shapes.completion_body(req, rid, int(time.time()), flow.generated, finish_reason)
    return web.Response(body=body, content_type="application/json")


async def _stream(
    replica: SimReplica,
    request: web.Request,
    req: shapes.GenerationRequest,
    rid: str,
    flow: Flow,
    finish_reason: str,
) -> web.StreamResponse:
    shape = shapes.StreamShape(req.kind, rid, int(time.time()), req.model)
    tokens, mask = shape.tokens, shapes.WORD_MASK
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    await resp.prepare(request)
    replica.inflight_streams += 1
    sent = 0
    try:
        while True:
            cut_at = await _wait(replica, flow, sent)
            if flow.dead:
                return resp
            n = flow.generated if cut_at is None else cut_at
            done = flow.finished and cut_at is None
            parts = [shape.role_chunk] if sent == 0 and n > 0 else []
            parts.extend(tokens[i & mask] for i in range(sent, n - 1 if done else n))
            if done:
                parts.append(shape.final_chunk(n - 1, finish_reason))
                if req.include_usage:
                    parts.append(shape.usage_chunk(req.prompt_tokens, n))
                parts.append(shapes.DONE)
            if parts:
                try:
                    await resp.write(b"".join(parts))
                except ConnectionResetError:  # the client left; the finally-block aborts it
                    return resp
            sent = n
            if cut_at is not None:
                _cut(replica, request)
                return resp  # aiohttp's write_eof on the closed transport is a no-op
            if done:
                await resp.write_eof()
                return resp
    finally:
        replica.inflight_streams -= 1


async def _embeddings(request: web.Request) -> web.StreamResponse:
    replica = request.app[REPLICA]
    replica.embeddings_seen += 1
    try:
        if replica.phase == "draining":
            raise shapes.RequestError(503, "the replica is draining", "ServiceUnavailableError")
        model, seeds, tokens = shapes.parse_embeddings(
            await _read_json(request), served_model=replica.model
        )
    except shapes.RequestError as exc:
        return _error(exc.status, exc.message, exc.err_type)
    rid = replica.new_request_id("embd")
    body = shapes.embeddings_body(
        model, rid, int(time.time()), seeds, tokens, replica.settings.embedding_dim
    )
    return web.Response(body=body, content_type="application/json")


async def _models(request: web.Request) -> web.StreamResponse:
    replica = request.app[REPLICA]
    owned_by = {"sglang": "sglang", "nim": "system"}.get(replica.settings.flavour, "vllm")
    body = shapes.models_body(
        replica.model, replica.profile.max_model_len, int(time.time()), owned_by
    )
    return web.Response(body=body, content_type="application/json")


async def _health(request: web.Request) -> web.StreamResponse:
    if request.app[REPLICA].phase != "ready":
        return web.Response(status=503)
    return web.Response(status=200)


async def _live(request: web.Request) -> web.StreamResponse:
    return web.json_response({"object": "health-response", "message": "Service is live."})


async def _metrics(request: web.Request) -> web.StreamResponse:
    replica = request.app[REPLICA]
    replica.metrics_scrapes += 1
    text = render_metrics(replica.engine.stats, replica.settings.flavour, replica.model)
    return web.Response(body=text.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def _state(request: web.Request) -> web.StreamResponse:
    snapshot = request.app[REPLICA].snapshot()
    return web.Response(body=orjson.dumps(snapshot), content_type="application/json")


async def _control(request: web.Request) -> web.StreamResponse:
    replica = request.app[REPLICA]
    try:
        action, params = parse_control(await _read_json(request))
    except shapes.RequestError as exc:
        return _error(exc.status, exc.message, exc.err_type)
    if not is_disruptive(action):
        await apply_control(replica, action, params)
        return web.Response(body=orjson.dumps(replica.snapshot()), content_type="application/json")
    # Crashing resets this very connection: answer first, then crash from a task of the
    # replica's (this handler may be cancelled by the reset).
    resp = web.Response(
        body=orjson.dumps({"action": action, "accepted": True}),
        content_type="application/json",
        headers={"Connection": "close"},
    )
    await resp.prepare(request)
    await resp.write_eof()
    replica.spawn(apply_control(replica, action, params))
    return resp


def _error(status: int, message: str, err_type: str) -> web.Response:
    return web.Response(
        status=status,
        body=shapes.error_body(status, message, err_type),
        content_type="application/json",
    )
