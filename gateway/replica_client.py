"""The proxy's HTTP/1.1 client to replicas: keep-alive connections on asyncio protocols.

Replicas are a small set of plain HTTP/1.1 servers, so the data path does not need a general
client: per request the head is built once as bytes, an idle connection to the replica is
reused (or one is opened), and the response is parsed by the connection's own protocol. No
``StreamReader``, no task, no ``asyncio.timeout`` per request; the first-byte timeout is one
``loop.call_at`` handle. Two ways to consume a body:

* buffered (``ReplicaResponse.next_chunk``/``read_rest``), for answers that are held whole;
* relayed (``ReplicaResponse.relay_to``): every payload piece goes to a ``BodySink`` from inside
  the protocol's ``data_received``, with the replica's chunked framing alongside when one read
  is exactly one chunk, so the sink may forward those bytes as they came (``gateway/relay.py``).

Invariants:

* Errors are ``gateway.errors`` classes, raised or delivered once: connect failures are
  ``UpstreamConnectError``, no response head plus first body byte before the deadline is
  ``UpstreamTimeout``, a connection lost before the response's end is ``UpstreamDisconnected``,
  and a malformed head is ``UpstreamResponseInvalid`` (malformed framing after the head counts as
  a broken-off body: ``UpstreamDisconnected``).
* A connection goes back to the idle list only after a complete response that leaves it
  reusable (HTTP/1.1, no ``Connection: close``, not close-delimited, no stray bytes). A response
  closed before its end aborts its connection, so the replica sees the reset and stops
  generating. Idle connections older than ``idle_timeout_s`` are closed instead of reused (below
  the common 5 s keep-alive of replica servers, so the race with a replica's own close is rare),
  and closed by a sweep when nothing reuses them, so a burst's connections do not outlive it.
* Requests are never retried here; a stale keep-alive connection surfaces as a disconnect before
  the first byte, which the proxy may retry on another replica.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import urlsplit

from gateway.errors import (
    GatewayError,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamResponseInvalid,
    UpstreamTimeout,
)

_MAX_HEAD_BYTES = 64 * 1024
_MAX_LINE_BYTES = 4096  # a chunk-size or trailer line
_BUFFER_PAUSE_BYTES = 256 * 1024  # buffered, unread body beyond this pauses the socket
_IDLE_TIMEOUT_S = 4.0

_HEAD, _LENGTH, _SIZE, _DATA, _DATA_END, _TRAILER, _UNTIL_CLOSE, _DONE = range(8)


class ResponseWaiter(Protocol):
    """Told once of a request's outcome: its response (head and first body bytes), or the
    error. An ``asyncio.Future`` for ``ReplicaClient.open``; the proxy's callback path passes
    an object of its own (``ReplicaClient.send_now``) and is called from the protocol."""

    def done(self) -> bool: ...

    def set_result(self, result: ReplicaResponse, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


class BodySink(Protocol):
    """Where a relayed body goes, called from the replica connection's callbacks."""

    def body(self, payload: bytes, framed: bytes | None) -> None:
        """Payload bytes; ``framed`` is the same payload as one whole chunk exactly as the
        replica framed it (size line and CRLFs), when this read was precisely that."""

    def end(self) -> None:
        """The body ended normally (after the last ``body``)."""

    def fail(self, error: GatewayError) -> None:
        """The body broke off (connection lost, malformed framing)."""


@dataclass(frozen=True, slots=True, eq=False)
class Target:
    """Where a replica's base URL points. Compared by identity (one instance per base URL, see
    ``ReplicaClient``): it keys the idle lists, and hashing five fields per request costs."""

    host: str
    port: int
    tls: bool
    prefix: str  # the base URL's path, without a trailing slash
    host_header: str


