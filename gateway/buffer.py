"""RequestBuffer: requests that no replica can take yet wait here, then go out in order.

A request waits when ``router.pick`` finds nothing routable for its model: no replica is ready
(scale from zero, every replica still loading, all ejected) or every ready one is saturated
(``saturation.*`` bounds). It is released the moment a replica can take it — the pool's
``capacity`` signal fires on every release, replica ready, model list and (under saturation
bounds) scrape or failed scrape, and schedules one dispatch pass. The pass walks each model's
queue in order and hands each waiter to whichever replica the policy picks *now* (late
binding: the backlog goes to the replicas that free up first, respecting the bounds, as they
free up), stopping at the first waiter that cannot be placed. Nothing polls, with one
exception: while a replica ramps up under slow start with an in-flight bound (its cap grows
with time, not with events), a timer re-runs the pass every ``slow_start_s / 20``.

Order: one queue per model, by (priority descending, arrival). Priority comes from the
``buffer.priority_header`` request header, a class name from ``buffer.priority_classes``
(``RequestInfo.priority``; an unknown class is a 400). Classes below 0 are sheddable: when the
queue is full, a new request of a higher class evicts the newest request of the lowest
sheddable class, which gets 429 ``request_shed``; otherwise the new request is refused.

Which requests may wait at all (first attempts), decided when the request arrives and again
whenever membership, a phase or a model list changes:

* some replica lists the model (whatever its phase: a draining one is being replaced, an
  ejected one comes back), or some replica has not listed its models yet (still loading);
* the model is configured in ``models.names`` (a model scaled to zero has no replica at all
  until the queued count makes KEDA start one);
* there is no replica at all: nothing is known, so any model may be on its way (scale from
  zero); such a request waits up to ``max_wait_s`` and gets 503 if nothing comes.

Otherwise the model does not exist: 404 ``model_not_found`` at once, and any waiter for it is
answered 404 as soon as the last unlisted replica lists other models. A retry (after a failed
attempt) waits only while a replica it has not tried yet serves the model or is unlisted;
otherwise the proxy answers with the failed attempt's error.

Bounds, and what a refused client gets (OpenAI error shape, ``Retry-After: 1`` — a retry
waits in the buffer again, so a short hint costs nothing):

=========================  =======================  =================  ================
when                       a ready replica serves   none is ready yet  code
=========================  =======================  =================  ================
queue full                 429 (saturated)          503                queue_full
waited ``max_wait_s``      429                      503                queue_timeout
evicted (sheddable)        429                      429                request_shed
buffer off (a bound is 0)  429 queue_full           503 no_replica
=========================  =======================  =================  ================

A client that disconnects while queued leaves the queue at once: its connection cancels its
handler (``http_server.py``) inside ``acquire``, which removes the waiter, and if a replica had
already been picked for it in the same instant, releases that replica.

Keep-alives (``buffer.keepalive_interval_s`` > 0): a *streaming* request that is still waiting
when the interval has passed is committed to a streamed answer — 200 with SSE headers goes out,
then an SSE comment ``: keep-alive`` every interval — so proxies and load balancers in front do
not time it out during a long cold start. A request dispatched before the first keep-alive is
unaffected. Once committed, the status line can no longer say what happens next: a later
refusal or upstream failure is reported as one final ``data: {"error": ...}`` event (the shape
that ends a stream that failed mid-way, which the openai SDK raises as ``APIError``), and a
replica's non-SSE answer (an error) is relayed the same way.

Invariants: every waiter leaves its queue exactly once (dispatched, refused, timed out or
abandoned); a replica picked for a waiter is either handed to it or released; ``acquire`` never
overtakes a queued request of the same model and priority.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from gateway.config import BufferConfig, SaturationConfig
from gateway.errors import GatewayError, InvalidRequest, ModelNotFound, NoReplicaAvailable
from gateway.http_server import Request, ResponseStream
from gateway.pool import ReplicaPool
from gateway.router import Router
from policies.types import Decision, RequestInfo, Saturation

logger = logging.getLogger(__name__)

KEEPALIVE_COMMENT = b": keep-alive\n\n"
_SSE_HEADERS = (("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"))


class _RateLimited(GatewayError):
    status, retry_after_s = 429, 1

    @property
    def type(self) -> str:
        return "rate_limit_error"


class QueueFull(GatewayError):
    """The model's queue is full while its replicas are still starting."""

    status, code, retry_after_s = 503, "queue_full", 1


