"""A simulated GPU replica behind HTTP: the engine model in real time, speaking vLLM's API.

One ``SimReplica`` owns one ``Engine`` driven in real time by one ``engine_loop.EngineLoop``
task, one aiohttp app (routes, API-key guard and SSE shaping in ``handlers``) and its listening
socket, and the fault switches. The loop hands every ``TokenEvent`` to the request's ``Flow``,
waking the handler that writes the SSE events (one per token, from bytes pre-encoded per
request, see ``openai_shapes.StreamShape``).

This module is the public API (``SimReplica``, ``ReplicaSettings``, ``build_replica_app``,
``run_replicas``, ``REPLICA``): the replica's settings, lifecycle and faults.

Lifecycle and faults (``faults.Lifecycle``): while not ``ready``/``draining`` every route but
``/sim/*`` answers 503; a crash loses the engine, so a restarted replica is a new process with
fresh counters on ``/metrics`` (but the same URL).

Invariants (kept by ``EngineLoop``): every request added to the engine is either finished by it
or aborted in it (client disconnect, dropped stream, crash) before its handler returns, so KV is
never leaked; ``requests_admitted == requests_finished + requests_aborted + inflight_requests``.

Client disconnects cancel the handler (``handler_cancellation=True`` on our runner). An app from
``build_replica_app`` served by someone else's runner should set the same flag, or a
non-streaming request whose client left runs to completion in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

from benchmarks.sim import handlers
from benchmarks.sim.engine import Engine
from benchmarks.sim.engine_loop import EngineLoop, Flow
from benchmarks.sim.exposition import Flavour
from benchmarks.sim.faults import DOWN, Lifecycle, Phase
from benchmarks.sim.handlers import METRICS_CONTENT_TYPE, REPLICA
from benchmarks.sim.openai_shapes import GenerationRequest
from benchmarks.sim.profiles import Profile, get_profile

__all__ = [
    "FAST_STEP_OVERRIDES",
    "METRICS_CONTENT_TYPE",
    "REPLICA",
    "Flow",
    "ReplicaSettings",
    "SimReplica",
    "build_replica_app",
    "run_replicas",
]

logger = logging.getLogger(__name__)


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
        engine = self._new_engine()
        self.life = Lifecycle(s.host, s.port, self.notify)
        self.engine_loop = EngineLoop(engine, self.life, self.notify, clock)
        self.drop_after_tokens: int | None = None
        self.api_key = s.api_key
        self.requests_unauthorized = 0  # answered 401 for a missing or wrong API key
        self.requests_seen = 0  # generation requests received, whatever their outcome
        self.requests_rejected = 0  # answered with an error status
        self.streams_dropped = 0
        self.inflight_streams = 0  # streaming responses currently open
        self.embeddings_seen = 0
        self.metrics_scrapes = 0
        self._watchers: list[asyncio.Future[None]] = []
        self._engine_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.app = handlers.build_app(self)
        self.app.on_startup.append(self._on_app_startup)
        self.app.on_cleanup.append(self._on_app_cleanup)
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
    def engine(self) -> Engine:
        return self.engine_loop.engine

    @property
    def inflight_requests(self) -> int:
        return self.engine_loop.inflight

    @property
    def requests_admitted(self) -> int:
        return self.engine_loop.admitted

    @property
    def requests_finished(self) -> int:
        return self.engine_loop.finished

    @property
    def requests_aborted(self) -> int:
        return self.engine_loop.aborted

    @property
    def steps(self) -> int:
        return self.engine_loop.steps

    @property
    def step_lag_total_s(self) -> float:
        return self.engine_loop.step_lag_total_s

    @property
    def step_lag_max_s(self) -> float:
        return self.engine_loop.step_lag_max_s

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
        self.engine_loop.kill_all()
        await self.life.close()  # runs on_cleanup: the engine loop ends there
        self.engine_loop.kill_all()
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
        self.engine_loop.kill_all()
        self.engine_loop.engine = self._new_engine()
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
        self.engine_loop.wake_all()

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

    # ----- for the HTTP layer (``handlers``) ---------------------------------------------

    def notify(self) -> None:
        """Wake every ``wait_for``: call after any change a predicate may look at."""
        if self._watchers:
            watchers, self._watchers = self._watchers, []
            for fut in watchers:
                if not fut.done():
                    fut.set_result(None)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task of the replica's (cancelled and awaited by ``stop``)."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{self._rng.getrandbits(128):032x}"

    def draw_output(self, req: GenerationRequest) -> tuple[int, str]:
        """How many tokens the model answers ``req`` with, and the finish reason."""
        if req.ignore_eos:
            return req.max_tokens, "length"
        rng = random.Random(req.seed) if req.seed is not None else self._rng
        n = max(1 + int(rng.expovariate(1.0 / self.settings.output_tokens_mean)), req.min_tokens)
        if n >= req.max_tokens:
            return req.max_tokens, "length"
        return n, "stop"

    # ----- internals ----------------------------------------------------------------------

    def _load_time_s(self, explicit: float | None) -> float:
        if explicit is not None:
            return explicit
        s = self.settings
        return float(self.profile.load_time_s) if s.load_time_s is None else s.load_time_s

    async def _boot(self, listen_delay_s: float, load_time_s: float) -> None:
        await self.life.boot(listen_delay_s, load_time_s, draining=self.settings.draining)

    async def _boot_unowned(self, app: web.Application) -> None:
        await self._boot(0.0, self._load_time_s(None))

    async def _on_app_startup(self, app: web.Application) -> None:
        self._engine_task = asyncio.create_task(self.engine_loop.run())
        self._engine_task.add_done_callback(self._engine_died)

    def _engine_died(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A bug, not a fault to simulate: say so loudly and fail every waiting client
            # rather than leave them hanging; stop() re-raises it.
            logger.error("engine loop of %s died", self.url, exc_info=task.exception())
            self.engine_loop.kill_all()

    async def _on_app_cleanup(self, app: web.Application) -> None:
        if self._engine_task is not None:
            self._engine_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._engine_task
            self._engine_task = None


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
