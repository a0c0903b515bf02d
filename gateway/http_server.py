"""The data plane's HTTP/1.1 server: the client side of every proxied request.

Requests are parsed by llhttp (``httptools``, the parser behind uvicorn and Node.js) inside an
``asyncio.Protocol``; responses are written to the transport as prebuilt bytes. This replaces
``aiohttp.web`` on the API port only (the admin port keeps it): in the proxy benchmark's
profile, aiohttp's request objects, routing, middleware chain and response writer were about a
third of kvgate's CPU per request (``benchmarks/proxy/PROFILE.md``).

One ``HttpConnection`` per client connection. Each request becomes a ``Request`` as soon as its
head is complete and is answered by one ``Job``, one request at a time per connection
(pipelined requests wait their turn, in order): the server's ``fast`` hook first (the proxy's
callback path, ``gateway/exchange.py``, which answers from protocol callbacks), else a handler
task. The handler answers through the request:
``Request.respond`` for a whole response, ``Request.stream`` for one sent in pieces
(``ResponseStream``: the head goes out with the first piece).

Invariants:

* Every request whose head is parsed gets exactly one response, or its connection is closed
  (the client went away, or the gateway stops after its drain time). A handler that returns
  without answering gets a 500; one that fails after answering part of a stream gets its
  connection closed, so the client sees a broken response rather than a short one.
* Malformed requests (llhttp's errors: bad request line, CR/LF/NUL in headers, obsolete line
  folding, Content-Length with Transfer-Encoding, duplicate Content-Length) and oversized heads
  are answered 400/431 by ``on_protocol_error`` (the gateway renders and logs them), and the
  connection is closed: nothing after a framing error can be trusted.
* Bounds: a head within ``MAX_HEAD_BYTES`` and ``MAX_HEADERS``; a body within
  ``max_body_bytes`` (a larger declared or arriving body is refused with 413 before it is read
  whole, and the connection is closed); the head within ``header_timeout_s`` of connecting or
  of the previous response (slow-loris heads, and the keep-alive idle timeout: the connection
  is closed without a response); the body within ``body_timeout_s`` of the handler asking for
  it (408).
* A client that disconnects cancels its request's job at once (the proxy then aborts the
  replica's request and releases the replica: in its ``finally``, or in ``Exchange.cancel``).
* Writes are never awaited per piece: ``ResponseStream.drain`` waits only while the transport
  is over its high-water mark (``pause_writing``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol, cast

import httptools

from gateway.errors import (
    Answer,
    GatewayError,
    HeadTooLarge,
    InvalidRequest,
    RequestTimeout,
    RequestTooLarge,
)

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 128
_MAX_PIPELINED = 8  # parsed requests waiting their turn before reading pauses
_REASONS = {int(s): s.phrase for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


Handler = Callable[["Request"], Coroutine[Any, Any, None]]
# Serves a request without a task when it can (the proxy's callback path): True if it took it.
FastHandler = Callable[["Request"], bool]


class Job(Protocol):
    """What answers a connection's current request: its handler task, or an object of the
    callback path. ``cancel`` is called when the client goes away or the drain time is over."""

    def cancel(self) -> object: ...

    def done(self) -> bool: ...


# (method, path, error): a request refused before any handler ran; returns the response bytes.
ProtocolErrorHook = Callable[[str, str, GatewayError], Answer]


class _Dates:
    """The ``Date`` header line, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._line


_dates = _Dates()


Headers = Iterable[tuple[str, str]] | bytes  # pairs, or header lines already built as bytes


def response_head(
    status: int,
    headers: Headers,
    *,
    length: int | None,
    keep_alive: bool,
    chunked: bool = False,
) -> bytes:
    """The response head as bytes. Header names and values must already be free of CR/LF
    (the gateway's own, or a replica's as ``replica_client`` parsed them)."""
    parts = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
    fields = b""
    if isinstance(headers, bytes):
        fields = headers
    else:
        parts += [f"{k}: {v}\r\n" for k, v in headers]
    if length is not None:
        parts.append(f"Content-Length: {length}\r\n")
    elif chunked:
        parts.append("Transfer-Encoding: chunked\r\n")
    if not keep_alive:
        parts.append("Connection: close\r\n")
    head = "".join(parts).encode("utf-8", "surrogateescape")
    return head + fields + _dates.line() + b"\r\n"