class QueueFullSaturated(_RateLimited, QueueFull):
    """The model's queue is full and every ready replica is saturated."""


class QueueTimeout(GatewayError):
    """No replica became ready within ``max_wait_s``."""

    status, code, retry_after_s = 503, "queue_timeout", 1


class QueueTimeoutSaturated(_RateLimited, QueueTimeout):
    """Every ready replica stayed saturated for ``max_wait_s``."""


class RequestShed(_RateLimited):
    """A sheddable request evicted from a full queue by a more important one."""

    code = "request_shed"


@dataclass(eq=False, slots=True)
class _Waiter:
    info: RequestInfo
    since: float
    key: tuple[int, int]  # (-priority, seq): the queue order
    future: asyncio.Future[Decision | None]


class SseKeepAlive:
    """The early-committed SSE answer of one waiting streaming request."""

    def __init__(
        self, request: Request, request_id: str, *, interval_s: float, since: float
    ) -> None:
        self._request = request
        self._request_id = request_id
        self._interval_s = interval_s
        self._next = since + interval_s
        self.response: ResponseStream | None = None  # set once committed

    def due_in(self, now: float) -> float:
        return self._next - now

    async def send(self, now: float) -> None:
        """One keep-alive comment, committing the 200 SSE response first if needed."""
        if self.response is None:
            headers = [*_SSE_HEADERS, ("x-request-id", self._request_id)]
            self.response = self._request.stream(200, headers)
        self.response.write(KEEPALIVE_COMMENT)
        self._next = now + self._interval_s
        await self.response.drain()

    def fail(self, error_body: bytes) -> None:
        """End the committed stream with one error event (an OpenAI error object)."""
        assert self.response is not None, "only a committed answer fails in-stream"
        self.response.write(b"data: " + error_body + b"\n\n")
        self.response.end()


