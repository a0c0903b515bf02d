"""A fixed-response OpenAI-compatible replica stand-in for the proxy benchmark.

It is NOT the engine simulator: nothing is modelled, every answer is prebuilt bytes, and the
HTTP/1.1 handling is a raw ``asyncio.Protocol`` on uvloop, so one process serving all four
replica ports costs a small fraction of the proxy it feeds (the benchmark reports its CPU).

Served, on every port:

- ``POST /v1/chat/completions`` and ``/v1/completions``: with ``"stream": false`` a fixed JSON
  completion (``Content-Length``); with ``"stream": true`` an SSE stream in chunked transfer
  encoding, one HTTP chunk per event as vLLM sends it: ``events`` content events, then
  ``data: [DONE]``. ``interval_ms`` paces events (0 = the whole stream in one write, as fast as
  the socket takes it); ``hold`` keeps the stream open after its first event until the client
  leaves (idle streams for the memory test). These come from the stream shape set with
  ``POST /bench/shape`` (``{"events", "interval_ms", "hold"}``, on any port), overridden per
  request by body fields ``max_tokens``, ``bench_interval_ms`` and ``bench_hold``. The shape
  endpoint exists because a proxy may rewrite bodies: sglang-router re-serializes them and
  drops fields it does not know.
- ``GET /v1/models`` (one model, ``MODEL``), ``GET /metrics`` (a static vLLM V1 page from
  ``benchmarks.sim.exposition``, an idle replica, so the gateway's scraper parses the real
  format), ``GET /health`` and sglang-router's ``GET /get_load``.

Invariants: requests are answered in order, one at a time per connection (HTTP/1.1 without
pipelining, which no proxy here uses); only ``Content-Length`` request bodies are accepted
(411 otherwise); a paced or held stream stops the moment its connection is lost.

CLI: ``python -m benchmarks.proxy.upstream --ports 0,0,0,0`` prints ``READY p1,p2,p3,p4`` once
listening and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import msgspec
import orjson
import uvloop

from benchmarks.sim.exposition import render_metrics
from benchmarks.sim.profiles import get_profile
from benchmarks.sim.stats import EngineStats

MODEL = "bench-model"
HOST = "127.0.0.1"
_MAX_HEAD_BYTES = 64 * 1024
_CREATED = 1_700_000_000


def _head(status: str, *headers: str) -> bytes:
    return ("HTTP/1.1 " + status + "\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode()


def _json_response(obj: object, status: str = "200 OK") -> bytes:
    body = orjson.dumps(obj)
    return _head(status, "content-type: application/json", f"content-length: {len(body)}") + body


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _completion(endpoint: str) -> bytes:
    usage = {"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28}
    text = "The quick brown fox jumps over the lazy dog, again and again."
    if endpoint == "chat":
        choice: dict[str, object] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "length",
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": "length"}
        kind = "text_completion"
    obj = {
        "id": "cmpl-bench",
        "object": kind,
        "created": _CREATED,
        "model": MODEL,
        "choices": [choice],
        "usage": usage,
    }
    return _json_response(obj)


def _event(endpoint: str, *, last: bool) -> bytes:
    finish = "length" if last else None
    if endpoint == "chat":
        delta = {"content": " token"}
        choice: dict[str, object] = {"index": 0, "delta": delta, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": " token", "finish_reason": finish}
        kind = "text_completion"
    obj = {
        "id": "cmpl-bench",
        "object": kind,
        "created": _CREATED,
        "model": MODEL,
        "choices": [choice],
    }
    return _chunk(b"data: " + orjson.dumps(obj) + b"\n\n")


class _Answers:
    """Every response byte string, built once."""

    def __init__(self) -> None:
        self.completion = {e: _completion(e) for e in ("chat", "completions")}
        self.event = {e: _event(e, last=False) for e in ("chat", "completions")}
        end = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        self.last = {e: _event(e, last=True) + end for e in ("chat", "completions")}
        self.sse_head = _head(
            "200 OK",
            "content-type: text/event-stream; charset=utf-8",
            "cache-control: no-cache",
            "transfer-encoding: chunked",
        )
        models = {
            "object": "list",
            "data": [{"id": MODEL, "object": "model", "created": _CREATED, "owned_by": "bench"}],
        }
        self.models = _json_response(models)
        stats = EngineStats(get_profile("a10g-llama3-8b"))
        page = render_metrics(stats, "vllm-v1", MODEL).encode()
        self.metrics = (
            _head(
                "200 OK",
                "content-type: text/plain; version=0.0.4; charset=utf-8",
                f"content-length: {len(page)}",
            )
            + page
        )
        self.health = _head("200 OK", "content-length: 0")
        self.no_content = _head("204 No Content")
        self.shape = StreamShape()
        self.load = _json_response({"load": 0})
        self.not_found = _json_response({"error": {"message": "not found"}}, "404 Not Found")
        self.bad_request = _json_response({"error": {"message": "bad request"}}, "400 Bad Request")
        self.length_required = _json_response(
            {"error": {"message": "need a Content-Length"}}, "411 Length Required"
        )


@dataclass
class StreamShape:
    events: int = 16
    interval_ms: float = 0.0
    hold: bool = False


class _Stream:
    """One SSE response in progress: ``left`` events still to send, then ``[DONE]``."""

    __slots__ = ("endpoint", "handle", "interval_s", "left", "next_at")

    def __init__(self, endpoint: str, left: int, interval_s: float, start: float) -> None:
        self.endpoint = endpoint
        self.left = left
        self.interval_s = interval_s
        self.next_at = start
        self.handle: asyncio.TimerHandle | None = None


class _Connection(asyncio.Protocol):
    def __init__(
        self, answers: _Answers, loop: asyncio.AbstractEventLoop, open_: set[_Connection]
    ) -> None:
        self._answers = answers
        self._open = open_
        self._loop = loop
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._stream: _Stream | None = None
        self._held = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._open.discard(self)
        if self._stream is not None and self._stream.handle is not None:
            self._stream.handle.cancel()
        self._stream = None
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._stream is None and not self._held:
            self._serve_buffered()

    def _serve_buffered(self) -> None:
        buf = self._buf
        while self._transport is not None and self._stream is None and not self._held:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD_BYTES:
                    self._fail(self._answers.bad_request)
                return
            head = bytes(buf[:end]).lower()
            length = _content_length(head)
            if length is None:
                self._fail(self._answers.length_required)
                return
            if len(buf) < end + 4 + length:
                return
            body = bytes(buf[end + 4 : end + 4 + length])
            del buf[: end + 4 + length]
            self._dispatch(head, body)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, answer: bytes) -> None:
        assert self._transport is not None
        self._transport.write(answer)
        self._transport.close()

    def _dispatch(self, head: bytes, body: bytes) -> None:
        assert self._transport is not None
        line_end = head.find(b"\r\n")
        parts = (head if line_end < 0 else head[:line_end]).split(b" ")
        if len(parts) != 3:
            self._fail(self._answers.bad_request)
            return
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        a = self._answers
        if method == b"post" and target in (b"/v1/chat/completions", b"/v1/completions"):
            self._complete("chat" if target == b"/v1/chat/completions" else "completions", body)
        elif method == b"post" and target == b"/bench/shape":
            self._set_shape(body)
        elif method == b"get" and target == b"/metrics":
            self._transport.write(a.metrics)
        elif method == b"get" and target == b"/v1/models":
            self._transport.write(a.models)
        elif method == b"get" and target == b"/health":
            self._transport.write(a.health)
        elif method == b"get" and target == b"/get_load":
            self._transport.write(a.load)
        else:
            self._transport.write(a.not_found)

    def _complete(self, endpoint: str, body: bytes) -> None:
        assert self._transport is not None
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            self._fail(self._answers.bad_request)
            return
        if not isinstance(req, dict) or not req.get("stream"):
            self._transport.write(self._answers.completion[endpoint])
            return
        a = self._answers
        events = max(1, int(req.get("max_tokens", a.shape.events)))
        interval_s = float(req.get("bench_interval_ms", a.shape.interval_ms)) / 1000.0
        if req.get("bench_hold", a.shape.hold):
            self._held = True  # the client closes the connection; nothing else is served on it
            self._transport.write(a.sse_head + a.event[endpoint])
        elif interval_s <= 0.0:
            self._transport.write(a.sse_head + a.event[endpoint] * (events - 1) + a.last[endpoint])
        else:
            stream = _Stream(endpoint, events, interval_s, self._loop.time())
            self._stream = stream
            self._tick(a.sse_head)

    def _set_shape(self, body: bytes) -> None:
        assert self._transport is not None
        try:
            self._answers.shape = msgspec.json.decode(body, type=StreamShape)
        except msgspec.DecodeError:
            self._fail(self._answers.bad_request)
            return
        self._transport.write(self._answers.no_content)

    def _tick(self, head: bytes = b"") -> None:
        stream, transport = self._stream, self._transport
        if stream is None or transport is None:
            return
        stream.left -= 1
        if stream.left > 0:
            transport.write(head + self._answers.event[stream.endpoint])
            # Scheduled on the stream's own grid, so timer lateness does not accumulate.
            stream.next_at += stream.interval_s
            stream.handle = self._loop.call_at(stream.next_at, self._tick)
            return
        transport.write(head + self._answers.last[stream.endpoint])
        self._stream = None
        if self._buf:
            self._serve_buffered()


def _content_length(head: bytes) -> int | None:
    """The request body length from a lower-cased head; None when it cannot be known."""
    i = head.find(b"\r\ncontent-length:")
    if i < 0:
        return None if b"\r\ntransfer-encoding:" in head else 0
    end = head.find(b"\r\n", i + 2)
    value = head[i + 17 : end if end >= 0 else len(head)].strip()
    return int(value) if value.isdigit() else None


class Upstream:
    """The replica stand-in listening on ``ports`` (0 = any free port) of 127.0.0.1."""

    def __init__(self) -> None:
        self._answers = _Answers()
        self._servers: list[asyncio.Server] = []
        self._open: set[_Connection] = set()
        self.ports: list[int] = []

    async def start(self, ports: Sequence[int]) -> None:
        loop = asyncio.get_running_loop()
        for port in ports:
            server = await loop.create_server(
                lambda: _Connection(self._answers, loop, self._open), HOST, port, backlog=4096
            )
            self._servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])

    @property
    def urls(self) -> list[str]:
        return [f"http://{HOST}:{port}" for port in self.ports]

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for conn in list(self._open):
            conn.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()


async def _serve(ports: Sequence[int]) -> None:
    upstream = Upstream()
    await upstream.start(ports)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY " + ",".join(str(p) for p in upstream.ports), flush=True)
    await stop.wait()
    await upstream.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ports", default="0,0,0,0", help="comma-separated; 0 = any free port")
    args = parser.parse_args(argv)
    ports = [int(p) for p in args.ports.split(",")]
    uvloop.run(_serve(ports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
