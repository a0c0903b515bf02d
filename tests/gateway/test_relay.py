"""The SSE relay between two real sockets: a raw replica (exact chunked bytes) on one side, a
loopback peer standing in for the client on the other, with the replica client in between."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import cast

import pytest

from gateway.errors import GatewayError, UpstreamDisconnected
from gateway.relay import SseRelay
from gateway.replica_client import ReplicaClient, ReplicaResponse
from tests.gateway.raw_replica import RawFactory, RawReplica, answer, raw_replicas

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(i: int) -> bytes:
    return b'data: {"i": %d}\n\n' % i


def dechunk(wire: bytes) -> bytes:
    """The payload of the whole chunks in ``wire`` (chunk sizes are the relay's own business:
    a read holding several chunks, or part of one, is re-framed as one chunk)."""
    out, pos = bytearray(), 0
    while (at := wire.find(b"\r\n", pos)) > 0:
        size = int(wire[pos:at], 16)
        end = at + 2 + size
        if size == 0 or len(wire) < end + 2:
            break
        out += wire[at + 2 : end]
        pos = end + 2
    return bytes(out)


@dataclass
class Peer(asyncio.Protocol):
    """The client end: collects what the gateway wrote; can stop reading to apply backpressure."""

    received: bytearray = field(default_factory=bytearray)
    transport: asyncio.Transport | None = None
    grew: asyncio.Event = field(default_factory=asyncio.Event)
    lost: asyncio.Event = field(default_factory=asyncio.Event)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received += data
        self.grew.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()

    async def wait_for(self, size: int) -> None:
        async with asyncio.timeout(3.0):
            while len(self.received) < size:
                self.grew.clear()
                await self.grew.wait()


class Sender(asyncio.Protocol):
    """The gateway's side of the client connection: the transport the relay writes to."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.paused = asyncio.Event()
        self.on_writable: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def pause_writing(self) -> None:
        self.paused.set()
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()
        if self.on_writable is not None:  # as the client connection tells the callback path
            self.on_writable()

    async def drain(self) -> None:
        await self.writable.wait()


@pytest.fixture
async def link() -> AsyncIterator[tuple[Sender, Peer]]:
    """A loopback connection: (the gateway's sending side, the client's receiving side)."""
    peers: list[Peer] = []
    accepted = asyncio.Event()

    def accept() -> Peer:
        peers.append(Peer())
        accepted.set()
        return peers[-1]

    loop = asyncio.get_running_loop()
    server = await loop.create_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, sender = await loop.create_connection(Sender, "127.0.0.1", port)
    await asyncio.wait_for(accepted.wait(), 2.0)
    yield sender, peers[0]
    assert sender.transport is not None
    sender.transport.abort()
    server.close()


raw = pytest.fixture(raw_replicas)


@pytest.fixture
async def client() -> AsyncIterator[ReplicaClient]:
    c = ReplicaClient(connect_timeout_s=1.0)
    yield c
    await c.close()


async def open_stream(client: ReplicaClient, replica: RawReplica) -> ReplicaResponse:
    return await client.open(replica.url, "/v1/chat/completions", [], b"{}", first_byte_timeout_s=2)


def relay_for(resp: ReplicaResponse, sender: Sender, *, chunked: bool = True) -> SseRelay:
    assert sender.transport is not None
    relay = SseRelay(sender.transport, chunked=chunked, source=resp)
    first = relay.take_first(resp.first)
    if first:  # what the proxy writes with the response head
        sender.transport.write(chunk(first) if chunked else first)
    resp.relay_to(relay)
    return relay


async def test_whole_event_chunks_pass_through_byte_for_byte(
    raw: RawFactory, client: ReplicaClient, link: tuple[Sender, Peer]
) -> None:
    sender, peer = link
    chunks = [chunk(event(i)) for i in range(20)] + [chunk(b"data: [DONE]\n\n")]
    replica = await raw(answer(HEAD + chunks[0], *chunks[1:], b"0\r\n\r\n", pause_s=0.002))
    resp = await open_stream(client, replica)
    relay = relay_for(resp, sender)
    assert await asyncio.wait_for(relay.run(sender.drain), 3.0) is None
    await peer.wait_for(len(b"".join(chunks)))
    assert bytes(peer.received) == b"".join(chunks)
    assert relay.newlines == 2 * 21 and relay.last == b"data: [DONE]\n\n"
    assert relay.before == event(19)
    assert client.idle_count(replica.url) == 1  # the replica connection is kept for reuse


async def test_split_events_are_held_back_until_whole(
    raw: RawFactory, client: ReplicaClient, link: tuple[Sender, Peer]
) -> None:
    sender, peer = link
    stream = b"".join(event(i) for i in range(6)) + b"data: tail-without-blank-line"
    pieces = [stream[i : i + 7] for i in range(0, len(stream), 7)]  # events cut anywhere
    replica = await raw(
        answer(HEAD + chunk(pieces[0]), *map(chunk, pieces[1:]), b"0\r\n\r\n", pause_s=0.002)
    )
    resp = await open_stream(client, replica)
    relay = relay_for(resp, sender)
    assert await asyncio.wait_for(relay.run(sender.drain), 3.0) is None
    await peer.wait_for(len(stream))
    out = decode_chunked(bytes(peer.received))
    assert b"".join(out) == stream
    # Every chunk the client got holds whole events, except the unterminated tail at the end.
    assert all(c.endswith(b"\n\n") for c in out[:-1]) and out[-1].endswith(b"blank-line")
    assert relay.newlines == stream.count(b"\n")


