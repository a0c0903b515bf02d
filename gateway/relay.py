"""SSE relay at the transport level: a replica's stream to the client, whole events at a time.

``SseRelay`` is the ``BodySink`` (``gateway/replica_client.py``) of a streamed response. It runs
inside the replica connection's ``data_received``: each payload piece is written to the
client's transport at once, with no task switch, future or ``StreamReader`` per chunk. When
the client side is chunked and one read was exactly one whole chunk ending on an event boundary
(the common case: replicas write one event per chunk), the replica's framed bytes are written as
they came; otherwise the payload is re-framed.

Invariants:

* Only whole SSE events reach the client (a blank line ends an event, LF or CRLF): a partial
  event is held back until its end arrives, or forwarded anyway once more than
  ``max_holdback_bytes`` are held (a replica that never ends an event must not grow memory).
  So a stream that breaks off can still be ended with one well-formed error event.
* Backpressure: when the client's transport buffer passes its high-water mark, reading from the
  replica pauses; ``run`` waits for the client to drain (``drain``) and resumes it. Nothing is
  awaited per chunk.
* Accounting is two local updates per piece written: a newline count and the last two pieces
  (where a usage chunk would be); tokens and inter-token latency are derived once, at the end.
* A client that went away (its transport closing) stops the relay: reading pauses and ``run``
  raises ``ConnectionResetError``; the caller's cleanup closes the replica's response.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from gateway.errors import GatewayError

MAX_HOLDBACK_BYTES = 1024 * 1024
_CLIENT_GONE = ConnectionResetError("the client closed the connection")


class FlowSource(Protocol):
    """The replica side, paused while the client cannot take more."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class SseRelay:
    """Writes one stream's events to the client transport as the replica sends them."""

    __slots__ = (
        "_chunked",
        "_done",
        "_error",
        "_gone",
        "_high",
        "_max_holdback",
        "_on_done",
        "_paused",
        "_pending",
        "_source",
        "_transport",
        "_wake",
        "before",
        "last",
        "newlines",
    )

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        *,
        chunked: bool,
        source: FlowSource,
        max_holdback_bytes: int = MAX_HOLDBACK_BYTES,
    ) -> None:
        self._transport = transport
        self._chunked = chunked
        self._source = source
        self._max_holdback = max_holdback_bytes
        self._high = transport.get_write_buffer_limits()[1]
        self._pending = b""
        self._paused = False
        self._done = False
        self._gone = False
        self._error: GatewayError | None = None
        self._wake: asyncio.Future[None] | None = None
        self._on_done: Callable[[], None] | None = None
        self.newlines = 0
        self.before = b""  # the second-to-last piece written
        self.last = b""  # the last piece written

    def take_first(self, payload: bytes) -> bytes:
        """The whole events of the stream's first bytes, to be written by the caller together
        with the response head; the rest is held back like any partial event."""
        return self._cut(payload)

    # -- BodySink --------------------------------------------------------------------------

    def body(self, payload: bytes, framed: bytes | None) -> None:
        transport = self._transport
        if self._done:
            return
        if transport.is_closing():
            self._client_gone()
            return
        if (
            framed is not None
            and self._chunked
            and not self._pending
            and (payload.endswith(b"\n\n") or payload.endswith(b"\n\r\n"))
        ):
            transport.write(framed)
            self.newlines += payload.count(b"\n")
            self.before, self.last = self.last, payload
        else:
            out = self._cut(payload)
            if out:
                self._write(out)
        if transport.get_write_buffer_size() > self._high and not self._paused:
            self._paused = True
            self._source.pause_reading()
            self._signal()

    def end(self) -> None:
        if self._done:
            return
        if self._pending and not self._transport.is_closing():
            rest, self._pending = self._pending, b""
            self.before, self.last = self.last, rest
            self.newlines += rest.count(b"\n")
            self._write(rest)
        self._finish(None)

    def fail(self, error: GatewayError) -> None:
        if not self._done:
            self._pending = b""  # a partial event is dropped: the error event ends the stream
            self._finish(error)

    # -- the handler's side ----------------------------------------------------------------

    async def run(self, drain: Callable[[], Awaitable[None]]) -> GatewayError | None:
        """Wait until the stream ends: None when it ended normally, the error when the replica
        broke it off. Raises ``ConnectionResetError`` when the client went away."""
        loop = asyncio.get_running_loop()
        while not self._done:
            if self._paused:
                await drain()
                self.writable()  # resumes the replica, or sees the client gone
                continue
            self._wake = wake = loop.create_future()
            try:
                await wake
            finally:
                self._wake = None
        return self.outcome()

    def run_callbacks(self, on_done: Callable[[], None]) -> None:
        """``run`` without a task: ``on_done`` is called once when the stream ends (see
        ``outcome``), and the caller calls ``writable`` when the client's transport drains."""
        self._on_done = on_done
        if self._done:
            on_done()

    def writable(self) -> None:
        """The client's transport went below its low-water mark: read from the replica again."""
        if self._done or not self._paused:
            return
        if self._transport.is_closing():
            self._client_gone()
            return
        self._paused = False
        self._source.resume_reading()

    def outcome(self) -> GatewayError | None:
        """As ``run`` returns: the replica's error, or None; ``ConnectionResetError`` when
        the client went away."""
        if self._gone:
            raise _CLIENT_GONE
        return self._error

    # -- internals -------------------------------------------------------------------------

    def _cut(self, payload: bytes) -> bytes:
        """Append ``payload`` to what is held back; return the whole events now complete (or
        everything, past the hold-back bound) and account for them."""
        pending = self._pending + payload if self._pending else payload
        cut = event_boundary(pending)
        if not cut and len(pending) > self._max_holdback:
            cut = len(pending)
        if not cut:
            self._pending = pending
            return b""
        out = pending if cut == len(pending) else pending[:cut]
        self._pending = pending[cut:] if cut < len(pending) else b""
        self.newlines += out.count(b"\n")
        self.before, self.last = self.last, out
        return out

    def _write(self, data: bytes) -> None:
        if self._chunked:
            self._transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self._transport.write(data)

    def _client_gone(self) -> None:
        if not self._paused:
            self._paused = True
            self._source.pause_reading()
        self._gone = True
        self._finish(None)

    def _finish(self, error: GatewayError | None) -> None:
        self._done = True
        self._error = error
        self._signal()

    def _signal(self) -> None:
        if self._done and self._on_done is not None:
            on_done, self._on_done = self._on_done, None
            on_done()
            return
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)


def event_boundary(buf: bytes) -> int:
    """Length of the prefix of ``buf`` made of whole SSE events (0 when none is complete)."""
    lf = buf.rfind(b"\n\n")
    crlf = buf.rfind(b"\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
