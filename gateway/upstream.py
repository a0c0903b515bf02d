"""Header rules for requests to replicas and back, the control-plane client, and the one place
aiohttp client exceptions are translated.

The data path's client is ``gateway/replica_client.py`` (keep-alive connections on asyncio
protocols, its own errors raised as ``gateway.errors`` classes directly); this module keeps what
both sides share: which headers are hop-by-hop and how forwarded headers are built
(``request_fields``/``response_fields``), the ``reason`` label of an upstream error, and the
aiohttp-based GET used for model lists (``fetch_json``).

Invariants:

* aiohttp/asyncio client exceptions are caught here and only here, and re-raised as
  ``gateway.errors`` classes with ``from exc`` (the httpx ``map_exceptions`` pattern).
* Hop-by-hop headers (and those a ``Connection`` header lists) are stripped in both directions;
  ``X-Forwarded-For`` gains the client's address; ``x-request-id`` is the gateway's.
* A control-plane body is bounded (``MAX_CONTROL_BODY_BYTES``).
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from gateway.errors import (
    GatewayError,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamResponseInvalid,
    UpstreamTimeout,
)

# RFC 9110 §7.6.1 plus the legacy names proxies strip.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# A replica's answers worth another replica's try (before the client got a byte): overloaded or
# unreachable behind a sidecar, not a verdict on the request.
RETRY_STATUSES = (502, 503)

_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect"}
# Length and framing are the gateway's own; Date/Server are set by the gateway's HTTP server.
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "date", "server"}


def _dropped(raw: list[tuple[bytes, bytes]], base: frozenset[bytes]) -> frozenset[bytes]:
    """``base`` plus the names a ``Connection`` header lists (hop-by-hop by declaration)."""
    drop = base
    for name, value in raw:
        if len(name) == 10 and name.lower() == b"connection":
            drop = drop | {token.strip().lower() for token in value.split(b",")}
    return drop


_REQUEST_DROP_BYTES = frozenset(name.encode() for name in _REQUEST_DROP | {"x-request-id"})


def request_fields(
    raw: list[tuple[bytes, bytes]],
    *,
    client_ip: str | None,
    request_id: str,
    forward_auth: bool,
    authorization: str | None,
) -> bytes:
    """The header lines of a forwarded request, built from the client's raw header lines in
    one pass, as bytes (no per-request header dict).

    The client's names and values come from llhttp, which refuses CR, LF and NUL in them; what
    is added here (the peer address, a validated request id, a token without whitespace) has
    none either, so the lines cannot split.
    """
    drop = _dropped(raw, _REQUEST_DROP_BYTES)
    lines: list[bytes] = []
    forwarded: list[bytes] = []
    typed = False
    for name, value in raw:
        lower = name.lower()
        if lower in drop:
            continue
        if lower == b"x-forwarded-for":
            forwarded.append(value)
            continue
        if lower == b"authorization" and (authorization is not None or not forward_auth):
            continue
        if lower == b"content-type":
            typed = True
        lines.append(b"%b: %b\r\n" % (name, value))
    if client_ip:
        forwarded.append(client_ip.encode())
    if forwarded:
        lines.append(b"X-Forwarded-For: %b\r\n" % b", ".join(forwarded))
    if authorization is not None:
        lines.append(b"Authorization: %b\r\n" % authorization.encode())
    if not typed:
        lines.append(b"Content-Type: application/json\r\n")
    lines.append(b"x-request-id: %b\r\n" % request_id.encode())
    return b"".join(lines)


_RESPONSE_DROP_BYTES = frozenset(name.encode() for name in _RESPONSE_DROP | {"x-request-id"})


def response_fields(raw: list[tuple[bytes, bytes]], request_id: str) -> bytes:
    """The header lines of a relayed response: the replica's (as ``replica_client`` parsed
    and checked them), less hop-by-hop, framing, Date and Server, plus the gateway's
    ``x-request-id``; one pass, as bytes."""
    drop = _dropped(raw, _RESPONSE_DROP_BYTES)
    lines = [b"%b: %b\r\n" % (name, value) for name, value in raw if name.lower() not in drop]
    lines.append(b"x-request-id: %b\r\n" % request_id.encode())
    return b"".join(lines)


def translate(exc: BaseException, first_byte_timeout_s: float) -> BaseException:
    """The gateway error for a client exception; anything else (cancellation) unchanged."""
    if isinstance(exc, aiohttp.ServerTimeoutError):  # sock_connect
        return UpstreamConnectError(f"connect timeout: {exc}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamConnectError(f"cannot connect to replica: {exc.os_error.strerror or exc}")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return UpstreamDisconnected(f"replica closed the connection: {type(exc).__name__}")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamDisconnected(f"replica response truncated: {type(exc).__name__}")
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientError):
        return UpstreamResponseInvalid(f"invalid response from replica: {type(exc).__name__}")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"no response from replica within {first_byte_timeout_s:g} s")
    return exc


def error_reason(error: GatewayError) -> str:
    """The bounded ``reason`` label of kvgate_upstream_errors_total for an upstream error."""
    if isinstance(error, UpstreamConnectError):
        return "connect"
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    if isinstance(error, UpstreamDisconnected):
        return "disconnect"
    return "protocol"


def join_url(base: str, path: str, query: str = "") -> str:
    url = base.rstrip("/") + path
    return f"{url}?{query}" if query else url


MAX_CONTROL_BODY_BYTES = 4 * 1024 * 1024  # a model list is a few KB


def credential_hint(status: int) -> str:
    """What to add to a control-plane call's failure when the replica wants a credential."""
    if status in (401, 403):
        return " (does the replica require an API key? see upstream.api_key_file)"
    return ""


async def fetch_json(
    session: aiohttp.ClientSession, url: str, *, timeout_s: float, authorization: str | None = None
) -> object:
    """GET ``url`` and decode its JSON body (control-plane calls: model lists).

    ``authorization``: the gateway's own ``Authorization`` value for the replica, if any; it is
    sent, never part of an error message.
    """
    headers = None if authorization is None else {"Authorization": authorization}
    try:
        async with asyncio.timeout(timeout_s), session.get(url, headers=headers) as resp:
            # Bounded: a broken or hostile replica must not make the gateway buffer gigabytes.
            body = b""
            while chunk := await resp.content.read(MAX_CONTROL_BODY_BYTES + 1 - len(body)):
                body += chunk
                if len(body) > MAX_CONTROL_BODY_BYTES:
                    raise UpstreamResponseInvalid(f"GET {url}: over {MAX_CONTROL_BODY_BYTES} bytes")
            if resp.status != 200:
                raise UpstreamResponseInvalid(
                    f"GET {url} answered {resp.status}{credential_hint(resp.status)}"
                )
    except GatewayError:
        raise
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise translate(exc, timeout_s) from exc
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise UpstreamResponseInvalid(f"GET {url} returned invalid JSON") from exc
