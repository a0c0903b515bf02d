"""The callback path (``gateway/exchange.py``) against real simulated replicas: which requests
it takes, and that whatever happens each request is released once and accounted once.

The failure modes it shares with the task path (retries, timeouts, disconnects, shutdown) are
tested on both paths by test_proxy_failures.py, test_relay_live.py, test_shutdown.py and
test_security.py (their ``fast_path`` fixture)."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import aiohttp
import orjson
import pytest

from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import StartGateway, sample, wait_pool

CHAT = "/v1/chat/completions"


@pytest.fixture(params=[True, False], ids=["callbacks", "tasks"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def _chat(model: str, *, stream: bool, max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": stream,
        **extra,
    }


def _handler_tasks() -> list[asyncio.Task[Any]]:
    """The request handler tasks alive now (``gateway/app.py``: ``handle`` or ``_serve``)."""
    names = ("handle", "_serve")
    return [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ in names]  # type: ignore[union-attr]


async def test_a_stream_with_a_free_replica_runs_without_a_handler_task(
    start_replicas: StartReplicas, start_gateway: StartGateway, fast_settings: Any, fast_path: bool
) -> None:
    (a,) = await start_replicas(1, fast_settings.with_overrides(weights_floor_s=0.01))
    server = await start_gateway([a.url])
    url = f"http://127.0.0.1:{server.port}{CHAT}"
    async with aiohttp.ClientSession() as http:
        # The first request opens the replica connection (the task path connects); the second
        # finds it idle.
        async with http.post(url, json=_chat(a.model, stream=False)) as resp:
            assert resp.status == 200
        body = _chat(a.model, stream=True, max_tokens=30, ignore_eos=True)
        async with http.post(url, json=body) as resp:
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")
            assert len(_handler_tasks()) == (0 if fast_path else 1)
            assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    pool = server.gateway.pool
    await wait_pool(pool, lambda: pool.total_inflight() == 0)
    assert sample(server, "kvgate_requests_total", model=a.model, code="200") == 2


async def test_every_outcome_is_released_once_and_logged_once(
    start_replicas: StartReplicas,
    start_gateway: StartGateway,
    fast_settings: Any,
    fast_path: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Answers whole and streamed, a client that leaves mid-stream, one that leaves before the
    first byte, and requests the callback path declines (unknown model, malformed body): the
    pool ends empty, the replica saw every abandoned request aborted, and each request has one
    access line and one count."""
    replicas = await start_replicas(2, fast_settings.with_overrides(weights_floor_s=0.01))
    server = await start_gateway([r.url for r in replicas])
    caplog.set_level(logging.INFO, logger="gateway.access")
    url = f"http://127.0.0.1:{server.port}{CHAT}"
    model = replicas[0].model
    statuses: list[int] = []
    async with aiohttp.ClientSession() as http:
        for stream in (False, True, False, True):
            async with http.post(url, json=_chat(model, stream=stream)) as resp:
                await resp.read()
                statuses.append(resp.status)
        long = _chat(model, stream=True, max_tokens=400, ignore_eos=True)
        resp = await http.post(url, json=long)
        await resp.content.readuntil(b"\n\n")
        resp.close()  # gone mid-stream
        async with http.post(url, json=_chat("no-such-model", stream=False)) as bad:
            statuses.append(bad.status)
        async with http.post(
            url, data=b"{not json", headers={"Content-Type": "application/json"}
        ) as bad:
            statuses.append(bad.status)
    slow = aiohttp.ClientTimeout(total=0.2)
    replicas[0].hang()
    replicas[1].hang()
    async with aiohttp.ClientSession(timeout=slow) as http:
        with pytest.raises(TimeoutError):  # gone before the first byte
            await http.post(url, json=_chat(model, stream=False))
    assert statuses == [200, 200, 200, 200, 404, 400]
    pool = server.gateway.pool
    await wait_pool(pool, lambda: pool.total_inflight() == 0)
    for r in replicas:
        await r.wait_for(lambda r: r.inflight_requests == 0, 2.0)
    # The stream left mid-way was aborted on its replica (a hung replica admits nothing).
    assert sum(r.requests_aborted for r in replicas) == 1
    codes = {"200": 4, "404": 1, "400": 1, "499": 2}
    for code, n in codes.items():
        label = "" if code == "400" else ("unknown" if code == "404" else model)
        assert sample(server, "kvgate_requests_total", model=label, code=code) == n, code
    server.gateway.access_log.flush()
    lines = [r for r in caplog.records if r.name == "gateway.access"]
    assert len(lines) == sum(codes.values())


