"""Lifecycle and faults of a simulated replica: its port, its phases, and the control commands.

``Lifecycle`` is the process-level state machine of one replica, apart from its engine::

    starting (port bound, not listening: connection refused) -> loading (listening, 503)
      -> ready <-> draining;   any -> crashed (listener closed, every connection reset)
      -> starting ... again on restart;   any -> stopped (for good)

The port is bound before it listens and re-bound (not listening) after a crash, so a replica
keeps its URL across restarts and a client sees "connection refused", never someone else's
server. ``hang`` holds every answer (the server middleware awaits ``wait_unhung``).

``FaultControls`` is what a ``SimReplica`` offers to break itself on purpose; ``apply_control``
runs one ``POST /sim/control`` command, validated first by ``parse_control`` so a bad command
is a 400 and never a half-applied fault. The same commands are what a demo or an operator
sends with curl, e.g. ``{"action": "crash", "restart_after_s": 5}``.

Actions and their parameters (all optional unless marked):

==============  ==========================================================================
crash           ``restart_after_s``: come back (cold start) after that many seconds
restart         ``listen_delay_s``, ``load_time_s``: crash now, then cold-start again
hang            ``duration_s``: accept connections and never answer (until ``unhang``)
unhang          answer again; held requests proceed
drop_streams    ``after_tokens`` (int or null): cut each response after k tokens; null stops
slow            ``factor`` (required, > 0): multiply every engine step time
drain           finish running requests, refuse new ones with 503, ``/health`` 503
set_ready       end loading or draining now
==============  ==========================================================================
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from collections.abc import Callable
from typing import Literal, Protocol

from aiohttp import web

from benchmarks.sim.openai_shapes import RequestError

logger = logging.getLogger(__name__)

Phase = Literal["starting", "loading", "ready", "draining", "crashed", "stopped"]
DOWN: frozenset[Phase] = frozenset({"crashed", "stopped"})


class Lifecycle:
    """Port, listener and phase of one replica; ``on_change`` runs after every transition.

    ``open(app)`` binds the port (``port`` 0 picks a free one) under a runner of our own, with
    ``handler_cancellation`` so a client that leaves cancels its handler. Without ``open`` (an
    app served by someone else's runner) the phases still change but the port is not ours:
    the server then resets connections itself while down.
    """

    def __init__(self, host: str, port: int, on_change: Callable[[], None]) -> None:
        self.host, self.port = host, port
        self.phase: Phase = "stopped"
        self.hung = False
        self._on_change = on_change
        self._unhung = asyncio.Event()
        self._unhung.set()
        self._unhang_timer: asyncio.TimerHandle | None = None
        self._boot_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._sock: socket.socket | None = None
        self._site: web.SockSite | None = None

    @property
    def owns_port(self) -> bool:
        return self._runner is not None

    async def open(self, app: web.Application) -> None:
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        self._reserve()

    async def close(self) -> None:
        await self.go_down("stopped")
        if self._unhang_timer is not None:
            self._unhang_timer.cancel()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def boot(self, listen_delay_s: float, load_time_s: float, *, draining: bool) -> None:
        """Cold start: refuse connections, then answer 503, then serve. Returns at once if
        there is a delay (a task of ours runs the rest); listening already otherwise."""
        self._cancel_boot()
        final: Phase = "draining" if draining else "ready"
        if listen_delay_s > 0:
            self._set("starting")
            self._boot_task = asyncio.create_task(self._boot(listen_delay_s, load_time_s, final))
            return
        await self._listen()
        if load_time_s > 0:
            self._set("loading")
            self._boot_task = asyncio.create_task(self._boot(0.0, load_time_s, final))
        else:
            self._set(final)

    async def _boot(self, listen_delay_s: float, load_time_s: float, final: Phase) -> None:
        if listen_delay_s > 0:
            await asyncio.sleep(listen_delay_s)
            await self._listen()
        self._set("loading")
        await asyncio.sleep(load_time_s)
        self._boot_task = None
        self._set(final)

    async def go_down(self, phase: Phase) -> None:
        """Close the listener and reset every open connection (a process that died)."""
        self._cancel_boot()
        self._set(phase)
        if self._site is not None:
            site, self._site = self._site, None
            await site.stop()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        server = self._runner.server if self._runner is not None else None
        for handler in server.connections if server is not None else ():
            if handler.transport is not None:
                handler.transport.abort()
        self.hung = False  # a dead process hangs no more; requests held see the phase, give up
        self._cancel_unhang_timer()
        self._unhung.set()
        if phase == "crashed" and self._runner is not None:
            self._reserve()

    def hang(self, duration_s: float | None) -> None:
        self.hung = True
        self._unhung.clear()
        self._cancel_unhang_timer()
        if duration_s is not None:
            self._unhang_timer = asyncio.get_running_loop().call_later(duration_s, self.unhang)
        self._on_change()

    def unhang(self) -> None:
        self.hung = False
        self._unhung.set()
        self._cancel_unhang_timer()
        self._on_change()

    async def wait_unhung(self) -> None:
        await self._unhung.wait()

    def drain(self) -> None:
        if self.phase in ("ready", "loading"):
            self._cancel_boot()
            self._set("draining")

    def set_ready(self) -> None:
        if self.phase in ("loading", "draining"):
            self._cancel_boot()
            self._set("ready")

    def _reserve(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))  # bound, not listening: connections are refused
        self.port = sock.getsockname()[1]
        self._sock = sock

    async def _listen(self) -> None:
        if self._runner is None or self._site is not None:
            return
        if self._sock is None:
            self._reserve()
        assert self._sock is not None
        self._site = web.SockSite(self._runner, self._sock)
        await self._site.start()

    def _set(self, phase: Phase) -> None:
        if phase != self.phase:
            logger.info("replica %s:%d: %s -> %s", self.host, self.port, self.phase, phase)
            self.phase = phase
        self._on_change()

    def _cancel_boot(self) -> None:
        task, self._boot_task = self._boot_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _cancel_unhang_timer(self) -> None:
        if self._unhang_timer is not None:
            self._unhang_timer.cancel()
            self._unhang_timer = None


class FaultControls(Protocol):
    async def crash(self, restart_after_s: float | None = None) -> None: ...
    async def restart(
        self, *, listen_delay_s: float | None = None, load_time_s: float | None = None
    ) -> None: ...
    def hang(self, duration_s: float | None = None) -> None: ...
    def unhang(self) -> None: ...
    def drop_streams(self, after_tokens: int | None) -> None: ...
    def slow(self, factor: float) -> None: ...
    def drain(self) -> None: ...
    def set_ready(self) -> None: ...


# action -> allowed parameter names; crash and restart take the listener down, so the control
# handler must answer before running them (see ``is_disruptive``).
ACTIONS: dict[str, frozenset[str]] = {
    "crash": frozenset({"restart_after_s"}),
    "restart": frozenset({"listen_delay_s", "load_time_s"}),
    "hang": frozenset({"duration_s"}),
    "unhang": frozenset(),
    "drop_streams": frozenset({"after_tokens"}),
    "slow": frozenset({"factor"}),
    "drain": frozenset(),
    "set_ready": frozenset(),
}


def _seconds(params: dict[str, object], key: str) -> float | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"'{key}' must be a number of seconds")
    if not math.isfinite(value) or value < 0:
        raise RequestError(400, f"'{key}' must be finite and >= 0, got {value}")
    return float(value)


def parse_control(body: object) -> tuple[str, dict[str, object]]:
    """Validate a control body; returns (action, params)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the control body must be a JSON object with an 'action'")
    action = body.get("action")
    if not isinstance(action, str) or action not in ACTIONS:
        raise RequestError(400, f"'action' must be one of {sorted(ACTIONS)}, got {action!r}")
    params = {k: v for k, v in body.items() if k != "action"}
    unknown = set(params) - ACTIONS[action]
    if unknown:
        raise RequestError(400, f"unknown parameters for {action!r}: {sorted(unknown)}")
    for key in ("restart_after_s", "listen_delay_s", "load_time_s", "duration_s"):
        if key in params:
            params[key] = _seconds(params, key)
    if action == "drop_streams":
        after = params.get("after_tokens")
        if after is not None and (
            isinstance(after, bool) or not isinstance(after, int) or after < 0
        ):
            raise RequestError(400, "'after_tokens' must be an integer >= 0 or null")
    if action == "slow":
        factor = params.get("factor")
        if (
            isinstance(factor, bool)
            or not isinstance(factor, (int, float))
            or not math.isfinite(factor)
            or factor <= 0
        ):
            raise RequestError(400, "'factor' must be a finite number > 0")
    return action, params


def is_disruptive(action: str) -> bool:
    return action in ("crash", "restart")


async def apply_control(target: FaultControls, action: str, params: dict[str, object]) -> None:
    """Run one validated command (from ``parse_control``)."""
    if action == "crash":
        await target.crash(restart_after_s=_seconds(params, "restart_after_s"))
    elif action == "restart":
        await target.restart(
            listen_delay_s=_seconds(params, "listen_delay_s"),
            load_time_s=_seconds(params, "load_time_s"),
        )
    elif action == "hang":
        target.hang(_seconds(params, "duration_s"))
    elif action == "unhang":
        target.unhang()
    elif action == "drop_streams":
        after = params.get("after_tokens")
        target.drop_streams(after if isinstance(after, int) else None)
    elif action == "slow":
        factor = params["factor"]
        assert isinstance(factor, (int, float))
        target.slow(float(factor))
    elif action == "drain":
        target.drain()
    elif action == "set_ready":
        target.set_ready()
    else:  # parse_control admits only the actions above
        raise AssertionError(action)