def target(base_url: str) -> Target:
    """The replica's address from its base URL (``http://host:port[/prefix]``), parsed once."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {base_url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    default = port == (443 if tls else 80)
    return Target(host, port, tls, parts.path.rstrip("/"), shown if default else f"{shown}:{port}")


def build_head(
    method: str, path: str, host: str, headers: Iterable[tuple[str, str]], body_length: int
) -> bytes:
    """The request head as bytes; ``headers`` must not carry Host, Content-Length or framing.

    Raises ``ValueError`` if a name or value would break the head (CR, LF): header injection
    must not reach a replica whatever the headers' source.
    """
    lines = [f"{k}: {v}\r\n" for k, v in headers]
    fields = "".join(lines)
    text = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{fields}Content-Length: {body_length}\r\n\r\n"
    )
    # Exactly one CRLF per line, and no CR or LF anywhere else: two C-speed counts.
    expected = len(lines) + 4
    if text.count("\n") != expected or text.count("\r") != expected:
        raise ValueError("a request line or header contains CR or LF")
    return text.encode("utf-8", "surrogateescape")


class ReplicaResponse:
    """A replica's response whose head and first body bytes (or whole empty body) arrived."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_error",
        "_reader",
        "_sink",
        "_size",
        "complete",
        "content_length",
        "content_type",
        "first",
        "raw_headers",
        "status",
    )

    def __init__(
        self,
        conn: _Conn,
        status: int,
        raw_headers: list[tuple[bytes, bytes]],
        *,
        content_type: str,
        content_length: int | None,
    ) -> None:
        self.status = status
        self.raw_headers = raw_headers  # as the replica sent them (checked: no CR/LF)
        self.content_type = content_type  # the media type alone, lower case
        self.content_length = content_length
        self.first = b""
        self.complete = False
        self._conn: _Conn | None = conn
        self._chunks: list[bytes] = []
        self._size = 0
        self._error: GatewayError | None = None
        self._reader: asyncio.Future[None] | None = None
        self._sink: BodySink | None = None

    # -- consumer side ---------------------------------------------------------------------

    async def next_chunk(self) -> bytes:
        """The body bytes received since the last call; b"" at the end. Raises
        ``UpstreamDisconnected`` if the body broke off."""
        while True:
            if self._chunks:
                chunks, self._chunks, self._size = self._chunks, [], 0
                conn = self._conn
                if conn is not None and conn.paused:
                    conn.resume()
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            self._reader = reader = asyncio.get_running_loop().create_future()
            try:
                await reader
            finally:
                self._reader = None

    async def read_rest(self, limit: int) -> bytes:
        """``first`` and the rest of the body, up to about ``limit`` bytes."""
        parts = [self.first]
        size = len(self.first)
        while size < limit:
            chunk = await self.next_chunk()
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)

    def relay_to(self, sink: BodySink) -> None:
        """From now on, hand the body to ``sink`` from the connection's callbacks (bytes that
        arrived after ``first`` and were buffered go first)."""
        chunks = self._chunks
        if chunks:  # what arrived before the relay started: one piece, so one write
            sink.body(chunks[0] if len(chunks) == 1 else b"".join(chunks), None)
        self._chunks, self._size = [], 0
        if self._error is not None:
            sink.fail(self._error)
        elif self.complete:
            sink.end()
        else:
            self._sink = sink
            conn = self._conn
            if conn is not None:
                conn.sink = sink
                if conn.paused:
                    conn.resume()

    def pause_reading(self) -> None:
        """Flow control for a sink whose own output is full."""
        conn = self._conn
        if conn is not None and conn.transport is not None and not conn.paused:
            conn.pause()

    def resume_reading(self) -> None:
        conn = self._conn
        if conn is not None and conn.transport is not None and conn.paused:
            conn.resume()

    def close(self) -> None:
        """Done with the response. If it has not ended, its connection is aborted so the
        replica stops working on it; a complete one's connection was already released."""
        conn, self._conn = self._conn, None
        self._sink = None
        if conn is not None:
            conn.abandon()

    # -- connection side -------------------------------------------------------------------

    def _feed(self, payload: bytes) -> None:
        sink = self._sink
        if sink is not None:
            sink.body(payload, None)
            return
        self._chunks.append(payload)
        self._size += len(payload)
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)
        conn = self._conn
        if self._size > _BUFFER_PAUSE_BYTES and conn is not None and not conn.paused:
            conn.pause()

    def _ended(self, error: GatewayError | None) -> None:
        self._conn = None  # released (or closed) by the connection
        if error is None:
            self.complete = True
        else:
            self._error = error
        sink, self._sink = self._sink, None
        if sink is not None:
            if error is None:
                sink.end()
            else:
                sink.fail(error)
            return
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)


