"""Mutation fuzzing of the API port's HTTP/1.1 layer (``gateway/http_server.py``): mangled
requests (flipped, inserted, deleted and duplicated bytes; stray CR, LF, NUL and spaces; wrong
lengths; truncation) sent in random pieces to a real gateway in front of a simulated replica.

Properties: every connection ends with well-formed HTTP responses or a plain close, never a 500
or a traceback; the gateway keeps serving; nothing stays in flight on either side. Seeded
(``random.Random``) and bounded for CI: 240 cases, 24 at a time, short header and body timeouts
so that a truncated request ends in a second."""

from __future__ import annotations

import asyncio
import logging
import random
import re

import orjson
import pytest

from benchmarks.sim.server import SimReplica
from gateway.app import GatewayServer
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import StartGateway, post_chat

CASES = 240
AT_ONCE = 24
_STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ")
# Statuses a mangled request may get; 5xx would mean the gateway itself broke.
ALLOWED = {200, 400, 404, 405, 408, 413, 415, 431}


def _seeds(model: str) -> list[bytes]:
    body = orjson.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    )
    chat = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    chunked = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
    )
    models = b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n"
    return [chat, chunked, models, chat + models, models + chat]


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(buf) + 1)
        kind = rng.randrange(6)
        if kind == 0 and buf:  # flip a byte
            buf[min(at, len(buf) - 1)] = rng.randrange(256)
        elif kind == 1:  # insert framing-significant bytes
            buf[at:at] = rng.choice([b"\r", b"\n", b"\r\n", b"\x00", b" ", b":", b"\t"])
        elif kind == 2:  # insert random bytes
            buf[at:at] = rng.randbytes(rng.randint(1, 8))
        elif kind == 3 and buf:  # delete a range
            del buf[at : at + rng.randint(1, 12)]
        elif kind == 4 and buf:  # duplicate a range
            buf[at:at] = buf[at : at + rng.randint(1, 40)]
        elif kind == 5:  # truncate
            del buf[at:]
    return bytes(buf)


async def _exchange(port: int, data: bytes, rng: random.Random) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        pos = 0
        while pos < len(data):  # random pieces: the parser must not care where reads split
            step = rng.randint(1, 64)
            writer.write(data[pos : pos + step])
            pos += step
            if rng.random() < 0.2:
                await writer.drain()
        await writer.drain()
        async with asyncio.timeout(5.0):  # the gateway answers or closes within its timeouts
            return await reader.read()
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def test_mangled_requests_get_well_formed_answers_or_a_close(
    start_replicas: StartReplicas, start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    (replica,) = await start_replicas(1)
    server: GatewayServer = await start_gateway(
        [replica.url], listen={"host": "127.0.0.1", "port": 0, "header_timeout_s": 0.4,
                               "body_timeout_s": 0.4},
    )  # fmt: skip
    caplog.set_level(logging.WARNING)
    rng = random.Random(20261121)
    seeds = _seeds(replica.model)
    cases = [_mutate(rng.choice(seeds), rng) for _ in range(CASES)]
    statuses: list[int] = []
    for first in range(0, CASES, AT_ONCE):
        batch = cases[first : first + AT_ONCE]
        sends = [_exchange(server.port, c, random.Random(first + i)) for i, c in enumerate(batch)]
        answers = await asyncio.gather(*sends)
        for case, answer in zip(batch, answers, strict=True):
            found = [int(m[1]) for m in _STATUS_LINE.finditer(answer)]
            assert answer == b"" or answer.startswith(b"HTTP/1.1 "), (case, answer[:200])
            assert set(found) <= ALLOWED, (case, answer[:400])
            statuses += found
    assert {400, 200} <= set(statuses)  # the mutations reach both the parser and the proxy
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    await _settled(replica, server)
    body = {"model": replica.model, "messages": [{"role": "user", "content": "hi"}]}
    status, _ = await post_chat(server, body)
    assert status == 200  # and the gateway still serves


async def _settled(replica: SimReplica, server: GatewayServer) -> None:
    """In flight back to 0 on both sides (streams the fuzzer left are aborted, not leaked)."""
    pool = server.gateway.pool
    async with asyncio.timeout(5.0):
        while pool.total_inflight() or replica.inflight_requests:
            await replica.wait_for(lambda r: r.inflight_requests == 0)
            if pool.total_inflight():
                await pool.capacity.wait()
