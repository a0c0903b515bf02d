"""A transport-level relay: what a Python proxy costs when it does the minimum (a prototype).

Not a gateway: it exists to measure the floor under kvgate's hot path on this machine, with the
design PROFILE.md recommends, so the recommendations come with a number. Per request: parse the
client's request head (Content-Length bodies only), pick the less loaded of two random replicas
(in-flight counts), reuse an idle keep-alive connection to it, write the request bytes as they
came. Per read from the replica: write the bytes to the client transport at once (status line,
headers and chunked framing untouched), then scan only enough framing (Content-Length countdown
or chunk sizes) to know where the response ends. No StreamReader, no futures, no task per chunk.
Flow control: the client transport's ``pause_writing`` pauses reading from the replica.

``python -m benchmarks.proxy.floor --port P --replica host:port [--replica ...]``
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from collections.abc import Sequence
from typing import cast

import uvloop

_HEAD, _LENGTH, _SIZE, _DATA, _TRAILER = range(5)


class _Replica:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.inflight = 0
        self.idle: list[_UpstreamConn] = []


class _UpstreamConn(asyncio.Protocol):
    def __init__(self, replica: _Replica) -> None:
        self.replica = replica
        self.transport: asyncio.Transport | None = None
        self.client: _ClientConn | None = None
        self._scan = bytearray()  # framing not yet understood (a head, a chunk-size line)
        self._state = _HEAD
        self._left = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def start(self, client: _ClientConn, request: bytes) -> None:
        assert self.transport is not None
        self.client = client
        client.up = self
        self._state, self._scan = _HEAD, bytearray()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None or client.transport is None:
            return
        client.transport.write(data)  # relay first: the framing scan never delays bytes
        if self._frame(data):
            self.client = None
            client.response_done(self)

    def _frame(self, data: bytes) -> bool:
        """Advance over ``data``; True when the response is complete."""
        pos = 0
        if self._state in (_DATA, _LENGTH):
            n = min(self._left, len(data))
            self._left -= n
            pos = n
            if self._state == _LENGTH:
                return self._left == 0
            if self._left:
                return False
            self._state = _SIZE
            data = data[pos:]
            pos = 0
        buf = self._scan
        buf += data
        while True:
            if self._state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return False
                head = bytes(buf[:end]).lower()
                del buf[: end + 4]
                if b"\r\ntransfer-encoding: chunked" in head:
                    self._state = _SIZE
                    continue
                i = head.find(b"\r\ncontent-length:")
                j = head.find(b"\r\n", i + 2)
                self._left = int(head[i + 17 : j if j >= 0 else len(head)])
                self._state = _LENGTH
                n = min(self._left, len(buf))
                self._left -= n
                del buf[:n]
                return self._left == 0
            if self._state == _SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    return False
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                del buf[: end + 2]
                if size == 0:
                    self._state = _TRAILER
                    continue
                self._left = size + 2  # the chunk and its CRLF
                n = min(self._left, len(buf))
                self._left -= n
                del buf[:n]
                if self._left:
                    self._state = _DATA
                    return False
            else:  # _TRAILER
                end = buf.find(b"\r\n")
                if end < 0:
                    return False
                del buf[: end + 2]
                if end == 0:
                    return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self in self.replica.idle:
            self.replica.idle.remove(self)
        client, self.client = self.client, None
        if client is not None and client.transport is not None:
            client.transport.close()  # a broken response: never pass it off as complete


class _ClientConn(asyncio.Protocol):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.up: _UpstreamConn | None = None
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self.up is None:
            self._next_request()

    def _next_request(self) -> None:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).lower()
        i = head.find(b"\r\ncontent-length:")
        length = 0
        if i >= 0:
            j = head.find(b"\r\n", i + 2)
            length = int(head[i + 17 : j if j >= 0 else len(head)])
        if len(buf) < end + 4 + length:
            return
        request = bytes(buf[: end + 4 + length])
        del buf[: end + 4 + length]
        self.relay.dispatch(self, request)

    def response_done(self, up: _UpstreamConn) -> None:
        self.up = None
        replica = up.replica
        replica.inflight -= 1
        replica.idle.append(up)
        if self._buf:
            self._next_request()

    def pause_writing(self) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        up, self.up = self.up, None
        if up is not None:
            up.replica.inflight -= 1
            if up.transport is not None:
                up.transport.abort()  # the replica sees the abort and stops generating


class Relay:
    def __init__(self, replicas: Sequence[tuple[str, int]], rng: random.Random) -> None:
        self.replicas = [_Replica(h, p) for h, p in replicas]
        self._rng = rng
        self._tasks: set[asyncio.Task[None]] = set()

    def dispatch(self, client: _ClientConn, request: bytes) -> None:
        a, b = self._rng.sample(self.replicas, 2) if len(self.replicas) > 1 else self.replicas * 2
        replica = a if a.inflight <= b.inflight else b
        replica.inflight += 1
        if replica.idle:
            replica.idle.pop().start(client, request)
            return
        task = asyncio.get_running_loop().create_task(self._connect(replica, client, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, replica: _Replica, client: _ClientConn, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(
                lambda: _UpstreamConn(replica), replica.host, replica.port
            )
        except OSError:
            replica.inflight -= 1
            if client.transport is not None:
                client.transport.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            return
        up.start(client, request)


async def serve(port: int, replicas: Sequence[tuple[str, int]]) -> None:
    relay = Relay(replicas, random.Random(0))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _ClientConn(relay), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replica", action="append", required=True, help="host:port")
    args = parser.parse_args(argv)
    replicas = [(h, int(p)) for h, _, p in (r.rpartition(":") for r in args.replica)]
    uvloop.run(serve(args.port, replicas))
    return 0


if __name__ == "__main__":
    sys.exit(main())