class _Conn(asyncio.Protocol):
    """One keep-alive connection to a replica and the parser of the response on it."""

    def __init__(self, client: ReplicaClient, tgt: Target) -> None:
        self.client = client
        self.target = tgt
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.paused = False
        self.sink: BodySink | None = None
        self._state = _DONE
        self._buf = bytearray()  # head or framing line not yet complete
        self._left = 0
        self._reusable = False
        self._response: ReplicaResponse | None = None
        self._waiter: ResponseWaiter | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timeout_s = 0.0
        # Relayed payload of the read being parsed, handed to the sink once per read: a read
        # that holds many chunks (a replica that got ahead) becomes one write to the client.
        self._batch: list[bytes] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None and self._state == _SIZE and not self._buf:
            # The relay's common case: one read is exactly one chunk, forwarded as it came.
            i = data.find(b"\r\n", 0, 18)
            if i > 0 and data.endswith(b"\r\n") and data[:i].isalnum():
                try:
                    size = int(data[:i], 16)
                except ValueError:
                    size = 0
                if size and len(data) == i + size + 4:
                    sink.body(data[i + 2 : -2], data)
                    return
            if self._whole_chunks(sink, data):
                return
        try:
            self._parse(data)
        except _Malformed as exc:
            self._broken(str(exc))
        self._flush_batch()

    def _flush_batch(self) -> None:
        batch, self._batch = self._batch, None
        if batch and self.sink is not None:
            self.sink.body(batch[0] if len(batch) == 1 else b"".join(batch), None)

    def _whole_chunks(self, sink: BodySink, data: bytes) -> bool:
        """Several whole chunks in one read (a relay that fell behind), possibly ending with the
        last-chunk marker: handed to ``sink`` as one piece with its framing. False, having
        consumed nothing, when ``data`` is anything else."""
        pieces: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end:
            i = data.find(b"\r\n", pos, pos + 18)
            if i <= pos or not data[pos:i].isalnum():
                return False
            try:
                size = int(data[pos:i], 16)
            except ValueError:
                return False
            if not size:
                if data[i:] != b"\r\n\r\n" or not pieces:
                    return False
                sink.body(b"".join(pieces), data[:pos])
                self._complete()
                return True
            nxt = i + 2 + size
            if data[nxt : nxt + 2] != b"\r\n":
                return False
            pieces.append(data[i + 2 : nxt])
            pos = nxt + 2
        sink.body(b"".join(pieces), data)
        return True

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost finishes or fails the response

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.client.forget(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._state == _UNTIL_CLOSE and exc is None:
            self._complete()
            return
        if self._state == _DONE:
            return
        reason = type(exc).__name__ if exc is not None else "connection closed"
        if self._waiter is None and self._response is not None:  # after the first byte
            error = UpstreamDisconnected(f"replica closed the response before its end: {reason}")
        else:
            error = UpstreamDisconnected(f"replica closed the connection: {reason}")
        self._state = _DONE
        self._fail(error)

    def pause_writing(self) -> None:
        pass  # request bodies are small and written once; nothing to pause

    def resume_writing(self) -> None:
        pass

    # -- request ---------------------------------------------------------------------------

    def send(
        self,
        loop: asyncio.AbstractEventLoop,
        data: bytes,
        deadline: float,
        timeout_s: float,
        waiter: ResponseWaiter,
    ) -> None:
        assert self.transport is not None
        self._state, self._left, self._reusable = _HEAD, 0, False
        self._buf.clear()
        self._response, self.sink = None, None
        self._waiter = waiter
        self._timeout_s = timeout_s
        self._timer = loop.call_at(deadline, self._timed_out)
        self.transport.write(data)

    def _timed_out(self) -> None:
        self._timer = None
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            self._state = _DONE
            if self.transport is not None:
                self.transport.abort()
            # Last: a callback waiter runs here, on a connection already given up.
            waiter.set_exception(
                UpstreamTimeout(f"no response from replica within {self._timeout_s:g} s")
            )

    def abandon(self) -> None:
        """The consumer left before the response ended."""
        self.sink = None
        self._response = None
        self._reusable = False  # also when called from this connection's own callbacks
        if self._state != _DONE:
            self._state = _DONE
            if self.transport is not None:
                self.transport.abort()

    def pause(self) -> None:
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        self.paused = False
        if self.transport is not None:
            self.transport.resume_reading()

    # -- parsing ---------------------------------------------------------------------------

    def _parse(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state in (_DATA, _LENGTH):
                n = min(self._left, end - pos)
                piece = data if n == end and pos == 0 else data[pos : pos + n]
                pos += n
                self._left -= n
                if not self._left:
                    self._state = _DATA_END if state == _DATA else _DONE
                self._payload(piece)
                if self._state == _DONE:
                    self._complete(stray=pos < end)
                    return
            elif state == _UNTIL_CLOSE:
                self._payload(data if pos == 0 else data[pos:])
                return
            elif state == _DATA_END:
                need = 2 - len(self._buf)
                self._buf += data[pos : pos + need]
                pos += need
                if len(self._buf) == 2:
                    if self._buf != b"\r\n":
                        raise _Malformed("chunk not followed by CRLF")
                    self._buf.clear()
                    self._state = _SIZE
            elif state == _HEAD:
                pos = self._head(data, pos)
            elif state in (_SIZE, _TRAILER):
                line, pos = self._line(data, pos)
                if line is None:
                    return
                if state == _SIZE:
                    self._chunk_size(line)
                elif not line:
                    self._state = _DONE
                    self._complete(stray=pos < end)
                    return
            else:  # _DONE: bytes after a complete response (or after an abort)
                if self._response is not None or self._waiter is not None:
                    raise _Malformed("bytes after the end of the response")
                self._reusable = False
                if self.transport is not None:
                    self.transport.abort()
                return

    def _line(self, data: bytes, pos: int) -> tuple[bytes | None, int]:
        buf = self._buf
        at = data.find(b"\n", pos)
        if at < 0:
            buf += data[pos:]
            if len(buf) > _MAX_LINE_BYTES:
                raise _Malformed("chunk-size or trailer line too long")
            return None, len(data)
        buf += data[pos:at]
        if len(buf) > _MAX_LINE_BYTES or not buf.endswith(b"\r"):
            raise _Malformed("bad chunk-size or trailer line")
        line = bytes(buf[:-1])
        buf.clear()
        return line, at + 1

    def _chunk_size(self, line: bytes) -> None:
        digits = line.partition(b";")[0].strip()
        if not digits or not digits.isalnum() or len(digits) > 16:
            raise _Malformed("bad chunk size")
        try:
            size = int(digits, 16)
        except ValueError:
            raise _Malformed("bad chunk size") from None
        if size:
            self._state, self._left = _DATA, size
        else:
            self._state = _TRAILER

    def _head(self, data: bytes, pos: int) -> int:
        buf = self._buf
        if not buf:  # the usual case: the whole head in one read, no copy
            at = data.find(b"\r\n\r\n", pos)
            if at >= 0:
                self._start_response(data[pos:at])
                return at + 4
        start = max(0, len(buf) - 3)
        buf += data[pos:]
        at = buf.find(b"\r\n\r\n", start)
        if at < 0:
            if len(buf) > _MAX_HEAD_BYTES:
                raise _Malformed("response head too large")
            return len(data)
        consumed = len(data) - (len(buf) - at - 4)
        head = bytes(buf[:at])
        buf.clear()
        self._start_response(head)
        return consumed

    def _start_response(self, head: bytes) -> None:
        status, version, raw = _parse_head(head)
        if 100 <= status < 200:
            if status == 101:
                raise _Malformed("unexpected protocol switch")
            return  # an interim response (100 Continue, 103 Early Hints): the real one follows
        keep = version == b"HTTP/1.1"
        codings: bytes | None = None
        lengths: set[bytes] = set()
        ctype = b""
        for name, value in raw:  # one pass for the few names framing depends on
            lower = name.lower()
            if lower == b"content-type":
                ctype = value
            elif lower == b"content-length":
                lengths.add(value)
            elif lower == b"transfer-encoding":
                codings = value
            elif lower == b"connection" and b"close" in value.lower():
                keep = False
        length: int | None = None
        if status in (204, 304):
            self._state, self._reusable = _DONE, keep
        elif codings is not None:
            if codings.rpartition(b",")[2].strip().lower() == b"chunked":
                self._state = _SIZE
            else:
                self._state, keep = _UNTIL_CLOSE, False
            keep = keep and not lengths
        elif lengths:
            value = lengths.pop()
            if lengths or not value.isdigit():
                raise _Malformed("bad Content-Length")
            self._left = length = int(value)
            self._state = _LENGTH if self._left else _DONE
        else:
            self._state, keep = _UNTIL_CLOSE, False
        self._reusable = keep
        media = ctype.partition(b";")[0].strip().lower().decode("latin-1")
        self._response = ReplicaResponse(
            self, status, raw, content_type=media, content_length=length
        )
        if self._state == _DONE:
            self._complete()

    def _payload(self, piece: bytes) -> None:
        if not piece:
            return
        response = self._response
        if response is None:
            return
        if self._waiter is not None:
            self._resolve(response, piece)
        elif self.sink is not None:  # relayed: one piece per read (also when relaying began
            batch = self._batch  # inside this read, from the waiter's callback)
            if batch is None:
                batch = self._batch = []
            batch.append(piece)
        else:
            response._feed(piece)

    def _resolve(self, response: ReplicaResponse, first: bytes) -> None:
        waiter, self._waiter = self._waiter, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        response.first = first
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def _complete(self, *, stray: bool = False) -> None:
        self._flush_batch()  # the body's last bytes before its end
        response, self._response = self._response, None
        self.sink = None
        self._state = _DONE
        if response is not None:
            if self._waiter is not None:
                self._resolve(response, b"")
            response._ended(None)
        if self._reusable and not stray and self.transport is not None:
            if self.paused:
                self.resume()
            self.client.release(self)
        elif self.transport is not None:
            self.transport.close()

    def _broken(self, message: str) -> None:
        self._state = _DONE
        if self.transport is not None:
            self.transport.abort()
        self._fail(None, message)

    def _fail(self, error: GatewayError | None, message: str = "") -> None:
        self._flush_batch()  # what arrived intact before the failure
        waiter, self._waiter = self._waiter, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        response, self._response = self._response, None
        self.sink = None
        if waiter is not None and not waiter.done():
            if error is None:
                error = UpstreamResponseInvalid(f"invalid response from replica: {message}")
            waiter.set_exception(error)
            return
        if response is not None:
            if error is None:
                error = UpstreamDisconnected(f"replica response broken off: {message}")
            response._ended(error)


ReplicaConnection = _Conn  # what ``send_now`` returns: ``abandon()`` it to give up the request


class _Malformed(Exception):
    pass


def _parse_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code = rest[:3]
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise _Malformed("bad status line")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b"\n" in line or b"\r" in line:
            raise _Malformed("bad header line")
        headers.append((name, value.strip()))
    return int(code), version, headers


class ReplicaClient:
    """Idle keep-alive connections per replica address, and the request that uses them."""

    def __init__(
        self, *, connect_timeout_s: float, idle_timeout_s: float = _IDLE_TIMEOUT_S
    ) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._targets: dict[str, Target] = {}
        self._idle: dict[Target, list[_Conn]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._all: set[_Conn] = set()
        self._ssl: ssl.SSLContext | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None

    async def open(
        self,
        base_url: str,
        path: str,
        headers: Iterable[tuple[str, str]] | bytes,
        body: bytes,
        *,
        first_byte_timeout_s: float,
        method: str = "POST",
    ) -> ReplicaResponse:
        """Send the request; return once the response head and its first body bytes arrived
        (or the whole response, when its body is empty). ``headers``: name/value pairs
        (checked for CR/LF here), or header lines already built as bytes by a caller that
        guarantees them (``upstream.request_fields``)."""
        tgt = self._target_of(base_url)
        head = self._head(method, tgt, path, headers, len(body))
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + first_byte_timeout_s
        conn = self._take_idle(tgt, now)
        if conn is None:
            conn = await self._connect(tgt, deadline, first_byte_timeout_s)
        waiter: asyncio.Future[ReplicaResponse] = loop.create_future()
        self._send(conn, loop, head, body, deadline, first_byte_timeout_s, waiter)
        try:
            return await waiter
        except BaseException:
            conn.abandon()  # cancelled (the client left) or failed: the replica must stop
            raise

    def send_now(
        self,
        base_url: str,
        path: str,
        headers: bytes,
        body: bytes,
        *,
        first_byte_timeout_s: float,
        waiter: ResponseWaiter,
    ) -> ReplicaConnection | None:
        """``open`` without a task, for a replica with an idle connection at hand: sends the
        request now and tells ``waiter`` of the outcome from the connection's callbacks.
        Returns the connection (``abandon`` it if the response is no longer wanted), or None,
        having sent nothing, when no idle connection is at hand. Call from the event loop."""
        tgt = self._target_of(base_url)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        conn = self._take_idle(tgt, now)
        if conn is None:
            return None
        head = self._head("POST", tgt, path, headers, len(body))
        self._send(conn, loop, head, body, now + first_byte_timeout_s, first_byte_timeout_s, waiter)
        return conn

    def _target_of(self, base_url: str) -> Target:
        tgt = self._targets.get(base_url)
        return tgt if tgt is not None else self._target(base_url)

    @staticmethod
    def _head(
        method: str,
        tgt: Target,
        path: str,
        headers: Iterable[tuple[str, str]] | bytes,
        body_length: int,
    ) -> bytes:
        if isinstance(headers, bytes):
            return b"%b %b HTTP/1.1\r\nHost: %b\r\n%bContent-Length: %d\r\n\r\n" % (
                method.encode(),
                (tgt.prefix + path).encode("latin-1"),
                tgt.host_header.encode(),
                headers,
                body_length,
            )
        try:
            return build_head(method, tgt.prefix + path, tgt.host_header, headers, body_length)
        except ValueError as exc:
            raise UpstreamResponseInvalid(f"cannot forward the request: {exc}") from None

    @staticmethod
    def _send(
        conn: _Conn,
        loop: asyncio.AbstractEventLoop,
        head: bytes,
        body: bytes,
        deadline: float,
        timeout_s: float,
        waiter: ResponseWaiter,
    ) -> None:
        small = len(body) < 65536  # one write; a large body is not copied into the head
        conn.send(loop, head + body if small else head, deadline, timeout_s, waiter)
        if not small and conn.transport is not None:
            conn.transport.write(body)

    def _take_idle(self, tgt: Target, now: float) -> _Conn | None:
        idle = self._idle.get(tgt)
        while idle:
            conn = idle.pop()
            if conn.transport is not None and now - conn.idle_since < self._idle_timeout_s:
                return conn
            if conn.transport is not None:
                conn.transport.close()
        return None

    async def _connect(self, tgt: Target, deadline: float, first_byte_timeout_s: float) -> _Conn:
        loop = asyncio.get_running_loop()
        budget = min(self._connect_timeout_s, deadline - loop.time())
        if tgt.tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            async with asyncio.timeout(budget):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self, tgt),
                    tgt.host,
                    tgt.port,
                    ssl=self._ssl if tgt.tls else None,
                )
        except TimeoutError:
            if budget < self._connect_timeout_s:
                raise UpstreamTimeout(
                    f"no response from replica within {first_byte_timeout_s:g} s"
                ) from None
            raise UpstreamConnectError(f"connect timeout: {tgt.host}:{tgt.port}") from None
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to replica: {exc.strerror or exc}") from exc
        self._all.add(conn)
        return conn

    def _target(self, base_url: str) -> Target:
        if len(self._targets) >= 1024:  # replicas come and go (pod names): forget old ones
            for conn in [c for idle in self._idle.values() for c in idle]:
                if conn.transport is not None:
                    conn.transport.close()
            self._targets.clear()
            self._idle.clear()
        tgt = self._targets[base_url] = target(base_url)
        return tgt

    def release(self, conn: _Conn) -> None:
        assert self._loop is not None
        conn.idle_since = self._loop.time()
        idle = self._idle.get(conn.target)
        if idle is None:
            idle = self._idle[conn.target] = []
        idle.append(conn)
        if self._sweep_handle is None:
            self._sweep_handle = self._loop.call_later(self._idle_timeout_s, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for ``idle_timeout_s``. A replica's own keep-alive
        timeout may be longer or absent; without this, the connections a burst opened would
        stay open after it (one timer for all, re-armed while any connection is idle)."""
        assert self._loop is not None
        self._sweep_handle = None
        now = self._loop.time()
        remaining = False
        for idle in self._idle.values():
            expired = 0  # idle lists are in release order: the oldest first
            while expired < len(idle) and now - idle[expired].idle_since >= self._idle_timeout_s:
                expired += 1
            for conn in idle[:expired]:
                if conn.transport is not None:
                    conn.transport.close()
            del idle[:expired]
            remaining = remaining or bool(idle)
        if remaining:
            self._sweep_handle = self._loop.call_later(self._idle_timeout_s / 2, self._sweep)

    def forget(self, conn: _Conn) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.target)
        if idle is not None and conn in idle:
            idle.remove(conn)

    def idle_count(self, base_url: str) -> int:
        tgt = self._targets.get(base_url)
        return 0 if tgt is None else len(self._idle.get(tgt, ()))

    async def close(self) -> None:
        """Close every connection (idle or in use)."""
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        for conn in list(self._all):
            if conn.transport is not None:
                conn.transport.abort()
        self._idle.clear()
        self._all.clear()
        await asyncio.sleep(0)  # let the transports' connection_lost callbacks run
