"""Exact bytes over a TCP connection, for requests no HTTP client library would send (absolute
targets, dot segments, bare CRs, slow-loris pacing), and reading the answer back."""

from __future__ import annotations

import asyncio


async def raw_request(port: int, data: bytes, *, limit_s: float = 5.0) -> tuple[int, bytes]:
    """Send ``data`` (one complete request), return (status, whole response) once the server
    closes or answers with Connection: close; status 0 if it closed without answering."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(limit_s):
            head = await reader.readuntil(b"\r\n\r\n")
            length = _content_length(head)
            body = await reader.readexactly(length) if length is not None else b""
        return int(head.split(b" ", 2)[1]), head + body
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return 0, b""
        raise
    finally:
        writer.close()


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None