class Request:
    """One client request: its head, its body (``read_body``), and the way to answer it."""

    __slots__ = (
        "_body_error",
        "_body_waiter",
        "_conn",
        "_continue",
        "_parts",
        "_raw_headers",
        "_size",
        "answered",
        "complete",
        "content_length",
        "keep_alive",
        "method",
        "path",
        "query",
        "remote",
        "status",
        "version",
    )

    def __init__(self, conn: HttpConnection, method: str, target: bytes, version: str) -> None:
        if target[:1] != b"/" and target[:4].lower() == b"http":
            # Absolute form (``POST http://host/v1/...``): only its path is used, so a request
            # can never choose where it goes (RFC 9112 §3.2.2: servers must accept the form).
            try:
                # httptools' stub says bytes; a part the URL lacks is None (and compiled code
                # checks the declared type).
                url: Any = httptools.parse_url(target)
                url_path: bytes | None = url.path
                url_query: bytes | None = url.query
                target = (url_path or b"/") + (b"?" + url_query if url_query else b"")
            except httptools.HttpParserInvalidURLError:
                target = b""
        path, _, query = target.partition(b"?")
        self._conn = conn
        self.method = method
        self.path = path.decode("latin-1")
        self.query = query.decode("latin-1")
        self.version = version
        self.remote = conn.remote
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        self.content_length: int | None = None
        self._parts: list[bytes] = []
        self._size = 0
        self.complete = False  # the whole body has arrived
        self._continue = False  # the client waits for "100 Continue" before sending the body
        self._body_waiter: asyncio.Future[None] | None = None
        self._body_error: GatewayError | None = None
        self.answered = False  # the response head was written
        self.status = 0

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """The header lines as the client sent them (names in their case), in order."""
        return self._raw_headers

    def header(self, name: str) -> str | None:
        """The first value of a header (case-insensitive), found in the raw lines."""
        wanted = name.lower().encode()
        size = len(wanted)
        for key, value in self._raw_headers:
            if len(key) == size and key.lower() == wanted:
                return value.decode("utf-8", "surrogateescape")
        return None

    async def read_body(self) -> bytes:
        """The whole body; ``RequestTooLarge`` past ``max_body_bytes``, ``RequestTimeout``
        when it does not arrive within ``body_timeout_s``."""
        self._raise_body_error()
        if not self.complete:
            conn = self._conn
            if self._continue:
                self._continue = False
                conn.write(_CONTINUE)
            loop = asyncio.get_running_loop()
            self._body_waiter = waiter = loop.create_future()
            timer = loop.call_later(conn.limits.body_timeout_s, self._timed_out)
            try:
                await waiter
            finally:
                timer.cancel()
                self._body_waiter = None
            self._raise_body_error()
        parts = self._parts
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _raise_body_error(self) -> None:
        # A method, not an inline check: mypy keeps an ``is not None`` narrowing of the attribute
        # across the ``await`` in ``read_body``, and compiled code (mypyc) would trust it.
        if self._body_error is not None:
            raise self._body_error

    def body_now(self) -> bytes | None:
        """The whole body if it is already here (and within bounds), else None."""
        if not self.complete or self._body_error is not None:
            return None
        parts = self._parts
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def attach(self, job: Job) -> None:
        """Make ``job`` the one answering this request (cancelled if the client leaves)."""
        self._conn.attach(self, job)

    def when_writable(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` whenever the client's transport drains below its low-water mark
        (flow control for writes not awaited by a task)."""
        self._conn.on_writable = callback

    def respond(self, status: int, headers: Headers, body: bytes) -> None:
        """A whole response, in one write."""
        if self.answered:
            raise RuntimeError("the response was already started")
        self.answered = True
        self.status = status
        conn = self._conn
        keep = conn.keep_alive_after(self)
        conn.write(response_head(status, headers, length=len(body), keep_alive=keep) + body)
        conn.response_done(self, keep)

    def abort(self) -> None:
        """Close the connection (after what is buffered): for a response that cannot be
        completed, so the client sees it broken rather than short."""
        self._conn.close()

    def stream(self, status: int, headers: Headers, *, length: int | None = None) -> ResponseStream:
        """A response sent in pieces; chunked unless ``length`` is given or the client speaks
        HTTP/1.0 (then the end of the body is the end of the connection)."""
        if self.answered:
            raise RuntimeError("the response was already started")
        self.answered = True
        self.status = status
        return ResponseStream(self._conn, self, status, headers, length)

    # -- the connection's side -------------------------------------------------------------

    def _add_body(self, data: bytes, limit: int) -> None:
        if self._body_error is not None:
            return
        self._size += len(data)
        if self._size > limit:
            self._parts = []
            self._fail_body(RequestTooLarge(f"request body exceeds {limit} bytes"))
            return
        self._parts.append(data)

    def _completed(self) -> None:
        self.complete = True
        self._wake()

    def _fail_body(self, error: GatewayError) -> None:
        self._body_error = error
        self._wake()

    def _timed_out(self) -> None:
        timeout = self._conn.limits.body_timeout_s
        self._fail_body(RequestTimeout(f"the request body did not arrive within {timeout:g} s"))

    def _wake(self) -> None:
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class ResponseStream:
    """A response whose head goes out with its first piece (so a failure before it can still
    become a different answer). Writes are not awaited; ``drain`` applies backpressure."""

    __slots__ = ("_conn", "_head", "_keep", "_request", "chunked", "transport")

    def __init__(
        self,
        conn: HttpConnection,
        request: Request,
        status: int,
        headers: Headers,
        length: int | None,
    ) -> None:
        self._conn = conn
        self._request = request
        self.chunked = length is None and request.version == "1.1"
        self._keep = conn.keep_alive_after(request) and (length is not None or self.chunked)
        self._head: bytes | None = response_head(
            status, headers, length=length, keep_alive=self._keep, chunked=self.chunked
        )
        transport = conn.transport
        assert transport is not None
        self.transport = transport

    def send_head(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._conn.write(head)

    def write(self, data: bytes) -> None:
        if not data:
            self.send_head()
            return
        if self.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self._head is not None:
            data, self._head = self._head + data, None
        self._conn.write(data)

    def end(self) -> None:
        """The body is complete: the last chunk, then the next request (or the close)."""
        self.send_head()
        if self.chunked:
            self._conn.write(_LAST_CHUNK)
        self._conn.response_done(self._request, self._keep)

    def abort(self) -> None:
        """The body cannot be completed: close the connection so the client sees it broken."""
        self._conn.close()

    async def drain(self) -> None:
        await self._conn.drain()


class Limits:
    __slots__ = ("body_timeout_s", "header_timeout_s", "max_body_bytes")

    def __init__(
        self, *, max_body_bytes: int, header_timeout_s: float, body_timeout_s: float
    ) -> None:
        self.max_body_bytes = max_body_bytes
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s


class _HeadTooLargeSignal(Exception):
    """Raised from a parser callback to stop parsing an oversized head."""


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests, runs their handlers in order, writes answers."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self.limits = server.limits
        self._loop = server.loop
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self._parsing: Request | None = None  # the request whose head/body is being parsed
        self._url = b""
        self._in_head = True  # between a message's start (or the previous one's end) and its head
        self._head_bytes = 0  # bytes read while the head was incomplete
        self._head_size = 0  # the request line and header lines parsed so far
        self._queue: collections.deque[Request] = collections.deque()
        self._current: Request | None = None
        self._task: Job | None = None
        self.on_writable: Callable[[], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._paused_reading = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._close_after_current = False
        self._upgraded: Request | None = None  # an Upgrade request whose body llhttp skipped

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) and peer else None
        self._server.connections.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self._closed or self._close_after_current:
            return
        if self._upgraded is not None:
            data = self._upgrade_body(data)
            if not data:
                if self._current is None and self._queue:
                    self._start_next()
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # llhttp stops at the head of a request asking for an Upgrade (h2c, websocket):
            # none is supported, so it is answered over HTTP/1.1 as if the header were absent
            # (RFC 9110 §7.8); its body and what follows are parsed on from here.
            self._parser = httptools.HttpRequestParser(self)
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            rest = data[offset:]
            if self._upgraded is not None:
                rest = self._upgrade_body(rest)
            if rest:
                self.data_received(rest)
            elif self._current is None and self._queue:
                self._start_next()
            return
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLargeSignal):
                self._protocol_error(HeadTooLarge("request head too large"))
            else:
                self._protocol_error(InvalidRequest(f"malformed request: {exc}"))
            return
        if self._in_head:
            # A head still incomplete: bound what the parser holds for it (one endless header
            # line never reaches ``on_header``). Counts the whole read, so pipelined bytes of
            # an earlier request in the same read count too: an over-estimate, never under.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._protocol_error(HeadTooLarge("request head too large"))
                return
        if self._current is None and self._queue:
            self._start_next()

    def eof_received(self) -> bool | None:
        return None  # close: a client that half-closes is gone for HTTP/1.1's purposes

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server.connections.discard(self)
        self._cancel_timer()
        self._queue.clear()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        request = self._parsing
        if request is not None:
            request._fail_body(InvalidRequest("the client closed the connection"))
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("the client closed the connection"))
        self._server.changed()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.on_writable is not None:
            self.on_writable()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._in_head = True
        self._head_size = 0
        self._parsing = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)

    def _new_request(self) -> Request:
        parser = self._parser
        method = parser.get_method().decode("latin-1")
        self._parsing = request = Request(self, method, self._url, parser.get_http_version())
        return request

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self._parsing or self._new_request()
        raw = request._raw_headers
        raw.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if len(raw) > MAX_HEADERS or self._head_size > MAX_HEAD_BYTES:
            raise _HeadTooLargeSignal

    def on_headers_complete(self) -> None:
        request = self._parsing or self._new_request()
        self._in_head = False
        self._head_bytes = 0
        self._cancel_timer()
        request.keep_alive = self._parser.should_keep_alive()
        upgrade = self._parser.should_upgrade()
        for name, value in request._raw_headers:
            lower = name.lower()
            if lower == b"content-length":
                request.content_length = int(value)  # llhttp validated it
            elif lower == b"expect" and value.lower() == b"100-continue":
                request._continue = True
        limit = self.limits.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            request._fail_body(RequestTooLarge(f"request body exceeds {limit} bytes"))
        if upgrade:
            self._upgraded = request
        self._queue.append(request)
        if len(self._queue) > _MAX_PIPELINED:
            self._pause_reading()

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        if request is not None:
            request._add_body(body, self.limits.max_body_bytes)

    def on_message_complete(self) -> None:
        request = self._parsing
        if request is not None and request is not self._upgraded:
            request._completed()
        self._parsing = None
        self._in_head = True
        self._head_bytes = 0

    def _upgrade_body(self, data: bytes) -> bytes:
        """Feed the body of the Upgrade request llhttp skipped; return the bytes after it."""
        request = self._upgraded
        assert request is not None
        need = (request.content_length or 0) - request._size
        if request.content_length is None and self._parser_says_chunked(request):
            self._upgraded = None
            self._protocol_error(InvalidRequest("a chunked body with an Upgrade header"))
            return b""
        if need > 0 and data:
            request._add_body(data[:need], self.limits.max_body_bytes)
            data = data[need:]
            need = (request.content_length or 0) - request._size
        if need <= 0:
            self._upgraded = None
            request._completed()
        return data

    @staticmethod
    def _parser_says_chunked(request: Request) -> bool:
        return any(
            k.lower() == b"transfer-encoding" and b"chunked" in v.lower()
            for k, v in request._raw_headers
        )

    # -- requests and responses ------------------------------------------------------------

    def _start_next(self) -> None:
        request = self._queue.popleft()
        if self._paused_reading and len(self._queue) <= _MAX_PIPELINED // 2:
            self._resume_reading()
        self._current = request
        fast = self._server.fast
        if fast is not None and fast(request):
            return  # answered from callbacks; it attached its job (or already answered)
        self.attach(request, self._loop.create_task(self._server.handler(request)))

    def attach(self, request: Request, job: Job) -> None:
        if self._current is not request or self._closed:
            job.cancel()  # its client is gone
            return
        self._task = job
        if isinstance(job, asyncio.Task):
            job.add_done_callback(self._handled)

    def _handled(self, task: asyncio.Task[None]) -> None:
        request = self._current
        if task is not self._task or request is None or self._closed:
            return
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("request handler failed: %r", exc, exc_info=exc)
        if not request.answered:
            # A handler must answer; if it did not (a bug), the client still gets an answer.
            status, headers, body = self._server.on_protocol_error(
                request.method, request.path, GatewayError("internal error in the gateway")
            )
            request.respond(status, headers, body)
        else:  # a response the handler left unfinished: the client must see it broken
            self.close()

    def keep_alive_after(self, request: Request) -> bool:
        """Whether the connection stays open after this request's response."""
        return (
            request.keep_alive
            and request.complete
            and request._body_error is None
            and not self._close_after_current
            and not self._server.draining
        )

    def response_done(self, request: Request, keep_alive: bool) -> None:
        if self._current is not request:
            return
        self._current = None
        self._task = None
        self.on_writable = None
        if not keep_alive or self._closed:
            self.close()
        elif self._queue:
            self._start_next()
        else:
            self._arm_idle()
        self._server.changed()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self._closed and not transport.is_closing():
            transport.write(data)

    async def drain(self) -> None:
        transport = self.transport
        if self._closed or transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if not self._write_paused:
            return
        waiter = self._drain_waiter
        if waiter is None or waiter.done():
            waiter = self._drain_waiter = self._loop.create_future()
        await waiter

    def close(self) -> None:
        """Close after what is buffered is written."""
        self._cancel_timer()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def idle(self) -> bool:
        return self._current is None and not self._queue

    def cancel(self) -> None:
        """Shutdown after the drain time: the handler is cancelled and the connection closed."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        if self.transport is not None:
            self.transport.abort()

    # -- internals -------------------------------------------------------------------------

    def _protocol_error(self, error: GatewayError) -> None:
        """A request the parser refused: answered, then the connection is closed (after the
        response in progress, if any: it is answered first, in order)."""
        self._queue.clear()
        self._pause_reading()
        if self._current is not None:
            self._close_after_current = True
            return
        request = self._parsing
        method = request.method if request is not None else "-"
        path = request.path if request is not None else "-"
        status, headers, body = self._server.on_protocol_error(method, path, error)
        self.write(response_head(status, headers, length=len(body), keep_alive=False) + body)
        self._closed = True
        self.close()

    def _arm_idle(self) -> None:
        self._cancel_timer()
        self._timer = self._loop.call_later(self.limits.header_timeout_s, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self._timer = None
        if self._current is None and not self._queue:
            self.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _pause_reading(self) -> None:
        if not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._paused_reading and self.transport is not None:
            self._paused_reading = False
            self.transport.resume_reading()


class HttpServer:
    """The listening socket and its connections; ``shutdown`` drains them."""

    def __init__(
        self,
        handler: Handler,
        limits: Limits,
        on_protocol_error: ProtocolErrorHook,
        *,
        fast: FastHandler | None = None,
    ) -> None:
        self.handler = handler
        self.fast = fast
        self.limits = limits
        self.on_protocol_error = on_protocol_error
        self.connections: set[HttpConnection] = set()
        self.draining = False
        self._changed: asyncio.Event | None = None  # set while draining, on each finished request
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    async def start(self, host: str, port: int, *, backlog: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: HttpConnection(self), host, port, backlog=backlog, reuse_address=True
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        # typeshed says a tuple; uvloop's is a list (and compiled code checks the type).
        sockets: Sequence[socket.socket] = cast(Any, self._server).sockets
        assert sockets
        return int(sockets[0].getsockname()[1])

    def changed(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def busy(self) -> int:
        """Connections with a request in progress or waiting."""
        return sum(1 for c in self.connections if not c.idle())

    async def shutdown(self, drain_s: float) -> None:
        """Stop accepting; close idle connections; let requests in flight finish for up to
        ``drain_s`` (each connection closes after its response); then cancel what is left."""
        self.draining = True
        self._changed = changed = asyncio.Event()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.idle():
                conn.close()
        loop = self.loop
        deadline = loop.time() + drain_s
        while self.busy() and (left := deadline - loop.time()) > 0:
            changed.clear()
            try:
                await asyncio.wait_for(changed.wait(), left)
            except TimeoutError:
                break
        for conn in list(self.connections):
            conn.cancel()
        # Cancelled handlers run their cleanup (release replicas, log) before the loop stops.
        for _ in range(3):
            await asyncio.sleep(0)
        if self._server is not None:
            await self._server.wait_closed()