async def test_a_reset_mid_stream_reports_the_error_and_drops_the_partial_event(
    raw: RawFactory, client: ReplicaClient, link: tuple[Sender, Peer]
) -> None:
    sender, peer = link
    replica = await raw(
        answer(
            HEAD + chunk(event(0)),
            chunk(event(1) + b'data: {"half'),
            b"5\r\nab",  # and the connection drops inside a chunk
            close=True,
            pause_s=0.01,
        )
    )
    resp = await open_stream(client, replica)
    relay = relay_for(resp, sender)
    error = await asyncio.wait_for(relay.run(sender.drain), 3.0)
    assert isinstance(error, UpstreamDisconnected)
    await peer.wait_for(len(chunk(event(0))) + len(chunk(event(1))))
    assert decode_chunked(bytes(peer.received)) == [event(0), event(1)]


async def test_backpressure_pauses_the_replica_and_resumes_it(
    raw: RawFactory, client: ReplicaClient, link: tuple[Sender, Peer]
) -> None:
    sender, peer = link
    big = b"data: " + b"x" * 60_000 + b"\n\n"
    n = 80  # ~4.8 MB: far beyond every socket buffer on the way
    replica = await raw(answer(HEAD + chunk(big), *[chunk(big)] * (n - 1), b"0\r\n\r\n"))
    assert peer.transport is not None and sender.transport is not None
    peer.transport.pause_reading()  # a client that stops reading
    resp = await open_stream(client, replica)
    relay = relay_for(resp, sender)
    run = asyncio.create_task(relay.run(sender.drain))
    await asyncio.wait_for(sender.paused.wait(), 3.0)
    buffered = sender.transport.get_write_buffer_size()
    assert not run.done()
    # Bounded: the high-water mark plus what one replica read can add, not the whole stream.
    assert buffered < 1_000_000
    peer.transport.resume_reading()
    assert await asyncio.wait_for(run, 5.0) is None
    async with asyncio.timeout(5.0):
        while len(dechunk(bytes(peer.received))) < n * len(big):
            peer.grew.clear()
            await peer.grew.wait()
    assert dechunk(bytes(peer.received)) == big * n


async def test_without_a_task_backpressure_pauses_and_resumes_and_the_end_is_called_once(
    raw: RawFactory, client: ReplicaClient, link: tuple[Sender, Peer]
) -> None:
    """The callback path's form of ``run``: the client's ``resume_writing`` resumes the
    replica, and ``on_done`` is called once, with the outcome, when the stream ends."""
    sender, peer = link
    big = b"data: " + b"x" * 60_000 + b"\n\n"
    n = 80
    replica = await raw(answer(HEAD + chunk(big), *[chunk(big)] * (n - 1), b"0\r\n\r\n"))
    assert peer.transport is not None and sender.transport is not None
    peer.transport.pause_reading()
    resp = await open_stream(client, replica)
    assert sender.transport is not None
    relay = SseRelay(sender.transport, chunked=True, source=resp)
    sender.transport.write(chunk(relay.take_first(resp.first)))
    ended: list[GatewayError | None] = []
    done = asyncio.Event()

    def on_done() -> None:
        ended.append(relay.outcome())
        done.set()

    sender.on_writable = relay.writable
    relay.run_callbacks(on_done)
    resp.relay_to(relay)
    await asyncio.wait_for(sender.paused.wait(), 3.0)
    assert sender.transport.get_write_buffer_size() < 1_000_000 and not done.is_set()
    peer.transport.resume_reading()
    await asyncio.wait_for(done.wait(), 5.0)
    assert ended == [None]
    async with asyncio.timeout(5.0):
        while len(dechunk(bytes(peer.received))) < n * len(big):
            peer.grew.clear()
            await peer.grew.wait()
    assert dechunk(bytes(peer.received)) == big * n
    relay.end()  # a late duplicate changes nothing
    assert ended == [None]


async def test_a_client_that_left_stops_the_relay(
    raw: RawFactory, client: ReplicaClient, link: tuple[Sender, Peer]
) -> None:
    sender, _ = link
    gate = asyncio.Event()
    replica = await raw(
        answer(HEAD + chunk(event(0)), *[chunk(event(i)) for i in range(1, 50)], gate=gate)
    )
    resp = await open_stream(client, replica)
    relay = relay_for(resp, sender)
    run = asyncio.create_task(relay.run(sender.drain))
    assert sender.transport is not None
    sender.transport.close()  # as after the client's connection was lost
    gate.set()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(run, 3.0)
    resp.close()  # the proxy's cleanup: the replica sees its connection aborted
    await asyncio.wait_for(replica.closed.wait(), 2.0)


async def test_an_event_that_never_ends_is_forwarded_past_the_bound(
    raw: RawFactory, client: ReplicaClient, link: tuple[Sender, Peer]
) -> None:
    sender, peer = link
    gate = asyncio.Event()
    replica = await raw(answer(HEAD + chunk(b"data: " + b"y" * 100), chunk(b"z" * 100), gate=gate))
    resp = await open_stream(client, replica)
    assert sender.transport is not None
    relay = SseRelay(sender.transport, chunked=False, source=resp, max_holdback_bytes=150)
    assert relay.take_first(resp.first) == b""  # held: no event is complete
    resp.relay_to(relay)
    gate.set()
    await peer.wait_for(206)  # not chunked (an HTTP/1.0 client): raw payload bytes
    assert bytes(peer.received) == b"data: " + b"y" * 100 + b"z" * 100
    resp.close()


def decode_chunked(data: bytes) -> list[bytes]:
    out: list[bytes] = []
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n"
        data = rest[size + 2 :]
    return out
