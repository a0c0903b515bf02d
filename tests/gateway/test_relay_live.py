"""The gateway's streaming path end to end over exact bytes: a raw replica paces its SSE events
one chunk per read (so every event crosses the transport-level relay on its own), and raw
clients read exactly what the gateway wrote — chunked for HTTP/1.1, close-delimited for 1.0."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
import pytest

from gateway.app import GatewayServer
from tests.gateway.conftest import StartGateway, sample
from tests.gateway.raw_replica import RawFactory, Script, raw_replicas
from tests.gateway.scripted_replica import vllm_page


@pytest.fixture(params=[True, False], ids=["callbacks", "tasks"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    """Every test here runs on both request paths: the callback path and the task path."""
    return bool(request.param)


raw = pytest.fixture(raw_replicas)

MODELS = orjson.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]})
CHAT = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "x"}]}'


def event(i: int) -> bytes:
    return b'data: {"choices": [{"delta": {"content": "t%d"}}]}\n\n' % i


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def replica_script(stream: Callable[[asyncio.StreamWriter], object]) -> Script:
    """A replica: models, metrics and health answered at once; generation by ``stream``."""

    async def script(request: bytes, writer: asyncio.StreamWriter) -> None:
        line = request.split(b"\r\n", 1)[0]
        if line.startswith(b"POST "):
            await stream(writer)  # type: ignore[misc]
            return
        body = MODELS if b"/v1/models" in line else vllm_page() if b"/metrics" in line else b""
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    return script


def sse_stream(n: int, *, tail: bytes = b"0\r\n\r\n", cut: bytes = b"") -> Callable[..., object]:
    async def stream(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: keep-alive\r\n"
            b"Keep-Alive: timeout=5\r\nX-Engine: sim\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for i in range(n):
            writer.write(chunk(event(i)))
            await writer.drain()
            await asyncio.sleep(0.002)  # pacing: one event per read on the gateway's side
        if cut:
            writer.write(cut)
            await writer.drain()
            writer.transport.abort()
            return
        writer.write(tail)

    return stream


async def exchange(port: int, head: bytes) -> bytes:
    """Send a request, read until the gateway ends the response (chunked end or close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + CHAT)
    out = b""
    try:
        async with asyncio.timeout(5.0):
            while not out.endswith(b"\r\n0\r\n\r\n"):
                data = await reader.read(65536)
                if not data:
                    break
                out += data
    finally:
        writer.close()
    return out


def request_head(version: bytes = b"1.1") -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/%s\r\nHost: g\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (version, len(CHAT))
    )


def dechunk(body: bytes) -> list[bytes]:
    out = []
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            assert rest == b"\r\n"
            return out
        out.append(rest[:n])
        assert rest[n : n + 2] == b"\r\n"
        body = rest[n + 2 :]
    raise AssertionError("no terminating chunk")


async def start(raw: RawFactory, start_gateway: StartGateway, script: Script) -> GatewayServer:
    replica = await raw(script)
    return await start_gateway([replica.url])


async def test_paced_events_reach_a_chunked_client_whole_and_accounted(
    raw: RawFactory, start_gateway: StartGateway
) -> None:
    events = [event(i) for i in range(30)] + [b"data: [DONE]\n\n"]

    async def stream(writer: asyncio.StreamWriter) -> None:
        await sse_stream(30, tail=chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")(writer)  # type: ignore[misc]

    server = await start(raw, start_gateway, replica_script(stream))
    out = await exchange(server.port, request_head())
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    lower = head.lower()
    assert b"x-request-id: " in lower and b"x-engine: sim" in lower
    assert b"keep-alive:" not in lower and b"connection: keep-alive" not in lower
    assert b"".join(dechunk(body)) == b"".join(events)
    # 30 content events, less the chat role chunk the estimate assumes: no usage was sent.
    # (Accounted right after the last write, before the loop could run the client's read.)
    assert sample(server, "kvgate_generation_tokens_total", model="m") == 29
    assert sample(server, "kvgate_time_to_first_token_seconds_count", model="m") == 1


async def test_an_http_1_0_client_gets_the_bytes_until_close(
    raw: RawFactory, start_gateway: StartGateway
) -> None:
    server = await start(raw, start_gateway, replica_script(sse_stream(10)))
    out = await exchange(server.port, request_head(b"1.0"))
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert body == b"".join(event(i) for i in range(10))


async def test_a_replica_reset_mid_event_ends_with_one_error_event_and_no_done(
    raw: RawFactory, start_gateway: StartGateway
) -> None:
    # Twelve whole events, then half of the next one and the connection is reset.
    cut = chunk(b'data: {"choices": [{"del')
    server = await start(raw, start_gateway, replica_script(sse_stream(12, cut=cut)))
    out = await exchange(server.port, request_head())
    pieces = dechunk(out.partition(b"\r\n\r\n")[2])
    text = b"".join(pieces)
    assert text.startswith(b"".join(event(i) for i in range(12)))
    rest = text[len(b"".join(event(i) for i in range(12))) :]
    assert rest.startswith(b"data: {") and rest.endswith(b"\n\n") and rest.count(b"\n\n") == 1
    assert orjson.loads(rest[len(b"data: ") :])["error"]["code"] == "upstream_disconnected"
    assert b"[DONE]" not in text
    assert sample(server, "kvgate_upstream_errors_total", reason="disconnect") == 1