async def _client(port: int, body: bytes, behaviour: str) -> None:
    """One raw HTTP/1.1 client: reads the whole answer, or leaves right after sending, or after
    the first bytes of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        await writer.drain()
        if behaviour == "whole":
            await reader.read()  # until the gateway closes after the answer
        elif behaviour == "first-bytes":
            await reader.read(1)
    finally:
        writer.close()


async def test_clients_leaving_at_random_points_leave_nothing_behind(
    start_replicas: StartReplicas,
    start_gateway: StartGateway,
    fast_settings: Any,
    fast_path: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """120 requests, streamed or not, whose clients read the whole answer, leave right after
    sending, or leave after its first bytes, 12 at a time (seeded): every request is counted
    and logged once, and the gateway and the replicas end with nothing in flight."""
    replicas = await start_replicas(3, fast_settings.with_overrides(weights_floor_s=0.005))
    server = await start_gateway([r.url for r in replicas], policy={"name": "p2c"})
    caplog.set_level(logging.INFO, logger="gateway.access")
    rng = random.Random(11)
    model = replicas[0].model
    n = 120
    plan = [
        (
            orjson.dumps(_chat(model, stream=rng.random() < 0.5, max_tokens=rng.randint(1, 40))),
            rng.choice(("whole", "whole", "sent", "first-bytes")),
        )
        for _ in range(n)
    ]
    async with asyncio.timeout(30.0):
        for wave in range(0, n, 12):
            await asyncio.gather(
                *(_client(server.port, b, how) for b, how in plan[wave : wave + 12])
            )
        pool = server.gateway.pool
        await wait_pool(pool, lambda: pool.total_inflight() == 0, 10.0)
        for r in replicas:
            await r.wait_for(lambda r: r.inflight_requests == 0, 10.0)
    for r in replicas:
        assert r.requests_admitted == r.requests_finished + r.requests_aborted
    counted = sum(
        sample(server, "kvgate_requests_total", model=model, code=code) for code in ("200", "499")
    )
    assert counted == n
    whole = sum(1 for _, how in plan if how == "whole")
    assert sample(server, "kvgate_requests_total", model=model, code="200") >= whole
    server.gateway.access_log.flush()
    assert len([r for r in caplog.records if r.name == "gateway.access"]) == n


async def test_a_bug_while_answering_is_a_logged_500_and_releases_the_replica(
    start_replicas: StartReplicas,
    start_gateway: StartGateway,
    fast_path: bool,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the task path makes of an unexpected error (its ``except Exception``), the callback
    path makes too: a 500 in the OpenAI shape, the traceback in the log, nothing left in flight."""
    (a,) = await start_replicas(1)
    server = await start_gateway([a.url])
    url = f"http://127.0.0.1:{server.port}{CHAT}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        async with http.post(url, json=_chat(a.model, stream=False)) as resp:
            assert resp.status == 200  # the replica connection is now idle: the callback path

        def broken(*_args: object) -> bool:
            raise RuntimeError("a bug")

        monkeypatch.setattr(server.gateway.proxy, "buffered_done", broken)
        caplog.set_level(logging.INFO)
        async with http.post(url, json=_chat(a.model, stream=False)) as resp:
            assert resp.status == 500
            assert (await resp.json())["error"]["code"] == "internal_error"
    pool = server.gateway.pool
    await wait_pool(pool, lambda: pool.total_inflight() == 0)
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [RuntimeError]
    assert sample(server, "kvgate_requests_total", model=a.model, code="500") == 1
