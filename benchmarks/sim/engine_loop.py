"""The engine model in real time: one ``EngineLoop`` drives one replica's ``Engine`` on a clock
and delivers its tokens to the HTTP handlers waiting on them.

The loop is the only caller of ``schedule``/``complete``: it sleeps for each step's duration on
the clock, then hands every ``TokenEvent`` to the request's ``Flow`` and wakes its handler.
Handlers ``admit`` a request and ``settle`` it before they return; ``kill_all`` ends every flow
(crash, stop). The engine may be replaced at any time (a crash loses it): a step in flight on
the old one is dropped.

Invariant: every admitted request is either finished by the engine or aborted in it before its
handler returns, so KV is never leaked; ``admitted == finished + aborted + inflight``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from benchmarks.sim.engine import Engine, SimRequest, TokenEvent
from benchmarks.sim.faults import Lifecycle

_MAX_CATCH_UP_S = 0.1


class Flow:
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


class EngineLoop:
    """Runs ``engine`` in real time (``run``), stalling while ``life`` is hung; calls ``notify``
    after every step and every change to the counters."""

    def __init__(
        self,
        engine: Engine,
        life: Lifecycle,
        notify: Callable[[], None],
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.engine = engine  # replaced on crash
        self.admitted = 0  # added to the engine
        self.finished = 0
        self.aborted = 0  # removed from the engine unfinished
        self.steps = 0  # engine steps run in real time
        self.step_lag_total_s = 0.0
        self.step_lag_max_s = 0.0
        self._life = life
        self._notify = notify
        self._clock = clock
        self._flows: dict[str, Flow] = {}
        self._last_add_s = 0.0
        self._work = asyncio.Event()

    @property
    def inflight(self) -> int:
        return len(self._flows)

    def now(self) -> float:
        """The engine's clock: the injected one, else the event loop's."""
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def admit(self, request: SimRequest) -> Flow:
        """Add ``request`` to the engine; its handler must ``settle`` it before returning."""
        flow = Flow()
        self._last_add_s = now = self.now()
        self.engine.add_request(request, now)
        self._flows[request.request_id] = flow
        self.admitted += 1
        self._work.set()
        return flow

    def settle(self, rid: str, flow: Flow) -> None:
        """Count a finished request, or abort it in the engine (client gone, stream cut)."""
        if rid in self._flows:
            if flow.finished:
                del self._flows[rid]
                self.finished += 1
                self._notify()
            else:
                self._abort(rid)

    def wake_all(self) -> None:
        """Make every waiting handler look again (a fault switch changed)."""
        for flow in self._flows.values():
            flow.wake()

    def kill_all(self) -> None:
        """The replica died under every flow: wake each handler to give up, abort each request."""
        for rid, flow in list(self._flows.items()):
            flow.dead = True
            flow.wake()
            self._abort(rid)

    async def run(self) -> None:
        """Drive schedule/complete in real time: each step lasts its ``duration_s``."""
        loop = asyncio.get_running_loop()
        clock = self._clock or loop.time
        flows = self._flows
        t = clock()
        life = self._life
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
            self.finished += 1
        else:
            self.engine.abort_request(rid, self.now())
            self.aborted += 1
            self._work.set()  # freed KV may unblock waiting requests
        self._notify()
