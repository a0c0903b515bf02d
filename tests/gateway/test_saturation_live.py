"""Saturation bounds, live (the mechanism behind benchmarks/experiments/saturation): with a
bound, overload waits in the gateway's buffer and each replica's own queue stays empty;
without one, it piles up in the replicas' queues."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from benchmarks.sim.server import ReplicaSettings, SimReplica
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import StartGateway

BATCH = 4  # the engine runs at most this many sequences; more wait in its own queue


async def _overload(
    start_replicas: StartReplicas, start_gateway: StartGateway, **sections: Any
) -> tuple[int, int, list[int]]:
    """30 concurrent requests against 2 replicas that batch 4 each: (max replica waiting,
    max gateway queued, requests per replica)."""
    settings = ReplicaSettings.fast(step_s=0.005).with_overrides(max_num_seqs=BATCH)
    replicas = await start_replicas(2, settings)
    server = await start_gateway([r.url for r in replicas], policy={"name": "p2c"}, **sections)
    buffer = server.gateway.buffer
    max_queued = 0
    max_waiting = 0

    def on_capacity() -> None:
        nonlocal max_queued
        max_queued = max(max_queued, buffer.queued)

    def watch(r: SimReplica) -> bool:  # evaluated on every engine step and state change
        nonlocal max_waiting
        max_waiting = max(max_waiting, r.engine.stats.num_waiting)
        return False

    server.gateway.pool.capacity.subscribe(on_capacity)
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    body = {
        "model": replicas[0].model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 12,
        "ignore_eos": True,
        "stream": True,
    }

    async def one(http: aiohttp.ClientSession) -> int:
        async with http.post(url, json=body) as resp:
            await resp.read()
            return resp.status

    watchers = [asyncio.create_task(r.wait_for(watch, timeout_s=30)) for r in replicas]
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            statuses = await asyncio.gather(*(one(http) for _ in range(30)))
    finally:
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    assert statuses == [200] * 30
    spread = [r.requests_finished for r in replicas]
    print(f"\n{sections or 'no bound'}: max waiting in a replica {max_waiting}, max queued in "
          f"the gateway {max_queued}, requests per replica {spread}")  # fmt: skip
    return max_waiting, max_queued, spread


async def test_with_a_bound_overload_waits_at_the_gateway_not_in_replica_queues(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    waiting, queued, spread = await _overload(
        start_replicas, start_gateway, saturation={"max_inflight_per_replica": BATCH}
    )
    assert waiting == 0  # never more than a batch at a replica: its queue stays empty
    assert queued >= 30 - 2 * BATCH - 2  # the rest was held in the buffer
    assert sum(spread) == 30 and min(spread) >= 8  # late binding kept both replicas busy


async def test_without_a_bound_overload_piles_onto_replica_queues(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    waiting, queued, _ = await _overload(start_replicas, start_gateway)
    assert queued == 0
    assert waiting >= 30 // 2 - BATCH - 3  # dispatched at once: it waits inside the engines
