"""The replica client against real servers: the replica simulator, and small raw-socket servers
that answer with exact bytes for the framing cases no HTTP library would produce on purpose
(split chunk headers, interim 1xx answers, malformed heads, resets mid-body)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from benchmarks.sim.server import SimReplica
from gateway.errors import (
    GatewayError,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamResponseInvalid,
    UpstreamTimeout,
)
from gateway.replica_client import ReplicaClient, ReplicaResponse, build_head, target
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.raw_replica import RawFactory, answer, raw_replicas

raw = pytest.fixture(raw_replicas)


@pytest.fixture
async def client() -> AsyncIterator[ReplicaClient]:
    c = ReplicaClient(connect_timeout_s=1.0)
    yield c
    await c.close()


async def body_of(resp: ReplicaResponse) -> bytes:
    return await resp.read_rest(1 << 20)


async def post(client: ReplicaClient, url: str, timeout_s: float = 2.0) -> ReplicaResponse:
    return await client.open(
        url, "/v1/x", [("Content-Type", "application/json")], b"{}", first_byte_timeout_s=timeout_s
    )


async def test_content_length_bodies_reuse_one_connection(
    raw: RawFactory, client: ReplicaClient
) -> None:
    replica = await raw(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"))
    for _ in range(3):
        resp = await post(client, replica.url)
        assert (resp.status, resp.complete, await body_of(resp)) == (200, True, b"hello")
        resp.close()
    assert replica.connections == 1 and client.idle_count(replica.url) == 1
    head = replica.requests[0]
    assert head.startswith(b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nContent-Length: 2\r\n\r\n{}" in head


async def test_idle_connections_are_closed_after_the_idle_timeout(raw: RawFactory) -> None:
    replica = await raw(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    client = ReplicaClient(connect_timeout_s=1.0, idle_timeout_s=0.1)
    try:
        resp = await post(client, replica.url)
        assert await body_of(resp) == b"ok"
        resp.close()
        assert client.idle_count(replica.url) == 1
        # Nothing reuses it: the sweep closes it (the raw replica sees the end of the connection).
        await asyncio.wait_for(replica.closed.wait(), 2.0)
        assert client.idle_count(replica.url) == 0
        resp = await post(client, replica.url)  # and the next request opens a new one
        assert await body_of(resp) == b"ok" and replica.connections == 2
        resp.close()
    finally:
        await client.close()


async def test_chunked_body_split_anywhere_is_reassembled(
    raw: RawFactory, client: ReplicaClient
) -> None:
    wire = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    # Split into single bytes: every state boundary (size line, data, CRLF, trailer) is crossed.
    replica = await raw(answer(*(wire[i : i + 1] for i in range(len(wire))), pause_s=0.0005))
    resp = await post(client, replica.url)
    assert resp.status == 200 and resp.content_type == "text/plain"
    assert await body_of(resp) == b"hello 0123456789"
    assert resp.complete
    resp.close()
    assert client.idle_count(replica.url) == 1  # a complete chunked answer keeps the connection


async def test_close_delimited_body_ends_at_eof_and_the_connection_is_not_kept(
    raw: RawFactory, client: ReplicaClient
) -> None:
    replica = await raw(answer(b"HTTP/1.1 200 OK\r\n\r\nfirst", b" second", close=True))
    resp = await post(client, replica.url)
    assert await body_of(resp) == b"first second"
    assert client.idle_count(replica.url) == 0


async def test_interim_responses_are_skipped(raw: RawFactory, client: ReplicaClient) -> None:
    replica = await raw(
        answer(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
            b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
        )
    )
    resp = await post(client, replica.url)
    assert (resp.status, await body_of(resp)) == (201, b"ok")


async def test_empty_bodies_complete_at_once(raw: RawFactory, client: ReplicaClient) -> None:
    replica = await raw(answer(b"HTTP/1.1 204 No Content\r\n\r\n"))
    resp = await post(client, replica.url)
    assert (resp.status, resp.first, resp.complete) == (204, b"", True)
    replica2 = await raw(
        answer(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    )
    resp = await post(client, replica2.url)
    assert (resp.status, resp.complete, client.idle_count(replica2.url)) == (503, True, 0)


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
)
async def test_malformed_heads_are_protocol_errors(
    wire: bytes, raw: RawFactory, client: ReplicaClient
) -> None:
    replica = await raw(answer(wire))
    with pytest.raises(UpstreamResponseInvalid):
        await post(client, replica.url)
    await asyncio.wait_for(replica.closed.wait(), 2.0)  # the client dropped the connection


async def test_malformed_framing_after_the_first_byte_breaks_the_body(
    raw: RawFactory, client: ReplicaClient
) -> None:
    replica = await raw(
        answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
            b"3\r\nabcXY",
            pause_s=0.01,
        )
    )
    resp = await post(client, replica.url)
    assert resp.first == b"abc"
    with pytest.raises(UpstreamDisconnected):
        await body_of(resp)


async def test_reset_mid_body_is_a_disconnect(raw: RawFactory, client: ReplicaClient) -> None:
    replica = await raw(
        answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", close=True)
    )
    resp = await post(client, replica.url)
    assert resp.first == b"partial"
    with pytest.raises(UpstreamDisconnected):
        await resp.next_chunk()
    assert client.idle_count(replica.url) == 0


async def test_closed_before_answering_is_a_disconnect(
    raw: RawFactory, client: ReplicaClient
) -> None:
    replica = await raw(answer(close=True))
    with pytest.raises(UpstreamDisconnected):
        await post(client, replica.url)


async def test_first_byte_timeout_aborts_the_request(
    raw: RawFactory, client: ReplicaClient
) -> None:
    # The head alone is not the first byte: the timeout covers the first body byte too.
    replica = await raw(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"))
    with pytest.raises(UpstreamTimeout, match=r"0\.2 s"):
        await post(client, replica.url, timeout_s=0.2)
    await asyncio.wait_for(replica.closed.wait(), 2.0)


async def test_cancelled_waiter_aborts_the_request(raw: RawFactory, client: ReplicaClient) -> None:
    replica = await raw(answer())  # never answers
    task = asyncio.create_task(post(client, replica.url, timeout_s=30.0))
    await asyncio.wait_for(replica.received.wait(), 2.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(replica.closed.wait(), 2.0)


async def test_closing_an_unfinished_response_aborts_its_connection(
    raw: RawFactory, client: ReplicaClient
) -> None:
    replica = await raw(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome"))
    resp = await post(client, replica.url)
    resp.close()
    await asyncio.wait_for(replica.closed.wait(), 2.0)
    assert client.idle_count(replica.url) == 0


async def test_connect_refused_is_a_connect_error(client: ReplicaClient) -> None:
    with pytest.raises(UpstreamConnectError):
        await post(client, "http://127.0.0.1:1")


def test_heads_are_built_once_and_refuse_injection() -> None:
    head = build_head("POST", "/v1/x?a=1", "h:1", [("A", "b"), ("X-Y", "é")], 7)
    assert head == (
        b"POST /v1/x?a=1 HTTP/1.1\r\nHost: h:1\r\nA: b\r\nX-Y: \xc3\xa9\r\n"
        b"Content-Length: 7\r\n\r\n"
    )
    for bad in [("A", "b\r\nEvil: 1"), ("A\nB", "c"), ("A", "b\rc")]:
        with pytest.raises(ValueError):
            build_head("POST", "/", "h", [bad], 0)
    assert target("http://r:8000/prefix/").prefix == "/prefix"
    assert target("http://r/").host_header == "r" and target("https://r").port == 443


async def test_against_the_simulator_streaming_and_not(
    start_replicas: StartReplicas, client: ReplicaClient
) -> None:
    sim_replica: SimReplica
    (sim_replica,) = await start_replicas(1)
    for stream in (False, True):
        payload = {
            "model": sim_replica.model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "stream": stream,
        }
        resp = await client.open(
            sim_replica.url,
            "/v1/chat/completions",
            [("Content-Type", "application/json")],
            orjson.dumps(payload),
            first_byte_timeout_s=5.0,
        )
        body = await body_of(resp)
        resp.close()
        assert resp.status == 200
        if stream:
            assert resp.content_type == "text/event-stream"
            assert body.rstrip().endswith(b"data: [DONE]")
        else:
            assert orjson.loads(body)["usage"]["completion_tokens"] == 5
    assert client.idle_count(sim_replica.url) == 1  # both on one kept-alive connection


class Collect:
    """A BodySink that records what it is given."""

    def __init__(self) -> None:
        self.pieces: list[tuple[bytes, bytes | None]] = []
        self.outcome: asyncio.Future[GatewayError | None] = (
            asyncio.get_running_loop().create_future()
        )

    def body(self, payload: bytes, framed: bytes | None) -> None:
        self.pieces.append((payload, framed))

    def end(self) -> None:
        self.outcome.set_result(None)

    def fail(self, error: GatewayError) -> None:
        self.outcome.set_result(error)


async def test_relay_mode_hands_whole_chunks_with_their_framing(
    raw: RawFactory, client: ReplicaClient
) -> None:
    gate = asyncio.Event()
    replica = await raw(
        answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab\n\n\r\n",
            b"4\r\ncd\n\n\r\n",
            b"2\r\nef\r\n3",  # a chunk and half a size line: re-parsed, no framing given
            b"\r\ngh\n\r\n",
            b"4\r\nij\n\n\r\n4\r\nkl\n\n\r\n0\r\n\r\n",  # whole chunks and the end at once
            pause_s=0.01,
            gate=gate,
        )
    )
    resp = await post(client, replica.url)
    assert resp.first == b"ab\n\n"
    sink = Collect()
    resp.relay_to(sink)
    gate.set()
    assert await asyncio.wait_for(sink.outcome, 2.0) is None
    assert sink.pieces[0] == (b"cd\n\n", b"4\r\ncd\n\n\r\n")
    assert sink.pieces[-1] == (b"ij\n\nkl\n\n", b"4\r\nij\n\n\r\n4\r\nkl\n\n\r\n")
    assert b"".join(p for p, _ in sink.pieces) == b"cd\n\nefgh\nij\n\nkl\n\n"
    assert all(f is None for _, f in sink.pieces[1:-1])
    assert client.idle_count(replica.url) == 1


async def test_relay_mode_reports_a_reset_as_a_failure(
    raw: RawFactory, client: ReplicaClient
) -> None:
    replica = await raw(
        answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab\n\n\r\n",
            b"4\r\ncd",
            close=True,
            pause_s=0.01,
        )
    )
    resp = await post(client, replica.url)
    sink = Collect()
    resp.relay_to(sink)
    assert isinstance(await asyncio.wait_for(sink.outcome, 2.0), UpstreamDisconnected)
