"""Failures between the gateway and its replicas: retries before the first byte only, explicit
errors after it, timeouts, and client disconnects that release everything."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from gateway.app import GatewayServer
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import StartGateway, sample, wait_pool


@pytest.fixture(params=[True, False], ids=["callbacks", "tasks"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    """Every test here runs on both request paths: the callback path and the task path."""
    return bool(request.param)


def _chat(model: str, *, stream: bool = False, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": stream,
        **extra,
    }


def _url(server: GatewayServer, path: str = "/v1/chat/completions") -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def test_refused_connections_are_retried_and_the_client_never_notices(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    dead, alive = await start_replicas(2)
    server = await start_gateway([dead.url, alive.url])
    await dead.crash()  # the port stays reserved but refuses connections
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key="k", max_retries=0
    ) as client:
        for i in range(6):
            stream = i % 2 == 0
            resp = await client.chat.completions.create(**_chat(dead.model, stream=stream))
            if stream:
                assert [c async for c in resp]
    assert alive.requests_finished == 6
    assert sample(server, "kvgate_upstream_errors_total", reason="connect") >= 1
    # Round-robin sends every other request to the dead replica: each is retried once.
    assert sample(server, "kvgate_retries_total", reason="upstream_connect") == 3
    assert server.gateway.pool.total_inflight() == 0


async def test_a_503_is_retried_on_another_replica_but_a_400_is_not(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    a, b = await start_replicas(2)
    server = await start_gateway([a.url, b.url])
    a.drain()  # answers 503 to new requests
    async with aiohttp.ClientSession() as http:
        for _ in range(4):
            async with http.post(_url(server), json=_chat(a.model)) as resp:
                assert resp.status == 200
        assert a.requests_rejected >= 1
        assert b.requests_finished == 4
        a.set_ready()
        seen = a.requests_seen + b.requests_seen
        async with http.post(_url(server), json=_chat(a.model, max_tokens=0)) as resp:
            assert resp.status == 400  # the replica's own validation error, passed through
            assert "error" in await resp.json()
        assert a.requests_seen + b.requests_seen == seen + 1  # a 4xx is never retried


async def test_when_every_replica_fails_the_client_gets_the_last_answer(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    a, b = await start_replicas(2)
    server = await start_gateway([a.url, b.url])
    a.drain()
    b.drain()
    async with aiohttp.ClientSession() as http:
        async with http.post(_url(server), json=_chat(a.model)) as resp:
            assert resp.status == 503  # the replicas' own 503, after trying both
            assert a.requests_seen == b.requests_seen == 1
        await a.crash()
        await b.crash()
        async with http.post(_url(server), json=_chat(a.model)) as resp:
            assert resp.status == 502
            body = await resp.json()
    assert body["error"]["code"] in ("upstream_connect", "upstream_disconnected")
    assert body["error"]["type"] == "server_error"
    assert server.gateway.pool.total_inflight() == 0


async def test_mid_stream_failure_ends_with_an_error_event_and_no_done(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    a, b = await start_replicas(2)
    server = await start_gateway([a.url, b.url])
    a.drop_streams(after_tokens=3)
    b.drop_streams(after_tokens=3)
    body = _chat(a.model, stream=True, max_tokens=50)
    async with aiohttp.ClientSession() as http, http.post(_url(server), json=body) as resp:
        assert resp.status == 200
        raw = await resp.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert b"[DONE]" not in raw
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "upstream_disconnected"
    assert len(events) >= 3  # the tokens before the failure did reach the client
    assert a.requests_seen + b.requests_seen == 1  # never retried after the first byte
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key="k", max_retries=0
    ) as client:
        stream = await client.chat.completions.create(**_chat(a.model, stream=True, max_tokens=50))
        with pytest.raises(openai.APIError, match="closed the response"):
            async for _ in stream:
                pass
    await wait_pool(server.gateway.pool, lambda: server.gateway.pool.total_inflight() == 0)


async def test_non_streaming_failure_is_a_502_never_a_short_200(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    a, b = await start_replicas(2)
    server = await start_gateway([a.url, b.url])
    a.drop_streams(after_tokens=2)
    b.drop_streams(after_tokens=2)
    body = _chat(a.model, max_tokens=20)
    async with aiohttp.ClientSession() as http, http.post(_url(server), json=body) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["code"] == "upstream_disconnected"
    # Nothing had reached the client, so the other replica was tried too.
    assert a.requests_seen == b.requests_seen == 1


async def test_a_stream_cut_before_its_first_byte_is_retried(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    a, b = await start_replicas(2)
    server = await start_gateway([a.url, b.url])
    a.drop_streams(after_tokens=0)  # headers sent, then the connection closes
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.post(_url(server), json=_chat(a.model, stream=True)) as resp:
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert b.requests_finished == 2
    assert a.streams_dropped == 1


async def test_first_byte_timeout_is_a_504_and_closes_the_upstream_request(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    (a,) = await start_replicas(1)
    server = await start_gateway([a.url], upstream={"first_byte_timeout_s": 0.3})
    a.hang()
    async with (
        aiohttp.ClientSession() as http,
        http.post(_url(server), json=_chat(a.model)) as resp,
    ):
        assert resp.status == 504
        assert (await resp.json())["error"]["code"] == "upstream_timeout"
    assert server.gateway.pool.total_inflight() == 0
    assert sample(server, "kvgate_retries_total", reason="upstream_timeout") == 0


async def test_client_disconnect_mid_stream_aborts_the_replica_request(
    start_replicas: StartReplicas, start_gateway: StartGateway, fast_settings: Any
) -> None:
    slow = replace(fast_settings).with_overrides(weights_floor_s=0.02)
    (a,) = await start_replicas(1, slow)
    server = await start_gateway([a.url])
    pool = server.gateway.pool
    body = _chat(a.model, stream=True, max_tokens=500, ignore_eos=True)
    async with aiohttp.ClientSession() as http:
        resp = await http.post(_url(server), json=body)
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        await resp.content.readuntil(b"\n\n")
        assert pool.total_inflight() == 1
        resp.close()  # the client goes away mid-stream
    await a.wait_for(lambda r: r.requests_aborted == 1, 2.0)
    await wait_pool(pool, lambda: pool.total_inflight() == 0)
    assert a.requests_finished == 0
    # The handler unwinds synchronously after its release: the 499 is already counted.
    assert sample(server, "kvgate_requests_total", model=a.model, code="499") == 1


async def test_client_disconnect_while_waiting_releases_the_replica(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    (a,) = await start_replicas(1)
    server = await start_gateway([a.url])
    pool = server.gateway.pool
    a.hang()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as http:
        with pytest.raises(TimeoutError):
            await http.post(_url(server), json=_chat(a.model))
    await wait_pool(pool, lambda: pool.total_inflight() == 0)
