"""Cold start and every fault of the simulated replica, observed the way a client sees them.

Transitions are awaited with ``SimReplica.wait_for`` (bounded), never with bare sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from typing import Any

import aiohttp
import openai
import pytest

from benchmarks.sim.server import ReplicaSettings, SimReplica
from tests.benchmarks.conftest import StartReplicas


def stream_body(max_tokens: int) -> dict[str, Any]:
    return {"prompt": "hello " * 20, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}


async def status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as resp:
        return resp.status


async def read_events(resp: aiohttp.ClientResponse) -> tuple[list[bytes], BaseException | None]:
    """SSE payloads until the stream ends, and the error that ended it, if any."""
    events: list[bytes] = []
    try:
        async for line in resp.content:
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
    except aiohttp.ClientError as exc:
        return events, exc
    return events, None


async def test_cold_start_refused_then_503_then_ready(start_replicas: StartReplicas) -> None:
    settings = ReplicaSettings.fast(listen_delay_s=0.1, load_time_s=0.5)
    (replica,) = await start_replicas(1, settings)
    assert replica.phase == "starting"
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectorError):
            await status(http, replica.url + "/health")
        await replica.wait_for(lambda r: r.phase == "loading", timeout_s=2.0)
        assert await status(http, replica.url + "/health") == 503
        async with http.post(replica.url + "/v1/completions", json={"prompt": "x"}) as resp:
            assert resp.status == 503
        await replica.wait_ready(timeout_s=2.0)
        assert await status(http, replica.url + "/health") == 200
        async with http.post(replica.url + "/v1/completions", json={"prompt": "x"}) as resp:
            assert resp.status == 200


async def test_set_ready_ends_loading_early(start_replicas: StartReplicas) -> None:
    (replica,) = await start_replicas(1, ReplicaSettings.fast(load_time_s=600.0))
    async with aiohttp.ClientSession() as http:
        assert await status(http, replica.url + "/health") == 503
        replica.set_ready()
        assert await status(http, replica.url + "/health") == 200


async def test_crash_resets_streams_and_refuses_until_restart(sim_replica: SimReplica) -> None:
    url = sim_replica.url
    async with aiohttp.ClientSession() as http:
        resp = await http.post(url + "/v1/completions", json=stream_body(10_000))
        await resp.content.readuntil(b"\n\n")
        await sim_replica.crash()
        events, error = await read_events(resp)
        assert error is not None and b"[DONE]" not in events
        with pytest.raises(aiohttp.ClientConnectorError):
            await status(http, url + "/health")
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="sim", max_retries=0)
        with pytest.raises(openai.APIConnectionError):
            await client.models.list()
        await sim_replica.restart(load_time_s=0.0)
        assert sim_replica.url == url  # the port survived the crash
        models = await client.models.list()
        await client.close()
    assert [m.id for m in models.data] == [sim_replica.model]
    assert sim_replica.engine.stats.generation_tokens == 0  # a new process: fresh counters
    assert sim_replica.requests_aborted == 1


async def test_crash_over_http_comes_back_by_itself(sim_replica: SimReplica) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            sim_replica.url + "/sim/control", json={"action": "crash", "restart_after_s": 0.2}
        ) as resp:
            assert resp.status == 200
        await sim_replica.wait_for(lambda r: r.phase != "ready", timeout_s=2.0)
        with pytest.raises(aiohttp.ClientConnectorError):
            await status(http, sim_replica.url + "/health")
        await sim_replica.wait_ready(timeout_s=3.0)
        assert await status(http, sim_replica.url + "/health") == 200


async def test_hang_accepts_but_never_answers(sim_replica: SimReplica) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(sim_replica.url + "/v1/completions", json=stream_body(10_000))
        await resp.content.readuntil(b"\n\n")
        sim_replica.hang()
        generated = sim_replica.engine.stats.generation_tokens
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(status(http, sim_replica.url + "/metrics"), 0.2)
        with pytest.raises(asyncio.TimeoutError):  # the running stream stalls too
            await asyncio.wait_for(resp.content.read(), 0.1)
        assert sim_replica.engine.stats.generation_tokens <= generated + 1  # a step in flight
        client = openai.AsyncOpenAI(
            base_url=sim_replica.url + "/v1", api_key="sim", max_retries=0, timeout=0.2
        )
        with pytest.raises(openai.APITimeoutError):
            await client.models.list()
        await client.close()
        held = asyncio.create_task(status(http, sim_replica.url + "/health"))
        sim_replica.unhang()
        assert await asyncio.wait_for(held, 2.0) == 200
        await sim_replica.wait_for(
            lambda r: r.engine.stats.generation_tokens > generated + 5, timeout_s=2.0
        )  # tokens flow again
        resp.close()


async def test_drop_streams_cuts_after_k_tokens_without_done(sim_replica: SimReplica) -> None:
    sim_replica.drop_streams(after_tokens=3)
    async with aiohttp.ClientSession() as http:
        async with http.post(sim_replica.url + "/v1/completions", json=stream_body(50)) as resp:
            events, error = await read_events(resp)
        assert isinstance(error, aiohttp.ClientPayloadError)
        assert len(events) == 3 and b"[DONE]" not in events
        with pytest.raises(aiohttp.ServerDisconnectedError):  # non-streaming: no response at all
            async with http.post(
                sim_replica.url + "/v1/completions",
                json={"prompt": "x", "max_tokens": 50, "ignore_eos": True},
            ) as resp:
                await resp.read()
        # A response that fits in k tokens is untouched.
        async with http.post(sim_replica.url + "/v1/completions", json=stream_body(2)) as resp:
            events, error = await read_events(resp)
        assert error is None and events[-1] == b"[DONE]"
        sim_replica.drop_streams(None)
        async with http.post(sim_replica.url + "/v1/completions", json=stream_body(10)) as resp:
            events, error = await read_events(resp)
        assert error is None and len(events) == 11
    await sim_replica.wait_for(lambda r: r.inflight_requests == 0, timeout_s=2.0)
    assert sim_replica.streams_dropped == 2 and sim_replica.requests_aborted == 2
    assert not sim_replica.engine.has_work()


async def _median_gap(http: aiohttp.ClientSession, url: str, tokens: int) -> float:
    stamps: list[float] = []
    async with http.post(url + "/v1/completions", json=stream_body(tokens)) as resp:
        async for line in resp.content:
            if line.startswith(b"data: "):
                stamps.append(time.perf_counter())
    # Gaps between token events: not the first (TTFT) nor the [DONE] after the last token.
    return statistics.median(b - a for a, b in itertools.pairwise(stamps[:-1]))


async def test_slow_stretches_inter_token_latency(start_replicas: StartReplicas) -> None:
    (replica,) = await start_replicas(1, ReplicaSettings.fast(step_s=0.005))
    async with aiohttp.ClientSession() as http:
        normal = await _median_gap(http, replica.url, 20)
        replica.slow(4.0)
        slow = await _median_gap(http, replica.url, 20)
    assert slow > 2.0 * normal  # 4x in the model; loose for a loaded machine


async def test_drain_finishes_running_and_refuses_new(sim_replica: SimReplica) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(sim_replica.url + "/v1/completions", json=stream_body(40))
        await resp.content.readuntil(b"\n\n")
        sim_replica.drain()
        async with http.post(sim_replica.url + "/v1/completions", json=stream_body(5)) as new:
            assert new.status == 503
            assert (await new.json())["error"]["code"] == 503
        assert await status(http, sim_replica.url + "/health") == 503
        assert await status(http, sim_replica.url + "/metrics") == 200  # still observable
        events, error = await read_events(resp)
        assert error is None and events[-1] == b"[DONE]"
        resp.close()
        sim_replica.set_ready()
        assert await status(http, sim_replica.url + "/health") == 200
    assert sim_replica.requests_finished == 1 and sim_replica.requests_aborted == 0


async def test_faults_present_at_start(start_replicas: StartReplicas) -> None:
    (hung,) = await start_replicas(1, ReplicaSettings.fast(hung=True))
    (draining,) = await start_replicas(1, ReplicaSettings.fast(draining=True))
    (slow,) = await start_replicas(1, ReplicaSettings.fast(slow_factor=3.0))
    async with aiohttp.ClientSession() as http:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(status(http, hung.url + "/health"), 0.2)
        assert await status(http, draining.url + "/health") == 503
    assert slow.engine.slow_factor == 3.0


async def test_control_endpoint(sim_replica: SimReplica) -> None:
    url = sim_replica.url + "/sim/control"
    async with aiohttp.ClientSession() as http:
        bad: object
        for bad in (
            {"action": "explode"},
            {"action": "slow"},
            {"action": "slow", "factor": -1},
            {"action": "hang", "duration_s": "soon"},
            {"action": "drop_streams", "after_tokens": 2, "extra": 1},
            [],
        ):
            async with http.post(url, json=bad) as resp:
                assert resp.status == 400, bad
                assert "error" in await resp.json()
        async with http.post(url, json={"action": "slow", "factor": 2}) as resp:
            assert resp.status == 200 and (await resp.json())["slow_factor"] == 2.0
        async with http.post(url, json={"action": "drop_streams", "after_tokens": 5}) as resp:
            assert (await resp.json())["drop_after_tokens"] == 5
        async with http.post(url, json={"action": "hang", "duration_s": 0.1}) as resp:
            assert (await resp.json())["hung"] is True
        await sim_replica.wait_for(lambda r: not r.hung, timeout_s=2.0)
        async with http.post(url, json={"action": "drain"}) as resp:
            assert (await resp.json())["phase"] == "draining"
        async with http.get(sim_replica.url + "/sim/state") as resp:
            state = await resp.json()
    assert state["phase"] == "draining" and state["slow_factor"] == 2.0
