"""The buffer, live: requests wait for capacity, and its bounds, deadlines, priorities,
disconnects and keep-alives produce the documented answers (gateway/buffer.py's table)."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDictProxy

from benchmarks.sim.server import ReplicaSettings, SimReplica
from gateway.app import GatewayServer
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import StartGateway, sample, wait_pool
from tests.gateway.discovery.recording_sink import eventually

Reply = tuple[int, CIMultiDictProxy[str], Any]


def _chat(model: str, tokens: int = 2, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": tokens,
        "ignore_eos": True,
        **extra,
    }


async def _post(server: GatewayServer, body: dict[str, Any], **headers: str) -> Reply:
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as r:
        raw = await r.read()
        return (
            r.status,
            r.headers,
            raw if r.content_type == "text/event-stream" else orjson.loads(raw),
        )


def _assert_refused(reply: Reply, status: int, code: str) -> None:
    got, headers, body = reply
    assert (got, body["error"]["code"]) == (status, code), body
    assert headers["Retry-After"] == "1"
    assert body["error"]["type"] == ("rate_limit_error" if status == 429 else "server_error")
    assert set(body["error"]) == {"message", "type", "param", "code"}


async def _starting_gateway(
    start_replicas: StartReplicas, start_gateway: StartGateway, **sections: Any
) -> tuple[SimReplica, GatewayServer]:
    """A gateway whose only replica is down (refuses connections): it stays starting."""
    (replica,) = await start_replicas(1)
    await replica.crash()
    return replica, await start_gateway([replica.url], wait_models=False, **sections)


async def _busy_gateway(
    start_replicas: StartReplicas, start_gateway: StartGateway, **sections: Any
) -> tuple[SimReplica, GatewayServer]:
    """One ready replica (20 ms steps) that takes one request at a time."""
    (replica,) = await start_replicas(1, ReplicaSettings.fast(step_s=0.02))
    server = await start_gateway(
        [replica.url], saturation={"max_inflight_per_replica": 1}, **sections
    )
    return replica, server


async def test_a_full_queue_is_503_while_starting_and_429_when_saturated(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    buffer_cfg = {"max_queued_per_model": 2, "max_wait_s": 10}
    replica, server = await _starting_gateway(start_replicas, start_gateway, buffer=buffer_cfg)
    waiting = [asyncio.create_task(_post(server, _chat(replica.model))) for _ in range(2)]
    await eventually(lambda: server.gateway.buffer.queued == 2)
    _assert_refused(await _post(server, _chat(replica.model)), 503, "queue_full")
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)

    busy, server = await _busy_gateway(start_replicas, start_gateway, buffer=buffer_cfg)
    first = asyncio.create_task(_post(server, _chat(busy.model, tokens=40)))
    queued = [asyncio.create_task(_post(server, _chat(busy.model))) for _ in range(2)]
    await eventually(lambda: server.gateway.buffer.queued == 2)
    _assert_refused(await _post(server, _chat(busy.model)), 429, "queue_full")
    assert [r[0] for r in await asyncio.gather(first, *queued)] == [200, 200, 200]
    assert sample(server, "kvgate_rejections_total", model=busy.model, reason="queue_full") == 1


async def test_the_deadline_is_503_while_starting_and_429_when_saturated(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    replica, server = await _starting_gateway(
        start_replicas, start_gateway, buffer={"max_wait_s": 0.3}
    )
    started = time.monotonic()
    _assert_refused(await _post(server, _chat(replica.model)), 503, "queue_timeout")
    assert 0.3 <= time.monotonic() - started < 1.5

    busy, server = await _busy_gateway(start_replicas, start_gateway, buffer={"max_wait_s": 0.3})
    first = asyncio.create_task(_post(server, _chat(busy.model, tokens=50)))
    await eventually(lambda: server.gateway.pool.total_inflight() == 1)
    _assert_refused(await _post(server, _chat(busy.model)), 429, "queue_timeout")
    assert (await first)[0] == 200


async def test_a_client_that_disconnects_leaves_the_queue_at_once(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    replica, server = await _starting_gateway(start_replicas, start_gateway)
    tasks = [
        asyncio.create_task(_post(server, _chat(replica.model, stream=stream)))
        for stream in (False, True)
    ]
    buffer = server.gateway.buffer
    await eventually(lambda: buffer.queued == 2)
    assert buffer.queued_by_model() == {replica.model: 2}
    tasks[0].cancel()
    await eventually(lambda: buffer.queued == 1, limit_s=0.5)
    tasks[1].cancel()
    await eventually(lambda: buffer.queued == 0, limit_s=0.5)
    await asyncio.gather(*tasks, return_exceptions=True)
    await replica.restart(listen_delay_s=0.0, load_time_s=0.0)  # nobody left to serve
    await server.gateway.catalog.refresh_once()
    assert replica.requests_seen == 0


async def test_requests_for_unknown_models(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    (ready,) = await start_replicas(1)
    server = await start_gateway([ready.url], buffer={"max_wait_s": 0.3})
    status, _, body = await _post(server, _chat("no-such-model"))
    assert (status, body["error"]["code"]) == (404, "model_not_found")  # nothing to wait for

    # Configured in models.names: a model scaled to zero is waited for, not unknown.
    server = await start_gateway(
        [ready.url], buffer={"max_wait_s": 0.3}, models={"names": ["scaled-to-zero"]}
    )
    _assert_refused(await _post(server, _chat("scaled-to-zero")), 503, "queue_timeout")

    # No replica at all: nothing is known, so any model may be coming.
    empty = await start_gateway([], buffer={"max_wait_s": 0.3})
    _assert_refused(await _post(empty, _chat("anything")), 503, "queue_timeout")


async def test_a_waiter_for_a_model_nobody_serves_gets_404_once_the_replicas_list_theirs(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    (loading,) = await start_replicas(1, ReplicaSettings.fast(load_time_s=0.5))
    server = await start_gateway(
        [loading.url], wait_models=False, health={"probe_interval_s": 0.05}
    )
    started = time.monotonic()
    unknown = asyncio.create_task(_post(server, _chat("typo")))
    known = asyncio.create_task(_post(server, _chat(loading.model)))
    status, _, body = await unknown
    assert (status, body["error"]["code"]) == (404, "model_not_found")
    assert time.monotonic() - started < 2.0  # decided when the list came, not at max_wait_s
    assert (await known)[0] == 200


async def test_buffer_off_refuses_at_once(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    off = {"max_queued_per_model": 0}
    replica, server = await _starting_gateway(start_replicas, start_gateway, buffer=off)
    _assert_refused(await _post(server, _chat(replica.model)), 503, "no_replica")
    busy, server = await _busy_gateway(start_replicas, start_gateway, buffer=off)
    first = asyncio.create_task(_post(server, _chat(busy.model, tokens=30)))
    await eventually(lambda: server.gateway.pool.total_inflight() == 1)
    _assert_refused(await _post(server, _chat(busy.model)), 429, "queue_full")
    assert (await first)[0] == 200


async def test_priority_classes_order_the_queue_and_sheddable_requests_go_first(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    busy, server = await _busy_gateway(
        start_replicas, start_gateway, buffer={"max_queued_per_model": 2}
    )
    buffer, m = server.gateway.buffer, busy.model
    done: list[str] = []

    async def post(name: str, priority: str | None, tokens: int = 2) -> Reply:
        reply = await _post(
            server, _chat(m, tokens), **({"x-kvgate-priority": priority} if priority else {})
        )
        done.append(name)
        return reply

    first = asyncio.create_task(post("first", None, tokens=25))
    await eventually(lambda: server.gateway.pool.total_inflight() == 1)
    s1 = asyncio.create_task(post("sheddable-1", "sheddable"))
    await eventually(lambda: buffer.queued == 1)
    s2 = asyncio.create_task(post("sheddable-2", "Sheddable"))  # class names: any case
    await eventually(lambda: buffer.queued == 2)
    critical = asyncio.create_task(post("critical", "critical"))
    _assert_refused(await s2, 429, "request_shed")  # the newest of the lowest class
    results = await asyncio.gather(first, critical, s1)
    assert [r[0] for r in results] == [200, 200, 200]
    assert done == ["sheddable-2", "first", "critical", "sheddable-1"]

    status, _, body = await _post(server, _chat(m), **{"x-kvgate-priority": "urgent"})
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    assert "critical, sheddable, standard" in body["error"]["message"]


async def _sse(
    server: GatewayServer, body: dict[str, Any]
) -> tuple[int, str, list[tuple[float, str]]]:
    """Status, content type and (arrival time, event) of every SSE event or comment."""
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    events: list[tuple[float, str]] = []
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
        buf = b""
        async for chunk in resp.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                events.append((time.monotonic(), event.decode()))
        return resp.status, resp.headers.get("Content-Type", ""), events


async def test_streaming_waiters_get_keep_alives_on_schedule_then_tokens(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    (loading,) = await start_replicas(1, ReplicaSettings.fast(load_time_s=1.0))
    server = await start_gateway(
        [loading.url],
        wait_models=False,
        buffer={"keepalive_interval_s": 0.2},
        health={"probe_interval_s": 0.05, "probe_max_interval_s": 0.1},
    )
    started = time.monotonic()
    status, ctype, events = await _sse(server, _chat(loading.model, tokens=3, stream=True))
    assert (status, ctype.split(";")[0]) == (200, "text/event-stream")
    keepalives = [t for t, e in events if e == ": keep-alive"]
    data = [e for _, e in events if e.startswith("data:")]
    assert data[-1] == "data: [DONE]" and len(data) >= 4  # role, 3 tokens..., [DONE]
    assert events[: len(keepalives)] == [(t, ": keep-alive") for t in keepalives]  # all first
    # Loosely on schedule: the first after one interval, then one per interval, ~1 s of load.
    assert 0.15 <= keepalives[0] - started <= 0.5
    gaps = [b - a for a, b in itertools.pairwise(keepalives)]
    assert 3 <= len(keepalives) <= 7 and all(0.1 <= g <= 0.45 for g in gaps), gaps


async def test_a_committed_stream_reports_a_refusal_as_an_sse_error_event(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    replica, server = await _starting_gateway(
        start_replicas,
        start_gateway,
        buffer={"keepalive_interval_s": 0.1, "max_wait_s": 0.45},
    )
    status, _, events = await _sse(server, _chat(replica.model, stream=True))
    assert status == 200
    kinds = [e for _, e in events]
    assert kinds[:-1] == [": keep-alive"] * (len(kinds) - 1) and len(kinds) >= 4
    assert kinds[-1].startswith("data: ")
    error = orjson.loads(kinds[-1][len("data: ") :])["error"]
    assert error["code"] == "queue_timeout"
    m = replica.model  # never listed nor configured: its metric label is "unknown"
    assert sample(server, "kvgate_rejections_total", model="unknown", reason="queue_timeout") == 1
    # A non-streaming request cannot be committed early: it gets the plain 503.
    _assert_refused(await _post(server, _chat(m)), 503, "queue_timeout")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_a_request_that_waited_goes_to_the_first_replica_ready(
    start_replicas: StartReplicas, start_gateway: StartGateway, stream: bool
) -> None:
    slow, fast = await start_replicas(
        2, ReplicaSettings.fast(listen_delay_s=0.3, load_time_s=0.2), seed=3
    )
    await slow.restart(listen_delay_s=5.0, load_time_s=0.0)  # will not be up in this test
    server = await start_gateway(
        [slow.url, fast.url], wait_models=False, health={"probe_interval_s": 0.05}
    )
    pool = server.gateway.pool
    reply = await _post(server, _chat(fast.model, stream=stream))
    assert reply[0] == 200
    assert fast.requests_finished == 1 and slow.requests_seen == 0
    await wait_pool(pool, lambda: sum(pool.state(r).phase == "ready" for r in pool.ids()) == 1)
