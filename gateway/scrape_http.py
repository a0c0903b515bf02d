"""The scraper's HTTP/1.1 client: one kept-alive connection per replica, GETs of its metrics page.

Not aiohttp's client: a scrape is the same tiny GET hundreds of times a second, on the event loop
the proxy shares (``gateway/scraper.py`` owns when and what to scrape; this module only fetches).
Errors are ``ScrapeError`` with a reason from the scraper's bounded ``REASONS``.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

MAX_PAGE_BYTES = 8 * 1024 * 1024  # real pages are tens of KB; bound memory on a broken replica

# Uncompressed: gzip would cost more CPU on both ends than it saves on a cluster network.
_REQUEST_HEADERS = (
    "User-Agent: kvgate-scraper\r\nAccept: text/plain\r\nAccept-Encoding: identity\r\n\r\n"
)


class ScrapeError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class ScrapeConnection:
    """One keep-alive HTTP/1.1 connection to one replica, for GETs of its metrics page.

    Not aiohttp's client: a scrape is the same tiny GET hundreds of times a second, and aiohttp
    spends ~200 µs of CPU on each where this spends ~60 µs (benchmarks/routing_core.py), on the
    event loop the proxy shares. It reads Content-Length, chunked and close-delimited bodies, at
    most MAX_PAGE_BYTES; any error or cancellation (the scrape timeout) closes the connection
    and the next scrape reconnects. A reused connection that the replica closed while idle is
    retried once on a fresh one before the failure counts.
    """

    _tls: ssl.SSLContext | None = None  # one default context for all replicas (costly to build)

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"cannot scrape {url!r}: not an http(s) URL")
        self._host = parts.hostname
        self._tls_wanted = parts.scheme == "https"
        self._port = parts.port or (443 if self._tls_wanted else 80)
        self._authority = parts.netloc.rpartition("@")[2]
        self._prefix = parts.path.rstrip("/")
        self._requests: dict[str, bytes] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        reused = self._writer is not None
        try:
            return await self._exchange(path)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            partial = isinstance(exc, asyncio.IncompleteReadError) and exc.partial
            if not reused or partial:
                raise
        return await self._exchange(path)

    async def _exchange(self, path: str) -> tuple[int, dict[str, str], bytes]:
        if self._writer is None:
            tls = None
            if self._tls_wanted:
                tls = ScrapeConnection._tls = ScrapeConnection._tls or ssl.create_default_context()
            self._reader, self._writer = await asyncio.open_connection(
                self._host, self._port, ssl=tls
            )
        reader, writer = self._reader, self._writer
        assert reader is not None
        keep = False
        try:
            request = self._requests.get(path)
            if request is None:
                request = self._requests[path] = (
                    f"GET {self._prefix}{path} HTTP/1.1\r\nHost: {self._authority}\r\n"
                    + _REQUEST_HEADERS
                ).encode("latin-1")
            writer.write(request)
            status, headers = await _read_head(reader)
            body = await _read_body(reader, headers)
            keep = headers.get("connection", "").lower() != "close"
            return status, headers, body
        finally:
            if not keep:
                self.close()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    while True:
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1."):
            raise ScrapeError("protocol", f"not an HTTP/1.x response: {lines[0][:40]!r}")
        status = int(rest[:3])
        if status >= 200:
            break  # 1xx interim responses carry no body
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if version == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
        headers["connection"] = "close"
    return status, headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks: list[bytes] = []
        size = 0
        while n := int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16):
            size += n
            if size > MAX_PAGE_BYTES:
                raise ScrapeError("too_large", f"page exceeds {MAX_PAGE_BYTES} bytes")
            chunks.append(await reader.readexactly(n))
            await reader.readexactly(2)
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass  # trailers
        return b"".join(chunks)
    length = headers.get("content-length")
    if length is not None:
        if int(length) > MAX_PAGE_BYTES:
            raise ScrapeError("too_large", f"page of {length} bytes exceeds {MAX_PAGE_BYTES}")
        return await reader.readexactly(int(length))
    headers["connection"] = "close"  # the body ends where the connection does
    body = await reader.read(MAX_PAGE_BYTES + 1)
    while len(body) <= MAX_PAGE_BYTES and (more := await reader.read(MAX_PAGE_BYTES + 1)):
        body += more
    if len(body) > MAX_PAGE_BYTES:
        raise ScrapeError("too_large", f"page exceeds {MAX_PAGE_BYTES} bytes")
    return body
