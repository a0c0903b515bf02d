"""Replica lifecycle, live (issue 5's acceptance): scale from zero with a burst held in the
buffer, and a rolling restart under steady load, both against simulated replicas."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from benchmarks.sim.server import ReplicaSettings, SimReplica
from gateway.app import GatewayServer
from gateway.discovery.base import DiscoveredReplica
from policies.types import ReplicaId
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import StartGateway, sample, wait_pool
from tests.gateway.discovery.recording_sink import eventually
from tests.gateway.steady_load import SteadyLoad

FAST_PROBES = {"probe_interval_s": 0.05, "probe_max_interval_s": 0.2}


async def _scale_from_zero(
    start_replicas: StartReplicas,
    start_gateway: StartGateway,
    ready_at_s: list[float],
    burst: int,
    *,
    step_s: float = 0.005,
    tokens: int = 32,
) -> None:
    """``burst`` requests of ``tokens`` tokens (one engine step each) arrive at once while the
    replicas load; each becomes ready ``ready_at_s[i]`` after the start."""
    replicas: list[SimReplica] = []
    for i, cold_start in enumerate(ready_at_s):  # refuses connections, then 503, then ready
        settings = ReplicaSettings.fast(
            step_s=step_s, listen_delay_s=cold_start / 2, load_time_s=cold_start / 2
        )
        replicas += await start_replicas(1, settings, seed=i)
    model = replicas[0].model
    server = await start_gateway(
        [r.url for r in replicas],
        wait_models=False,
        policy={"name": "p2c"},
        models={"names": [model]},  # so the queued gauge has the model's label from the start
        saturation={"max_inflight_per_replica": 16},
        health={**FAST_PROBES, "slow_start_s": 1.0},
    )
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens}
    started = time.monotonic()
    done_at: list[float] = []

    async def one(http: aiohttp.ClientSession) -> int:
        async with http.post(url, json={**body, "ignore_eos": True}) as resp:
            await resp.read()
            done_at.append(time.monotonic() - started)
            return resp.status

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        tasks = [asyncio.create_task(one(http)) for _ in range(burst)]
        await eventually(lambda: server.gateway.buffer.queued == burst)
        # The scale-from-zero signal: all of the burst is queued, none in flight.
        assert sample(server, "kvgate_requests_queued", model=model) == burst
        assert sample(server, "kvgate_requests_in_flight", model=model) == 0
        statuses = await asyncio.gather(*tasks)

    assert statuses == [200] * burst
    assert sample(server, "kvgate_requests_queued", model=model) == 0
    assert min(done_at) >= ready_at_s[0] * 0.9  # nothing could finish before a replica was up
    spread = [r.requests_finished for r in replicas]
    print(f"\nscale from zero: ready at {ready_at_s} s; requests per replica {spread}; "
          f"all {burst} done at {max(done_at):.2f} s")  # fmt: skip
    assert sum(spread) == burst
    # The backlog spreads over the replicas as they come up: the first one up is not given
    # all of it (its in-flight bound, ramped by slow start, holds the rest in the buffer).
    assert all(n >= burst // 20 for n in spread), spread


async def test_scale_from_zero_burst_waits_and_spreads(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    # Cold starts shortened from the 5-10 s to keep the suite fast; the slow variant
    # below runs the full-length version.
    await _scale_from_zero(start_replicas, start_gateway, [2.0, 2.3, 2.6], burst=200)


@pytest.mark.slow
async def test_scale_from_zero_with_5_to_10_s_cold_starts(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    # Requests of ~2.6 s (128 tokens at 20 ms): the first replica cannot drain the backlog
    # before the others are up, as with real generations against minute-long cold starts.
    await _scale_from_zero(
        start_replicas, start_gateway, [5.0, 7.5, 10.0], burst=200, step_s=0.02, tokens=128
    )


def _members(replicas: dict[str, tuple[SimReplica, str]]) -> list[DiscoveredReplica]:
    """A discovery snapshot: name -> (replica, "starting" | "ready" | "terminating")."""
    return [
        DiscoveredReplica(
            name, r.url, ready=state != "starting", terminating=state == "terminating"
        )
        for name, (r, state) in replicas.items()
    ]


async def test_rolling_restart_under_steady_load_fails_no_request(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    old = await start_replicas(3, ReplicaSettings.fast(step_s=0.005))
    server: GatewayServer = await start_gateway([], health=FAST_PROBES, policy={"name": "p2c"})
    pool = server.gateway.pool
    # Discovery as Kubernetes reports a rollout (maxSurge 1): pods named like a Deployment's.
    members: dict[str, tuple[SimReplica, str]] = {
        f"vllm-old-{i}": (r, "ready") for i, r in enumerate(old)
    }
    pool.set_members("kubernetes", _members(members))
    await server.gateway.catalog.refresh_once()
    fresh: list[SimReplica] = []
    cold = ReplicaSettings.fast(step_s=0.005, listen_delay_s=0.15, load_time_s=0.15)

    def phase(name: str) -> str | None:
        rid = ReplicaId(name)
        return pool.state(rid).phase if rid in pool else None

    async with SteadyLoad(f"http://127.0.0.1:{server.port}", old[0].model) as load:
        await load.wait_for_requests(20)
        for i, replica in enumerate(old):
            (new,) = await start_replicas(1, cold, seed=10 + i)
            fresh.append(new)
            members[f"vllm-new-{i}"] = (new, "starting")  # the pod exists, not ready yet
            pool.set_members("kubernetes", _members(members))
            await new.wait_ready()
            members[f"vllm-new-{i}"] = (new, "ready")  # its readiness probe passed
            pool.set_members("kubernetes", _members(members))
            await wait_pool(pool, lambda i=i: phase(f"vllm-new-{i}") == "ready")
            members[f"vllm-old-{i}"] = (replica, "terminating")
            pool.set_members("kubernetes", _members(members))
            replica.drain()  # SIGTERM: it finishes what it has and refuses new work
            del members[f"vllm-old-{i}"]  # the pod is gone from the EndpointSlice...
            pool.set_members("kubernetes", _members(members))
            await wait_pool(pool, lambda i=i: phase(f"vllm-old-{i}") is None)
            await replica.stop()  # ...and only then does the process exit
            await load.wait_for_requests(10)
    assert load.failures == [], load.summary()
    assert all(r.requests_finished > 0 for r in fresh)
    assert sorted(pool.ids()) == [f"vllm-new-{i}" for i in range(3)]
    print(f"\nrolling restart: {load.done} requests, 0 failed")