def upstream_error_body(status: int, body: bytes) -> bytes:
    """A replica's error answer as an OpenAI error object (its own, when it sent one)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        return orjson.dumps(doc)  # re-encoded: a pretty-printed body would break the data: line
    error = {"message": f"replica answered {status}", "type": "server_error", "param": None}
    return orjson.dumps({"error": {**error, "code": "upstream_status"}})


class RequestBuffer:
    def __init__(
        self,
        pool: ReplicaPool,
        router: Router,
        cfg: BufferConfig,
        *,
        configured_models: tuple[str, ...] | list[str] = (),
        clock: Callable[[], float],
    ) -> None:
        self._pool = pool
        self._router = router
        self._cfg = cfg
        self._models = frozenset(configured_models)
        self._clock = clock
        self._queues: dict[str, list[_Waiter]] = {}
        self._judged: dict[str, int] = {}  # model -> pool epoch at its last "can it come?"
        self._count = 0
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._enabled = cfg.max_queued_per_model > 0 and cfg.max_wait_s > 0
        pool.capacity.subscribe(self._on_capacity)

    # -- request side ----------------------------------------------------------------------

    def priority(self, header: Callable[[str], str | None]) -> int:
        """The request's priority class value (0 without the header); ``header`` looks a
        request header up by name."""
        name = self._cfg.priority_header
        value = header(name) if name is not None else None
        if value is None:
            return 0
        priority = self._cfg.priority_classes.get(value.strip().lower())
        if priority is None:
            known = ", ".join(sorted(self._cfg.priority_classes))
            raise InvalidRequest(f"unknown {name} {value!r}: one of {known}")
        return priority

    def keepalive(self, request: Request, request_id: str, since: float) -> SseKeepAlive | None:
        interval = self._cfg.keepalive_interval_s
        if interval <= 0:
            return None
        return SseKeepAlive(request, request_id, interval_s=interval, since=since)

    async def acquire(
        self,
        info: RequestInfo,
        *,
        since: float,
        retry: bool = False,
        keepalive: SseKeepAlive | None = None,
    ) -> Decision | None:
        """A replica for ``info`` (acquired: the caller releases it), waiting if needed.

        ``since`` is the request's arrival (its deadline is ``since + max_wait_s``). Raises the
        refusals above; returns None only for a retry that no other replica can ever take.
        """
        if not self._queues.get(info.model):  # nobody waiting for the model: nobody to overtake
            decision = self._router.pick(info)
            if decision is not None:
                return decision
        if not self._can_come(info):
            if retry:
                return None
            raise ModelNotFound(f"The model `{info.model}` does not exist.")
        if not self._enabled:
            if retry:
                return None
            if self._saturated(info.model):
                raise QueueFullSaturated(f"every replica of model {info.model!r} is saturated")
            raise NoReplicaAvailable(f"no replica is ready to serve model {info.model!r}")
        waiter = _Waiter(
            info, since, (-info.priority, info.seq), asyncio.get_running_loop().create_future()
        )
        if info.model not in self._queues and not self._saturated(info.model):
            logger.info("no replica of model %s is ready: requests wait for one", info.model)
        self._enqueue(waiter)
        self._dispatch(info.model)  # capacity may have appeared since the pick above
        self._schedule_ramp_tick()
        return await self._wait(waiter, keepalive)

    def has_waiters(self, model: str) -> bool:
        """Whether requests for ``model`` wait (a new one must not overtake them)."""
        return bool(self._queues.get(model))

    def queued_by_model(self, label: Callable[[str], str] | None = None) -> dict[str, int]:
        """Requests waiting, per model (per metric label when ``label`` maps names to one)."""
        out: dict[str, int] = {}
        for model, queue in self._queues.items():
            key = label(model) if label is not None else model
            out[key] = out.get(key, 0) + len(queue)
        return out

    @property
    def queued(self) -> int:
        return self._count

    # -- queue -----------------------------------------------------------------------------

    def _enqueue(self, waiter: _Waiter) -> None:
        model = waiter.info.model
        queue = self._queues.setdefault(model, [])
        if len(queue) >= self._cfg.max_queued_per_model:
            victim = queue[-1]  # the lowest class, newest first
            if not (victim.info.priority < 0 and victim.info.priority < waiter.info.priority):
                n = len(queue)
                if self._saturated(model):
                    raise QueueFullSaturated(f"{n} requests already wait for model {model!r}")
                raise QueueFull(
                    f"{n} requests already wait for a replica of model {model!r} to be ready"
                )
            self._take(victim)
            victim.future.set_exception(
                RequestShed(f"shed for a more important request to model {model!r}")
            )
        bisect.insort(queue, waiter, key=lambda w: w.key)
        self._count += 1

    def _take(self, waiter: _Waiter) -> bool:
        """Remove ``waiter`` from its queue; False if it was not queued (any more)."""
        model = waiter.info.model
        queue = self._queues.get(model)
        if queue is None:
            return False
        i = bisect.bisect_left(queue, waiter.key, key=lambda w: w.key)
        if i == len(queue) or queue[i] is not waiter:
            return False
        del queue[i]
        self._count -= 1
        if not queue:
            del self._queues[model]
            self._judged.pop(model, None)
        return True

    async def _wait(self, waiter: _Waiter, keepalive: SseKeepAlive | None) -> Decision | None:
        fut = waiter.future
        deadline = waiter.since + self._cfg.max_wait_s
        try:
            while not fut.done():
                now = self._clock()
                if now >= deadline:
                    self._take(waiter)
                    raise self._timed_out(waiter.info.model)
                step = deadline - now
                if keepalive is not None:
                    step = min(step, keepalive.due_in(now))
                if step > 0:
                    await asyncio.wait((fut,), timeout=step)
                if keepalive is not None and not fut.done():
                    now = self._clock()
                    if keepalive.due_in(now) <= 0 and now < deadline:
                        await keepalive.send(now)
            return fut.result()
        except BaseException:
            self._abandon(waiter)
            raise

    def _abandon(self, waiter: _Waiter) -> None:
        fut = waiter.future
        if not fut.done():
            self._take(waiter)
            fut.cancel()
        elif not fut.cancelled() and fut.exception() is None:
            decision = fut.result()
            if decision is not None:  # picked for it in the instant its client left
                self._router.release(decision.replica, waiter.info, ok=False)

    def _timed_out(self, model: str) -> GatewayError:
        wait = self._cfg.max_wait_s
        if self._saturated(model):
            return QueueTimeoutSaturated(
                f"every replica of model {model!r} stayed saturated for {wait:g} s"
            )
        return QueueTimeout(f"no replica of model {model!r} became ready within {wait:g} s")

    # -- dispatch --------------------------------------------------------------------------

    def _on_capacity(self) -> None:
        if self._count and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch_all)

    def _dispatch_all(self) -> None:
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for model in sorted(self._queues, key=lambda m: self._queues[m][0].key):
            self._dispatch(model)
        self._schedule_ramp_tick()

    def _dispatch(self, model: str) -> None:
        queue = self._queues.get(model)
        i = 0
        while queue and i < len(queue):
            waiter = queue[i]
            decision = self._router.pick(waiter.info, count_miss=False)
            if decision is None:
                if not waiter.info.exclude:
                    break  # nothing routable for this model: the ones behind cannot go either
                i += 1  # a retry that avoids the free replicas; later waiters may use them
                continue
            self._take(waiter)
            waiter.future.set_result(decision)
        if model in self._queues and self._judged.get(model) != self._pool.epoch:
            self._judged[model] = self._pool.epoch
            self._settle_hopeless(model)

    def _settle_hopeless(self, model: str) -> None:
        """Answer the waiters whose replica can no longer come (the model turned out unknown)."""
        for waiter in list(self._queues.get(model, ())):
            if self._can_come(waiter.info):
                continue
            self._take(waiter)
            if waiter.info.exclude:
                waiter.future.set_result(None)
            else:
                waiter.future.set_exception(ModelNotFound(f"The model `{model}` does not exist."))

    def _schedule_ramp_tick(self) -> None:
        # The one time-driven change: a replica's slow-start cap grows with time, not events.
        if not self._count or self._timer is not None:
            return
        sat = self._pool.saturation
        if sat is None or sat.max_inflight is None or not self._pool.ramping(self._clock()):
            return
        tick = max(0.05, self._pool.slow_start_s / 20)
        self._timer = asyncio.get_running_loop().call_later(tick, self._on_capacity)

    # -- judgements ------------------------------------------------------------------------

    def _can_come(self, info: RequestInfo) -> bool:
        """Whether some replica may still take ``info`` (see the module docstring)."""
        model, exclude = info.model, info.exclude
        members = self._pool.view(self._clock()).replicas
        if not exclude and (model in self._models or not members):
            return True
        for s in members:
            if s.id in exclude:
                continue
            if not s.models:
                return True
            if model in s.models and (not exclude or s.phase != "draining"):
                return True
        return False

    def _saturated(self, model: str) -> bool:
        """Some ready replica serves ``model``: a refusal is overload (429), not absence."""
        return any(
            s.phase == "ready" and model in s.models
            for s in self._pool.view(self._clock()).replicas
        )


def saturation_bounds(cfg: SaturationConfig) -> Saturation | None:
    """The pool's saturation bounds from config; None when no bound is set."""
    if (cfg.max_inflight_per_replica, cfg.max_queue_per_replica, cfg.max_kv_usage) == (
        None,
        None,
        None,
    ):
        return None
    return Saturation(
        max_inflight=cfg.max_inflight_per_replica,
        max_queue=cfg.max_queue_per_replica,
        max_kv_usage=cfg.max_kv_usage,
    )
