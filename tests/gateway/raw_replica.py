"""A raw-socket replica for exact-bytes tests of the replica client and the relay: it reads one
request at a time and lets a script answer with whatever bytes it likes (split chunk headers,
interim 1xx answers, malformed heads, resets mid-body) — what no HTTP library sends on purpose.

Use ``raw = pytest.fixture(raw_replicas)`` in a test module, then ``await raw(answer(...))``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

# A raw replica: called with each request's bytes (head + body), writes whatever it likes.
Script = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


class RawReplica:
    """A TCP server that reads one request at a time and lets a script answer it."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections = 0
        self.received = asyncio.Event()  # set when a request arrives
        self.closed = asyncio.Event()  # set when a connection ends (the client aborted)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                self.received.set()
                await self.script(request, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()


RawFactory = Callable[[Script], Awaitable["RawReplica"]]


async def raw_replicas() -> AsyncIterator[RawFactory]:
    started: list[RawReplica] = []

    async def start(script: Script) -> RawReplica:
        replica = RawReplica(script)
        await replica.start()
        started.append(replica)
        return replica

    yield start
    for replica in started:
        await replica.stop()


def answer(
    *parts: bytes, close: bool = False, pause_s: float = 0.0, gate: asyncio.Event | None = None
) -> Script:
    """Write ``parts`` one by one (``pause_s`` apart, so the client sees separate reads); with a
    ``gate``, everything after the first part waits until the test opens it."""

    async def script(_request: bytes, writer: asyncio.StreamWriter) -> None:
        for i, part in enumerate(parts):
            if i == 1 and gate is not None:
                await gate.wait()
            writer.write(part)
            await writer.drain()
            if pause_s:
                await asyncio.sleep(pause_s)  # pacing, so the client sees separate reads
        if close:
            writer.close()

    return script
