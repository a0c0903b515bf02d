"""A minimal HTTP/1.1 client protocol for the proxy benchmark: prebuilt request bytes, one
exchange at a time per keep-alive connection, responses framed by ``Content-Length`` or chunked
encoding, SSE events counted as they arrive.

Timing: one ``perf_counter`` per read. TTFT (``Exchange.t_first``) is the read that completed
the first content event (or brought the first body byte of a plain response); every further
read that completes events records one gap (and a 0 gap for each extra event in that read).
``data: [DONE]`` is recognised across reads and is not a content event.

Invariants: a response is ``ok`` only with status 200 and, for SSE, a ``[DONE]``; a connection
lost mid-response completes its exchange as not ok; a connection is reused only when the server
did not say ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast

import orjson

MODEL = "bench-model"
CHAT_PATH = "/v1/chat/completions"


class Exchange:
    """One request/response; ``t_first`` is the first complete SSE event (or body byte)."""

    __slots__ = (
        "content",
        "done_marker",
        "gaps",
        "ok",
        "status",
        "t_end",
        "t_first",
        "t_last",
        "t_send",
    )

    def __init__(self) -> None:
        self.t_send = self.t_first = self.t_last = self.t_end = 0.0
        self.status = 0
        self.content = 0  # SSE content events (without [DONE])
        self.done_marker = False
        self.ok = False
        self.gaps: list[float] | None = None  # inter-token gaps, when recorded


class Tally:
    """Content events received while ``counting``; a waiter for a number of first events."""

    __slots__ = ("counting", "events", "firsts", "waiter", "wanted")

    def __init__(self) -> None:
        self.counting = False
        self.events = 0
        self.firsts = 0
        self.wanted = 0
        self.waiter: asyncio.Future[None] | None = None

    def add(self, events: int, *, first: bool) -> None:
        if self.counting:
            self.events += events
        if first:
            self.firsts += 1
            if self.waiter is not None and self.firsts >= self.wanted and not self.waiter.done():
                self.waiter.set_result(None)


_HEAD, _BODY, _SIZE, _DATA, _CRLF, _TRAILER = range(6)


class Connection(asyncio.Protocol):
    """A keep-alive connection carrying one exchange at a time; ``on_done`` per response."""

    def __init__(self, on_done: Callable[[Connection, Exchange], None]) -> None:
        self._on_done = on_done
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._state = _HEAD
        self._left = 0
        self._nl = False  # previous payload ended in a lone "\n"
        self._tail = b""
        self._sse = False
        self.reusable = True  # False once the server said "Connection: close"
        self.request = b""  # what this connection sends (its Host header)
        self.tally: Tally | None = None
        self.ex: Exchange | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        ex, self.ex = self.ex, None
        if ex is not None:
            ex.t_end = time.perf_counter()
            self._on_done(self, ex)
        if not self.closed.done():
            self.closed.set_result(None)

    @property
    def usable(self) -> bool:
        return self._transport is not None and self.ex is None and self.reusable

    def send(self, data: bytes, ex: Exchange) -> None:
        assert self._transport is not None and self.ex is None
        self.ex = ex
        self._state, self._nl, self._tail = _HEAD, False, b""
        ex.t_send = time.perf_counter()
        self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self._buf
        buf += data
        pos = 0
        ex = self.ex
        while ex is not None:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    break
                self._head(ex, bytes(buf[pos:end]).lower())
                pos = end + 4
                if self._state == _BODY and self._left == 0:
                    ex.ok = ex.status == 200
                    self._finish(ex, now)
                    ex = None
            elif state == _BODY:
                n = min(self._left, len(buf) - pos)
                if n == 0:
                    break
                if ex.t_first == 0.0:
                    ex.t_first = now
                pos += n
                self._left -= n
                if self._left == 0:
                    ex.ok = ex.status == 200
                    self._finish(ex, now)
                    ex = None
            elif state == _SIZE:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                self._left = int(bytes(buf[pos:end]).split(b";", 1)[0], 16)
                pos = end + 2
                self._state = _DATA if self._left else _TRAILER
            elif state == _DATA:
                n = min(self._left, len(buf) - pos)
                if n == 0:
                    break
                self._payload(ex, bytes(buf[pos : pos + n]), now)
                pos += n
                self._left -= n
                if self._left == 0:
                    self._state = _CRLF
            elif state == _CRLF:
                if len(buf) - pos < 2:
                    break
                pos += 2
                self._state = _SIZE
            else:  # _TRAILER: trailer lines until a blank one
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                blank = end == pos
                pos = end + 2
                if blank:
                    ex.ok = ex.status == 200 and (ex.done_marker or not self._sse)
                    self._finish(ex, now)
                    ex = None
        del buf[:pos]

    def _head(self, ex: Exchange, head: bytes) -> None:
        ex.status = int(head[9:12])
        self._sse = b"\r\ncontent-type: text/event-stream" in head
        self.reusable = b"\r\nconnection: close" not in head
        if b"\r\ntransfer-encoding: chunked" in head:
            self._state = _SIZE
            return
        i = head.find(b"\r\ncontent-length:")
        if i < 0:  # a body delimited by the connection's end: never sent by the servers here
            raise ValueError("response without Content-Length or chunked encoding")
        end = head.find(b"\r\n", i + 2)
        self._left = int(head[i + 17 : end if end >= 0 else len(head)])
        self._state = _BODY

    def _payload(self, ex: Exchange, data: bytes, now: float) -> None:
        events = data.count(b"\n\n") + (1 if self._nl and data[:1] == b"\n" else 0)
        self._nl = data[-1:] == b"\n" and data[-2:] != b"\n\n"
        if events == 0:
            self._tail = (self._tail + data)[-16:]
            return
        joined = self._tail + data
        self._tail = joined[-16:]
        if not ex.done_marker and b"data: [DONE]" in joined:
            ex.done_marker = True
            events -= 1
        if events <= 0:
            return
        if self.tally is not None:
            self.tally.add(events, first=ex.t_first == 0.0)
        if ex.t_first == 0.0:
            ex.t_first = now
        elif ex.gaps is not None:
            ex.gaps.append(now - ex.t_last)
        if ex.gaps is not None and events > 1:
            ex.gaps.extend([0.0] * (events - 1))
        ex.t_last = now
        ex.content += events

    def _finish(self, ex: Exchange, now: float) -> None:
        ex.t_end = now
        self._state = _HEAD
        self.ex = None
        self._on_done(self, ex)


def request_bytes(host: str, port: int, body: dict[str, object], path: str = CHAT_PATH) -> bytes:
    payload = orjson.dumps(body)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def chat_body(*, stream: bool, events: int = 16, interval_ms: float = 0.0) -> dict[str, object]:
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write one sentence about load balancing."}],
        "max_tokens": events,
    }
    if stream:
        body["stream"] = True
        body["bench_interval_ms"] = interval_ms
    return body
