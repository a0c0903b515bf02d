"""The live stack's processes for ``validate_live``: simulated replicas and the real gateway.

Each runs in its own spawned process (so the client, the gateway and the replicas get their
own event loops and, on 2 cores, their own CPU), started and stopped through ``Child``.
Protocol over a pipe: the child sends what the parent needs (the replicas' URLs, the
gateway's port), waits for "stop", shuts down cleanly and sends a final dict of measurements
(its CPU seconds; the replicas' step lag - the worst replica's mean and the largest single
lag - which shows whether they kept real time).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import uvloop

CHILD_START_S = 60.0


def replicas_main(
    n: int, profile: str, overrides: dict[str, int | float], seed: int, conn: Connection
) -> None:
    """``n`` simulated replicas of ``profile`` with ``overrides``, ready at once."""
    from benchmarks.sim.server import ReplicaSettings, run_replicas

    async def main() -> None:
        settings = ReplicaSettings(profile=profile, profile_overrides=overrides, load_time_s=0.0)
        async with run_replicas(n, settings, seed=seed) as replicas:
            conn.send([r.url for r in replicas])
            cpu0 = time.process_time()
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            final = {
                "cpu_s": time.process_time() - cpu0,
                # the worst replica's mean: one starved replica is enough to skew the run
                "step_lag_mean_s": max(r.step_lag_total_s / max(1, r.steps) for r in replicas),
                "step_lag_max_s": max(r.step_lag_max_s for r in replicas),
                "preemptions": sum(r.engine.stats.num_preemptions for r in replicas),
            }
        conn.send(final)

    uvloop.run(main())


def gateway_main(doc: dict[str, Any], seed: int, conn: Connection) -> None:
    """The real gateway (``GatewayServer``) configured by ``doc``, its models listed."""
    from gateway.app import GatewayServer
    from gateway.config import config_from_builtins

    async def main() -> None:
        server = GatewayServer(config_from_builtins(doc), rng=random.Random(seed))
        await server.start()
        try:
            await server.gateway.catalog.refresh_once()  # every replica ready and listed
            conn.send(server.port)
            cpu0 = time.process_time()
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            cpu = time.process_time() - cpu0
        finally:
            await server.stop()
        conn.send({"cpu_s": cpu})

    uvloop.run(main())


class Child:
    """A spawned child process speaking the protocol above; ``final`` after ``stop``."""

    def __init__(self, target: Callable[..., None], *args: object) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=target, args=(*args, child_conn), daemon=True)
        self._name = target.__name__
        self.final: dict[str, float] = {}

    def start(self) -> Any:
        """Start the process and return its first message (blocks up to CHILD_START_S)."""
        self._proc.start()
        if not self._conn.poll(CHILD_START_S):
            self.stop()
            raise RuntimeError(f"{self._name} did not start within {CHILD_START_S} s")
        return self._conn.recv()

    def stop(self) -> None:
        """Ask it to stop, collect its final measurements, reap it (terminate if stuck)."""
        with contextlib.suppress(OSError, EOFError):
            self._conn.send("stop")
            if self._conn.poll(15.0):
                self.final = self._conn.recv()
        self._proc.join(5.0)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5.0)
