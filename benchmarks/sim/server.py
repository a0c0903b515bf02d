"""A simulated GPU replica behind HTTP: the engine model in real time, speaking vLLM's API.

One ``SimReplica`` owns one ``Engine``, one aiohttp app and its listening socket, one engine-loop
task, and the fault switches. The engine loop is the only caller of ``schedule``/``complete``:
it sleeps for each step's duration on the loop clock, then hands every ``TokenEvent`` to the
request's ``_Flow``, waking the handler that writes the SSE events (one per token, from bytes
pre-encoded per request, see ``openai_shapes.StreamShape``).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
``GET /v1/models``, ``GET /health`` (NIM also ``/v1/health/ready`` and ``/v1/health/live``),
``GET /metrics`` (``/v1/metrics`` instead for the ``nim`` flavour), and the simulator's own
``POST /sim/control`` (see ``faults``) and ``GET /sim/state``.

API key (``ReplicaSettings.api_key``, CLI ``--api-key``): as vLLM's ``--api-key``, every path
under ``/v1`` answers 401 ``{"error": "Unauthorized"}`` unless the request carries
``Authorization: Bearer <key>``; ``/health``, the metrics page (``/v1/metrics`` too, for ``nim``)
and ``/sim/*`` stay open. ``SimReplica.api_key`` may be changed at run time (key rotation).

Lifecycle and faults (``faults.Lifecycle``): while not ``ready``/``draining`` every route but
``/sim/*`` answers 503; a crash loses the engine, so a restarted replica is a new process with
fresh counters on ``/metrics`` (but the same URL).

Invariants: every request added to the engine is either finished by it or aborted in it
(client disconnect, dropped stream, crash) before its handler returns, so KV is never leaked;
``requests_admitted == requests_finished + requests_aborted + inflight_requests``.

Client disconnects cancel the handler (``handler_cancellation=True`` on our runner). An app from
``build_replica_app`` served by someone else's runner should set the same flag, or a
non-streaming request whose client left runs to completion in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from benchmarks.sim import openai_shapes as shapes
from benchmarks.sim.engine import Engine, SimRequest, TokenEvent
from benchmarks.sim.exposition import METRICS_PATH, Flavour, render_metrics
from benchmarks.sim.faults import (
    DOWN,
    Lifecycle,
    Phase,
    apply_control,
    is_disruptive,
    parse_control,
)
from benchmarks.sim.profiles import Profile, get_profile

logger = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MAX_CATCH_UP_S = 0.1
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


@dataclass(frozen=True)
class ReplicaSettings:
    """How one simulated replica starts. Fault fields give its state at (re)start."""

    profile: str = "a10g-llama3-8b"
    profile_overrides: Mapping[str, object] = field(default_factory=dict)
    flavour: Flavour = "vllm-v1"
    model: str | None = None  # served model name; None: the profile's served_model
    host: str = "127.0.0.1"
    port: int = 0
    listen_delay_s: float = 0.0  # not listening at all (connection refused)
    load_time_s: float | None = None  # /health 503 afterwards; None: the profile's load_time_s
    output_tokens_mean: float = 256.0  # output length when neither ignore_eos nor EOS applies
    embedding_dim: int = 64
    hung: bool = False
    slow_factor: float = 1.0
    drop_streams_after_tokens: int | None = None
    draining: bool = False
    api_key: str | None = None  # like vLLM --api-key: /v1 paths need "Bearer <key>"

    def with_overrides(self, **profile_overrides: object) -> ReplicaSettings:
        merged = {**self.profile_overrides, **profile_overrides}
        return replace(self, profile_overrides=merged)

    @classmethod
    def fast(cls, step_s: float = 0.002, **fields: Any) -> ReplicaSettings:
        """For tests and demos: every step takes ``step_s`` (no jitter), ready at once."""
        fields.setdefault("load_time_s", 0.0)
        settings = cls(**fields)
        return settings.with_overrides(**{**FAST_STEP_OVERRIDES, "weights_floor_s": step_s})


# Flat step time: the weights floor alone (never crossed at test sizes), no noise, no front end.
FAST_STEP_OVERRIDES: dict[str, object] = {
    "step_overhead_s": 0.0,
    "linear_base_s": 0.0,
    "per_token_s": 1e-9,
    "per_context_token_s": 0.0,
    "per_attention_pair_s": 0.0,
    "jitter_cv": 0.0,
    "frontend_latency_s": 0.0,
}


class _Flow:
    """Delivery state of one request in the engine, shared by the engine loop and its handler."""

    __slots__ = ("dead", "finished", "generated", "waiter")

    def __init__(self) -> None:
        self.generated = 0
        self.finished = False
        self.dead = False  # the replica crashed or stopped under it
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)


REPLICA: web.AppKey[SimReplica] = web.AppKey("replica")


class SimReplica:
    """One simulated replica: engine, HTTP app, lifecycle (port, phases) and fault switches.

    ``async with SimReplica(settings, seed=1) as replica: replica.url`` or ``await start()`` /
    ``await stop()``. Counters are cumulative over the handle's life (across restarts).
    """

    def __init__(
        self,
        settings: ReplicaSettings | None = None,
        *,
        seed: int = 0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.settings = s = settings or ReplicaSettings()
        self.profile: Profile = get_profile(s.profile, **dict(s.profile_overrides))
        self.model = s.model or self.profile.served_model
        self._rng = random.Random(seed)
        self._clock = clock
        self.engine = self._new_engine()
        self.life = Lifecycle(s.host, s.port, self._notify)
        self.drop_after_tokens: int | None = None
        self.api_key = s.api_key
        self.requests_unauthorized = 0  # answered 401 for a missing or wrong API key
        self.requests_seen = 0  # generation requests received, whatever their outcome
        self.requests_rejected = 0  # answered with an error status
        self.requests_admitted = 0  # added to the engine
        self.requests_finished = 0
        self.requests_aborted = 0  # removed from the engine unfinished
        self.streams_dropped = 0
        self.inflight_streams = 0  # streaming responses currently open
        self.embeddings_seen = 0
        self.metrics_scrapes = 0
        self.steps = 0  # engine steps run in real time
        self.step_lag_total_s = 0.0
        self.step_lag_max_s = 0.0
        self._flows: dict[str, _Flow] = {}
        self._last_add_s = 0.0
        self._work = asyncio.Event()
        self._watchers: list[asyncio.Future[None]] = []
        self._engine_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.app = self._build_app()
        self._apply_start_faults()

    def _new_engine(self) -> Engine:
        engine = Engine(self.profile, random.Random(self._rng.getrandbits(64)))
        engine.slow_factor = self.settings.slow_factor
        engine.stats.start_unix_s = time.time()
        return engine

    def _apply_start_faults(self) -> None:
        s = self.settings
        self.engine.slow_factor = s.slow_factor
        self.drop_after_tokens = s.drop_streams_after_tokens
        if s.hung:
            self.life.hang(None)
        elif self.life.hung:
            self.life.unhang()

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._gate])
        app[REPLICA] = self
        routes = app.router
        routes.add_post("/v1/chat/completions", self._chat)
        routes.add_post("/v1/completions", self._completions)
        routes.add_post("/v1/embeddings", self._embeddings)
        routes.add_get("/v1/models", self._models)
        routes.add_get("/health", self._health)
        if self.settings.flavour == "nim":
            routes.add_get("/v1/health/ready", self._health)
            routes.add_get("/v1/health/live", self._live)
        routes.add_get(METRICS_PATH[self.settings.flavour], self._metrics)
        routes.add_post("/sim/control", self._control)
        routes.add_get("/sim/state", self._state)
        app.on_startup.append(self._on_app_startup)
        app.on_cleanup.append(self._on_app_cleanup)
        return app

    # ----- public lifecycle ---------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.life.port}"

    @property
    def port(self) -> int:
        return self.life.port

    @property
    def phase(self) -> Phase:
        return self.life.phase

    @property
    def hung(self) -> bool:
        return self.life.hung

    @property
    def inflight_requests(self) -> int:
        return len(self._flows)

    async def __aenter__(self) -> SimReplica:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind the port, start the engine loop, begin the cold start (listening at once if
        ``listen_delay_s`` is 0, so ``url`` answers when this returns)."""
        await self.life.open(self.app)  # runs on_startup: the engine loop starts there
        await self._boot(self.settings.listen_delay_s, self._load_time_s(None))

    async def stop(self) -> None:
        """Stop listening, reset every connection, end every task. Idempotent."""
        self._kill_flows()
        await self.life.close()  # runs on_cleanup: the engine loop ends there
        self._kill_flows()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def wait_ready(self, timeout_s: float = 5.0) -> None:
        await self.wait_for(lambda r: r.phase == "ready", timeout_s)

    async def wait_for(
        self, predicate: Callable[[SimReplica], bool], timeout_s: float = 5.0
    ) -> None:
        """Wait until ``predicate(self)`` holds; re-checked on every state change and step."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self):
                fut = asyncio.get_running_loop().create_future()
                self._watchers.append(fut)
                await fut

    def snapshot(self) -> dict[str, object]:
        stats = self.engine.stats
        return {
            "url": self.url,
            "phase": self.phase,
            "hung": self.hung,
            "slow_factor": self.engine.slow_factor,
            "drop_after_tokens": self.drop_after_tokens,
            "requests_seen": self.requests_seen,
            "requests_rejected": self.requests_rejected,
            "requests_unauthorized": self.requests_unauthorized,
            "requests_admitted": self.requests_admitted,
            "requests_finished": self.requests_finished,
            "requests_aborted": self.requests_aborted,
            "streams_dropped": self.streams_dropped,
            "inflight_requests": self.inflight_requests,
            "inflight_streams": self.inflight_streams,
            "waiting": stats.num_waiting,
            "running": stats.num_running,
            "kv_usage": stats.kv_usage,
            "prompt_tokens": stats.prompt_tokens,
            "generation_tokens": stats.generation_tokens,
            "preemptions": stats.num_preemptions,
            "steps": self.steps,
            "step_lag_mean_s": self.step_lag_total_s / self.steps if self.steps else 0.0,
            "step_lag_max_s": self.step_lag_max_s,
        }

    # ----- faults (FaultControls) ---------------------------------------------------------

    async def crash(self, restart_after_s: float | None = None) -> None:
        """Die: stop listening, reset all connections, lose the engine; maybe come back later
        (``restart_after_s`` + the settings' cold start)."""
        await self.life.go_down("crashed")
        self._kill_flows()
        self.engine = self._new_engine()
        if restart_after_s is not None:
            self._apply_start_faults()
            delay = restart_after_s + self.settings.listen_delay_s
            await self._boot(delay, self._load_time_s(None))

    async def restart(
        self, *, listen_delay_s: float | None = None, load_time_s: float | None = None
    ) -> None:
        """A new process: crash if up, then cold start (defaults: the settings' times)."""
        if self.phase not in DOWN:
            await self.crash()
        self._apply_start_faults()
        delay = self.settings.listen_delay_s if listen_delay_s is None else listen_delay_s
        await self._boot(delay, self._load_time_s(load_time_s))

    def hang(self, duration_s: float | None = None) -> None:
        """Accept connections and answer nothing, not even /metrics; the engine stalls too."""
        self.life.hang(duration_s)

    def unhang(self) -> None:
        self.life.unhang()

    def drop_streams(self, after_tokens: int | None) -> None:
        """Cut every response once it has k tokens (no ``[DONE]``); ``None`` turns it off."""
        self.drop_after_tokens = after_tokens
        for flow in self._flows.values():
            flow.wake()

    def slow(self, factor: float) -> None:
        if not factor > 0:
            raise ValueError(f"slow factor must be > 0, got {factor}")
        self.engine.slow_factor = factor

    def drain(self) -> None:
        """Refuse new requests (503, /health 503) while running ones finish."""
        self.life.drain()

    def set_ready(self) -> None:
        """End loading (skip the rest of the load time) or draining now."""
        self.life.set_ready()

    # ----- internals ----------------------------------------------------------------------

    def _load_time_s(self, explicit: float | None) -> float:
        if explicit is not None:
            return explicit
        s = self.settings
        return float(self.profile.load_time_s) if s.load_time_s is None else s.load_time_s

    async def _boot(self, listen_delay_s: float, load_time_s: float) -> None:
        await self.life.boot(listen_delay_s, load_time_s, draining=self.settings.draining)

    def _kill_flows(self) -> None:
        for rid, flow in list(self._flows.items()):
            flow.dead = True
            flow.wake()
            self._abort(rid)

    def _notify(self) -> None:
        if self._watchers:
            watchers, self._watchers = self._watchers, []
            for fut in watchers:
                if not fut.done():
                    fut.set_result(None)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _boot_unowned(self, app: web.Application) -> None:
        await self._boot(0.0, self._load_time_s(None))

    async def _on_app_startup(self, app: web.Application) -> None:
        self._engine_task = asyncio.create_task(self._run_engine())
        self._engine_task.add_done_callback(self._engine_died)

    def _engine_died(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A bug, not a fault to simulate: say so loudly and fail every waiting client
            # rather than leave them hanging; stop() re-raises it.
            logger.error("engine loop of %s died", self.url, exc_info=task.exception())
            self._kill_flows()

    async def _on_app_cleanup(self, app: web.Application) -> None:
        if self._engine_task is not None:
            self._engine_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._engine_task
            self._engine_task = None

    # ----- the engine loop ----------------------------------------------------------------

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def _run_engine(self) -> None:
        """Drive schedule/complete in real time: each step lasts its ``duration_s``."""
        loop = asyncio.get_running_loop()
        clock = self._clock or loop.time
        flows = self._flows
        t = clock()
        life = self.life
        while True:
            if life.hung:
                await life.wait_unhung()
                t = clock()
            engine = self.engine  # replaced on crash
            # Steps follow each other on the model's timeline (t = the last step's end) even when
            # the loop woke a little late, so short lags are caught up instead of accumulating;
            # a long stall (a busy machine, a debugger) resyncs to the clock.
            # Never before the newest arrival, so queue times and TTFTs stay >= 0.
            now = max(t, self._last_add_s) if clock() - t < _MAX_CATCH_UP_S else clock()
            step = engine.schedule(now) if engine.has_work() else None
            if step is None:
                self._work.clear()
                await self._work.wait()
                t = clock()
                continue
            end = now + step.duration_s
            delay = end - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = clock() - end  # how far behind real time the loop wakes (CPU starvation)
            self.steps += 1
            self.step_lag_total_s += lag
            if lag > self.step_lag_max_s:
                self.step_lag_max_s = lag
            if engine is not self.engine:
                continue  # crashed during the step: its results died with it
            events: list[TokenEvent] = engine.complete(step, end)
            t = end
            for ev in events:
                flow = flows.get(ev.request_id)
                if flow is not None:
                    flow.generated = ev.generated
                    flow.finished = ev.finished
                    flow.wake()
            self._notify()

    def _abort(self, rid: str) -> None:
        flow = self._flows.pop(rid, None)
        if flow is None:
            return
        if flow.finished:  # the engine is done with it; only the response was lost
            self.requests_finished += 1
        else:
            self.engine.abort_request(rid, self._now())
            self.requests_aborted += 1
            self._work.set()  # freed KV may unblock waiting requests
        self._notify()

    # ----- HTTP ---------------------------------------------------------------------------

    @web.middleware
    async def _gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Hang, lifecycle and the API key apply to every route but the simulator's ``/sim/*``."""
        if request.path.startswith("/sim/"):
            return await handler(request)
        if self.life.hung:
            await self.life.wait_unhung()
        phase = self.life.phase
        if phase in DOWN and request.transport is not None:
            request.transport.abort()  # only reachable under someone else's runner: act dead
        if phase not in ("ready", "draining"):
            return _error(503, "the model is loading", "ServiceUnavailableError")
        if not self._authorized(request):
            self.requests_unauthorized += 1
            self._notify()
            # vLLM's exact answer: a bare string, not the OpenAI error object.
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    def _authorized(self, request: web.Request) -> bool:
        """vLLM's rule: with a key set, only paths under ``/v1`` are guarded (OPTIONS never)."""
        key = self.api_key
        if key is None or request.method == "OPTIONS" or not request.path.startswith("/v1"):
            return True
        if request.path == METRICS_PATH[self.settings.flavour]:
            return True  # a scraper must not need the key (vLLM's /metrics is outside /v1)
        presented = request.headers.get("Authorization", "")
        expected = f"Bearer {key}".encode()
        return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), expected)

    async def _read_json(self, request: web.Request) -> object:
        try:
            return orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise shapes.RequestError(400, f"invalid JSON body: {exc}") from None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _generate(self, request: web.Request, kind: shapes.Kind) -> web.StreamResponse:
        arrival = self._now()  # the engine measures TTFT from here, front end included
        self.requests_seen += 1
        self._notify()
        try:
            if self.phase == "draining":
                raise shapes.RequestError(503, "the replica is draining", "ServiceUnavailableError")
            req = shapes.parse_generation(
                await self._read_json(request),
                kind,
                served_model=self.model,
                max_model_len=self.profile.max_model_len,
                block_size=self.profile.block_size,
            )
        except shapes.RequestError as exc:
            self.requests_rejected += 1
            return _error(exc.status, exc.message, exc.err_type)
        if self.profile.frontend_latency_s > 0:
            await asyncio.sleep(self.profile.frontend_latency_s)
            if self.life.phase not in ("ready", "draining"):  # went down meanwhile
                return _error(503, "the replica is not ready", "ServiceUnavailableError")
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        rid = f"{prefix}-{self._rng.getrandbits(128):032x}"
        output_tokens, finish_reason = self._draw_output(req)
        flow = _Flow()
        self._last_add_s = now = self._now()
        self.engine.add_request(
            SimRequest(
                rid, req.prompt_tokens, output_tokens, arrival, req.block_hashes, finish_reason
            ),
            now,
        )
        self._flows[rid] = flow
        self.requests_admitted += 1
        self._work.set()
        try:
            if req.stream:
                return await self._stream(request, req, rid, flow, finish_reason)
            return await self._respond(request, req, rid, flow, finish_reason)
        finally:
            if rid in self._flows:
                if flow.finished:
                    del self._flows[rid]
                    self.requests_finished += 1
                    self._notify()
                else:
                    self._abort(rid)

    def _draw_output(self, req: shapes.GenerationRequest) -> tuple[int, str]:
        if req.ignore_eos:
            return req.max_tokens, "length"
        rng = random.Random(req.seed) if req.seed is not None else self._rng
        n = max(1 + int(rng.expovariate(1.0 / self.settings.output_tokens_mean)), req.min_tokens)
        if n >= req.max_tokens:
            return req.max_tokens, "length"
        return n, "stop"

    async def _wait(self, flow: _Flow, sent: int) -> int | None:
        """Wait for tokens beyond ``sent`` or the end; returns the count to cut at, if cutting.

        The drop fault cuts a response once it has ``after_tokens`` tokens, unless the whole
        response fits in them.
        """
        while True:
            drop = self.drop_after_tokens
            n = flow.generated
            if drop is not None and n >= drop and not (flow.finished and n <= drop):
                return max(sent, drop)
            if n > sent or flow.finished or flow.dead:
                return None
            fut = asyncio.get_running_loop().create_future()
            flow.waiter = fut
            await fut

    def _cut(self, request: web.Request) -> None:
        self.streams_dropped += 1
        self._notify()
        if request.transport is not None:
            request.transport.close()  # flushes what was written, then FIN: no [DONE]

    async def _respond(
        self,
        request: web.Request,
        req: shapes.GenerationRequest,
        rid: str,
        flow: _Flow,
        finish_reason: str,
    ) -> web.StreamResponse:
        while not flow.finished:
            cut_at = await self._wait(flow, flow.generated)
            if flow.dead:
                return web.Response(status=503)  # never sent: the connection was reset
            if cut_at is not None:
                self._cut(request)
                return web.Response(status=503)  # never sent: the connection is closed
        body = shapes.completion_body(req, rid, int(time.time()), flow.generated, finish_reason)
        return web.Response(body=body, content_type="application/json")

    async def _stream(
        self,
        request: web.Request,
        req: shapes.GenerationRequest,
        rid: str,
        flow: _Flow,
        finish_reason: str,
    ) -> web.StreamResponse:
        shape = shapes.StreamShape(req.kind, rid, int(time.time()), req.model)
        tokens, mask = shape.tokens, shapes.WORD_MASK
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        await resp.prepare(request)
        self.inflight_streams += 1
        sent = 0
        try:
            while True:
                cut_at = await self._wait(flow, sent)
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
                    except ConnectionResetError:  # the client left; finally-block aborts it
                        return resp
                sent = n
                if cut_at is not None:
                    self._cut(request)
                    return resp  # aiohttp's write_eof on the closed transport is a no-op
                if done:
                    await resp.write_eof()
                    return resp
        finally:
            self.inflight_streams -= 1

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        self.embeddings_seen += 1
        try:
            if self.phase == "draining":
                raise shapes.RequestError(503, "the replica is draining", "ServiceUnavailableError")
            model, seeds, tokens = shapes.parse_embeddings(
                await self._read_json(request), served_model=self.model
            )
        except shapes.RequestError as exc:
            return _error(exc.status, exc.message, exc.err_type)
        rid = f"embd-{self._rng.getrandbits(128):032x}"
        body = shapes.embeddings_body(
            model, rid, int(time.time()), seeds, tokens, self.settings.embedding_dim
        )
        return web.Response(body=body, content_type="application/json")

    async def _models(self, request: web.Request) -> web.StreamResponse:
        owned_by = {"sglang": "sglang", "nim": "system"}.get(self.settings.flavour, "vllm")
        body = shapes.models_body(
            self.model, self.profile.max_model_len, int(time.time()), owned_by
        )
        return web.Response(body=body, content_type="application/json")

    async def _health(self, request: web.Request) -> web.StreamResponse:
        if self.phase != "ready":
            return web.Response(status=503)
        return web.Response(status=200)

    async def _live(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "health-response", "message": "Service is live."})

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        self.metrics_scrapes += 1
        text = render_metrics(self.engine.stats, self.settings.flavour, self.model)
        return web.Response(body=text.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def _state(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=orjson.dumps(self.snapshot()), content_type="application/json")

    async def _control(self, request: web.Request) -> web.StreamResponse:
        try:
            action, params = parse_control(await self._read_json(request))
        except shapes.RequestError as exc:
            return _error(exc.status, exc.message, exc.err_type)
        if not is_disruptive(action):
            await apply_control(self, action, params)
            return web.Response(body=orjson.dumps(self.snapshot()), content_type="application/json")
        # Crashing resets this very connection: answer first, then crash from a task of ours
        # (this handler may be cancelled by the reset).
        resp = web.Response(
            body=orjson.dumps({"action": action, "accepted": True}),
            content_type="application/json",
            headers={"Connection": "close"},
        )
        await resp.prepare(request)
        await resp.write_eof()
        self._spawn(apply_control(self, action, params))
        return resp


def _error(status: int, message: str, err_type: str) -> web.Response:
    return web.Response(
        status=status,
        body=shapes.error_body(status, message, err_type),
        content_type="application/json",
    )


def build_replica_app(
    settings: ReplicaSettings | None = None, *, rng_seed: int = 0
) -> web.Application:
    """The app of a new ``SimReplica`` (its handle is ``app[REPLICA]``), for a runner of yours.

    Under someone else's runner the replica cannot close its listener: ``crash`` then resets
    each connection as it arrives instead. Prefer ``SimReplica``/``run_replicas``.
    """
    replica = SimReplica(settings, seed=rng_seed)
    replica.app.on_startup.append(replica._boot_unowned)
    return replica.app


@contextlib.asynccontextmanager
async def run_replicas(
    n: int,
    settings: ReplicaSettings | None = None,
    *,
    seed: int = 0,
    base_port: int | None = None,
) -> AsyncIterator[list[SimReplica]]:
    """Start ``n`` replicas on 127.0.0.1 (consecutive ports from ``base_port``, else free ports).

    Replica ``i`` is seeded ``seed + i``. All are stopped on exit, whatever happened.
    """
    base = settings or ReplicaSettings()
    replicas = [
        SimReplica(base if base_port is None else replace(base, port=base_port + i), seed=seed + i)
        for i in range(n)
    ]
    try:
        for replica in replicas:
            await replica.start()
        yield replicas
    finally:
        results = await asyncio.gather(*(r.stop() for r in replicas), return_exceptions=True)
        for replica, result in zip(replicas, results, strict=True):
            if isinstance(result, Exception):
                logger.error("stopping %s failed", replica.url, exc_info=result)
