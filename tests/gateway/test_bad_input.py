"""Bad input from clients: each gets the right status in the OpenAI error shape, reaches no
replica unless the replica is the one to judge it, and leaves nothing behind (no in-flight
count, no task, a gateway that still serves).

What the gateway decides itself: JSON syntax and type (400), ``model``/``stream`` types (400),
unknown model (404), body size (413, before reading it whole), media type (415), body and
header read timeouts (408 / connection closed), paths (404/405). What it passes through: the
rest of the request schema (``messages``, ``max_tokens``...), judged by the replica, whose
answer comes back unchanged. Malformed HTTP (bare CR in a header, smuggling attempts) is
refused by aiohttp's parser with a plain 400 before any handler runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from benchmarks.sim.server import SimReplica
from gateway.app import GatewayServer
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import StartGateway
from tests.gateway.raw_http import raw_request
from tests.gateway.scripted_replica import StartScripted, scripted_replicas

CHAT = "/v1/chat/completions"


@pytest.fixture
async def start_scripted() -> AsyncIterator[StartScripted]:
    async with scripted_replicas() as start:
        yield start


@pytest.fixture
async def sim(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> tuple[SimReplica, GatewayServer]:
    (replica,) = await start_replicas(1)
    server = await start_gateway(
        [replica.url],
        listen={"host": "127.0.0.1", "port": 0, "header_timeout_s": 0.3, "body_timeout_s": 0.3},
        upstream={"max_body_bytes": 512 * 1024},
    )
    return replica, server


async def _send(
    server: GatewayServer, data: bytes | None = None, *, path: str = CHAT, **kwargs: Any
) -> tuple[int, Any]:
    headers = kwargs.pop("headers", {"Content-Type": "application/json"})
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{server.port}{path}", data=data, headers=headers, **kwargs
        ) as resp,
    ):
        raw = await resp.read()
        return resp.status, raw


def _error(raw: bytes) -> dict[str, Any]:
    import orjson

    body = orjson.loads(raw)
    err = body["error"]
    assert set(err) >= {"message", "type", "code"}, body
    return dict(err)


def _settled(replica: SimReplica, server: GatewayServer) -> None:
    assert server.gateway.pool.total_inflight() == 0
    assert replica.inflight_requests == 0


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"", 400, "invalid_json"),
        (b"{", 400, "invalid_json"),
        (b'{"model": "m",}', 400, "invalid_json"),
        (b"\xff\xfe{}", 400, "invalid_json"),  # not UTF-8
        (b'{"model": "\xc3\x28"}', 400, "invalid_json"),  # invalid UTF-8 inside a string
        (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),  # nested beyond any sane depth
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, 400, "invalid_json"),
        (b"[]", 400, "invalid_request"),
        (b'[{"model": "m"}]', 400, "invalid_request"),
        (b"1", 400, "invalid_request"),
        (b'"text"', 400, "invalid_request"),
        (b"null", 400, "invalid_request"),
        (b"true", 400, "invalid_request"),
        (b'{"model": 1}', 400, "invalid_request"),
        (b'{"model": ""}', 400, "invalid_request"),
        (b'{"model": ["m"]}', 400, "invalid_request"),
        (b'{"model": {"name": "m"}}', 400, "invalid_request"),
        (b'{"model": "MODEL", "stream": "yes"}', 400, "invalid_request"),
        (b'{"model": "MODEL", "stream": 1}', 400, "invalid_request"),
        (b'{"model": "MODEL", "stream": {}}', 400, "invalid_request"),
        (b'{"model": "no-such-model", "messages": []}', 404, "model_not_found"),
    ],
    ids=lambda v: repr(v)[:40] if isinstance(v, bytes) else None,
)
async def test_malformed_bodies_are_refused_by_the_gateway(
    sim: tuple[SimReplica, GatewayServer], body: bytes, status: int, code: str
) -> None:
    replica, server = sim
    got, raw = await _send(server, body.replace(b"MODEL", replica.model.encode()))
    assert got == status
    err = _error(raw)
    assert err["code"] == code
    assert err["type"] == "invalid_request_error"
    assert replica.requests_seen == 0  # never forwarded
    _settled(replica, server)


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": "hello"},
        {"messages": 1},
        {"messages": [1, 2]},
        {"messages": [{"role": 1, "content": "x"}]},
        {"messages": []},
        {"max_tokens": 10**12},
        {"max_tokens": -1},
        {"max_tokens": "lots"},
        {"max_tokens": 1e308},
    ],
)
async def test_schema_errors_are_judged_by_the_replica_and_returned_unchanged(
    sim: tuple[SimReplica, GatewayServer], fields: dict[str, Any]
) -> None:
    replica, server = sim
    body = {"model": replica.model, "messages": [{"role": "user", "content": "hi"}], **fields}
    async with aiohttp.ClientSession() as http, http.post(replica.url + CHAT, json=body) as resp:
        direct = (resp.status, await resp.read())
    got = await _send(server, None, json=body, headers={})
    assert direct[0] == 400
    assert got == direct  # the replica's status and body, byte for byte
    assert replica.requests_seen == 2
    _settled(replica, server)


async def test_wrong_media_type_is_415(sim: tuple[SimReplica, GatewayServer]) -> None:
    replica, server = sim
    status, raw = await _send(server, b"{}", headers={"Content-Type": "text/plain"})
    assert status == 415 and _error(raw)["code"] == "unsupported_media_type"
    assert replica.requests_seen == 0


async def test_a_declared_huge_body_is_refused_before_it_is_read(
    sim: tuple[SimReplica, GatewayServer],
) -> None:
    replica, server = sim
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {1 << 40}\r\n\r\n"
    ).encode()
    # Only 16 bytes of the declared terabyte are sent: the 413 cannot wait for the rest.
    status, raw = await raw_request(server.port, head + b'{"model": "m", "')
    assert status == 413
    assert b'"request_too_large"' in raw
    assert replica.requests_seen == 0


async def test_a_chunked_body_over_the_limit_is_refused_while_still_arriving(
    sim: tuple[SimReplica, GatewayServer],
) -> None:
    replica, server = sim
    limit = server.cfg.upstream.max_body_bytes
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        piece = b"x" * 8192
        for _ in range(limit // len(piece) + 1):  # one chunk past the limit, then stop sending
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        await writer.drain()
        async with asyncio.timeout(2.0):  # no terminating chunk: the body never ends
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 413")
    assert replica.requests_seen == 0
    _settled(replica, server)


async def test_slow_loris_headers_are_cut_off(sim: tuple[SimReplica, GatewayServer]) -> None:
    _, server = sim
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n".encode())

        async def trickle() -> None:
            for i in range(100):  # one header line every 50 ms, never the blank line
                writer.write(f"X-Slow-{i}: y\r\n".encode())
                await asyncio.sleep(0.05)

        dripping = asyncio.create_task(trickle())
        async with asyncio.timeout(3.0):  # header_timeout_s is 0.3 s; 100 lines take 5 s
            assert await reader.read() == b""  # closed by the gateway, no response
        dripping.cancel()
    finally:
        writer.close()
    # An idle connection that never sends a byte is closed the same way.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    async with asyncio.timeout(3.0):
        assert await reader.read() == b""
    writer.close()


async def test_slow_loris_bodies_get_408(sim: tuple[SimReplica, GatewayServer]) -> None:
    replica, server = sim
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 200\r\n\r\n"
    ).encode()
    status, raw = await raw_request(server.port, head + b'{"model": ', limit_s=3.0)
    assert status == 408
    assert _error(raw[raw.index(b"\r\n\r\n") + 4 :])["code"] == "request_timeout"
    assert replica.requests_seen == 0
    _settled(replica, server)


async def test_paths_outside_the_api_are_404_and_never_forwarded(
    start_scripted: StartScripted, start_gateway: StartGateway
) -> None:
    (replica,) = await start_scripted(1)
    server = await start_gateway([replica.url])
    body = b'{"model": "m"}'
    for method, path in [
        ("POST", "/v1/files"),
        ("POST", "/v1/audio/transcriptions"),
        ("POST", "/v1/chat/completions/extra"),
        ("POST", "/v1/chat/completions/"),
        ("POST", "/v2/chat/completions"),
        ("POST", "/chat/completions"),
        ("GET", "/metrics"),
        ("GET", "/health"),
        ("POST", "/sim/control"),
        ("DELETE", "/v1/models"),
        ("GET", "/v1/chat/completions"),
        ("PUT", "/v1/completions"),
    ]:
        status, raw = await raw_request(server.port, _raw(method, path, body))
        assert status in (404, 405), (method, path, status)
        err = _error(raw[raw.index(b"\r\n\r\n") + 4 :])
        assert err["code"] in ("not_found", "method_not_allowed")
    assert replica.paths() == []


def _raw(method: str, target: str, body: bytes = b"", *headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *headers]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\nConnection: close\r\n\r\n").encode() + body


@pytest.mark.parametrize(
    "header",
    [
        b"X-Injected: a\rSet-Cookie: b",  # a bare CR inside a value
        b"X-Injected: a\x00b",  # NUL
        b"X-Injected: a\r\n Set-Cookie: b",  # obsolete line folding
        b"X Bad Name: a",  # whitespace in a field name
        b"Transfer-Encoding: chunked\r\nContent-Length: 5",  # a smuggling attempt
        b"Content-Length: 5\r\nContent-Length: 6",
    ],
)
async def test_header_injection_and_smuggling_attempts_are_refused(
    start_scripted: StartScripted, start_gateway: StartGateway, header: bytes
) -> None:
    (replica,) = await start_scripted(1)
    server = await start_gateway([replica.url])
    body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}'
    request = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
        + header
        + f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    status, _ = await raw_request(server.port, request)
    assert status == 400
    assert replica.generation_requests() == []
    ok, _ = await raw_request(server.port, _raw("POST", CHAT, body))
    assert ok == 200  # the gateway is unharmed


@pytest.mark.parametrize(
    "given",
    ["<script>alert(1)</script>", "x" * 129, "a b", "é", "a;b=c", "../../etc", ""],
)
async def test_junk_request_ids_are_replaced(
    start_scripted: StartScripted, start_gateway: StartGateway, given: str
) -> None:
    (replica,) = await start_scripted(1)
    server = await start_gateway([replica.url])
    body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}'
    header = f"x-request-id: {given}".encode().decode("latin-1")
    status, raw = await raw_request(server.port, _raw("POST", CHAT, body, header))
    assert status == 200
    sent = _header(raw, b"x-request-id")
    assert sent != given.encode() and len(sent) == 32 and sent.isalnum()
    (seen,) = replica.generation_requests()
    assert seen.headers["x-request-id"] == sent.decode()  # the replica gets the same, clean id


def _header(raw: bytes, name: bytes) -> bytes:
    for line in raw[: raw.index(b"\r\n\r\n")].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    raise AssertionError(f"no {name!r} header")


async def test_after_all_that_nothing_leaked(
    sim: tuple[SimReplica, GatewayServer],
) -> None:
    replica, server = sim
    bodies = [b"", b"[", b"1", b'{"model": 1}', b'{"model": "nope"}', b"\xff" * 10]
    await asyncio.gather(*(_send(server, b) for b in bodies * 20))
    status, _ = await _send(
        server,
        None,
        json={"model": replica.model, "messages": [{"role": "user", "content": "x"}]},
        headers={},
    )
    assert status == 200
    _settled(replica, server)
    assert server.gateway.buffer.queued == 0
