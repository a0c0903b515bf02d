"""The API port's HTTP/1.1 server (``gateway/http_server.py``) at the protocol level: exact bytes
over real sockets to a real gateway in front of a simulated replica. What the other suites
cover through HTTP clients (bad input, faults, shutdown) is not repeated here; this is what
only a hand-written client sends: pipelining, ``Expect: 100-continue``, HTTP/1.0, absolute
targets, Upgrade headers, oversized heads, and keep-alive reuse."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from benchmarks.sim.server import SimReplica
from gateway.app import GatewayServer
from gateway.http_server import MAX_HEADERS
from gateway.log import AccessRecord
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import StartGateway, sample
from tests.gateway.raw_http import raw_request

CHAT = "/v1/chat/completions"


@pytest.fixture
async def sim(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> tuple[SimReplica, GatewayServer]:
    (replica,) = await start_replicas(1)
    return replica, await start_gateway([replica.url])


def _chat(model: str, *, stream: bool = False, version: str = "1.1", extra: str = "") -> bytes:
    body = orjson.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "ignore_eos": True,
            "stream": stream,
        }
    )
    head = (
        f"POST {CHAT} HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response off a kept-alive connection: Content-Length or chunked framing."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, headers, body
            body += chunk[:-2]
    return status, headers, await reader.read()  # close-delimited


async def test_pipelined_requests_are_answered_in_order_on_one_connection(
    sim: tuple[SimReplica, GatewayServer],
) -> None:
    replica, server = sim
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        # Three requests in one write: a stream, a 404 and a plain completion.
        unknown = _chat("no-such-model")
        writer.write(_chat(replica.model, stream=True) + unknown + _chat(replica.model))
        async with asyncio.timeout(5.0):
            first = await _read_response(reader)
            second = await _read_response(reader)
            third = await _read_response(reader)
    finally:
        writer.close()
    assert first[0] == 200 and first[1]["content-type"].startswith("text/event-stream")
    assert first[2].rstrip().endswith(b"data: [DONE]")
    assert second[0] == 404 and orjson.loads(second[2])["error"]["code"] == "model_not_found"
    assert third[0] == 200 and orjson.loads(third[2])["object"] == "chat.completion"
    ids = [r[1]["x-request-id"] for r in (first, second, third)]
    assert len(set(ids)) == 3


async def test_expect_100_continue_gets_the_interim_answer_then_the_response(
    sim: tuple[SimReplica, GatewayServer],
) -> None:
    replica, server = sim
    request = _chat(replica.model, extra="Expect: 100-continue\r\n")
    head, body = request.split(b"\r\n\r\n", 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(head + b"\r\n\r\n")  # the body waits for the interim response, as curl does
        async with asyncio.timeout(5.0):
            interim = await reader.readuntil(b"\r\n\r\n")
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(body)
            status, _, answer = await _read_response(reader)
    finally:
        writer.close()
    assert status == 200 and orjson.loads(answer)["usage"]["completion_tokens"] == 3


async def test_an_http_1_0_stream_is_close_delimited(
    sim: tuple[SimReplica, GatewayServer],
) -> None:
    replica, server = sim
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(_chat(replica.model, stream=True, version="1.0"))
        async with asyncio.timeout(5.0):
            status, headers, body = await _read_response(reader)
    finally:
        writer.close()
    assert status == 200
    assert "transfer-encoding" not in headers and headers["connection"] == "close"
    assert body.count(b"data: ") >= 4 and body.rstrip().endswith(b"data: [DONE]")


async def test_absolute_targets_use_only_their_path_and_upgrade_headers_are_ignored(
    sim: tuple[SimReplica, GatewayServer],
) -> None:
    replica, server = sim
    absolute = _chat(replica.model).replace(
        f"POST {CHAT}".encode(), f"POST http://elsewhere.example:1234{CHAT}".encode()
    )
    status, _ = await raw_request(server.port, absolute)
    assert status == 200  # answered by the one replica discovery knows, not "elsewhere"
    h2c = _chat(
        replica.model,
        extra="Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
    )
    status, raw = await raw_request(server.port, h2c)
    assert status == 200 and raw.startswith(b"HTTP/1.1 200")


async def test_oversized_heads_are_431_and_logged_like_any_request(
    sim: tuple[SimReplica, GatewayServer], caplog: pytest.LogCaptureFixture
) -> None:
    replica, server = sim
    many = "".join(f"X-H{i}: v\r\n" for i in range(MAX_HEADERS + 1))
    status, raw = await raw_request(server.port, _chat(replica.model, extra=many))
    assert status == 431
    body = orjson.loads(raw[raw.index(b"\r\n\r\n") + 4 :])
    assert body["error"]["code"] == "request_header_fields_too_large"
    huge = "X-Big: " + "v" * 70_000 + "\r\n"
    status, _ = await raw_request(server.port, _chat(replica.model, extra=huge))
    assert status == 431
    assert replica.requests_seen == 0
    code = "431"
    assert sample(server, "kvgate_requests_total", model="", code=code) == 2


async def test_keep_alive_reuses_the_connection_and_a_handler_without_answer_gets_500(
    sim: tuple[SimReplica, GatewayServer],
) -> None:
    replica, server = sim

    async def silent(_request: object, _rec: AccessRecord) -> None:
        return None  # a bug: no answer at all

    server.gateway.routes["/v1/embeddings"] = ("POST", silent)  # type: ignore[assignment]
    del server.gateway.fast_routes["/v1/embeddings"]  # the task path, where the handler runs
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        async with asyncio.timeout(5.0):
            for _ in range(3):
                writer.write(_chat(replica.model))
                status, headers, _ = await _read_response(reader)
                assert status == 200 and "connection" not in headers  # stays open
            writer.write(_chat(replica.model).replace(CHAT.encode(), b"/v1/embeddings"))
            status, _, body = await _read_response(reader)
    finally:
        writer.close()
    assert status == 500 and orjson.loads(body)["error"]["code"] == "internal_error"
