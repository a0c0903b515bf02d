"""The gateway's error hierarchy and the single place errors become HTTP responses.

Every failure a client can see is a ``GatewayError`` subclass carrying an HTTP status, a stable
``code`` (bounded: it is a metric label and part of the API) and whether the request may be
retried on another replica. ``render`` turns one into the OpenAI error shape
``{"error": {"message", "type", "code", "param"}}``; ``sse_error_event`` renders the same body as
the Server-Sent Event that ends a stream which failed after its first byte.

Invariants: aiohttp/asyncio exceptions are translated into these classes in ``upstream.py`` only
(with ``raise ... from exc``); nothing else in ``gateway/`` matches on aiohttp exception types.
``render`` returns status, headers and body; the HTTP server (``http_server.py``) writes them.
``ConfigError`` is for startup only and never becomes an HTTP response.
"""

from __future__ import annotations

from typing import ClassVar

import orjson


class ConfigError(Exception):
    """Invalid configuration; the CLI exits with status 2."""


class GatewayError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False  # may be retried on another replica before the first byte
    retry_after_s: ClassVar[int | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": None,
                    "code": self.code,
                }
            }
        )


class InvalidRequest(GatewayError):
    status, code = 400, "invalid_request"


class InvalidJson(InvalidRequest):
    code = "invalid_json"


class ModelRequired(InvalidRequest):
    code = "model_required"


class NotFound(GatewayError):
    status, code = 404, "not_found"


class ModelNotFound(GatewayError):
    status, code = 404, "model_not_found"


class MethodNotAllowed(GatewayError):
    status, code = 405, "method_not_allowed"


class RequestTooLarge(GatewayError):
    status, code = 413, "request_too_large"


class RequestTimeout(GatewayError):
    """The request body did not arrive within ``listen.body_timeout_s`` (slow client)."""

    status, code = 408, "request_timeout"


class HeadTooLarge(GatewayError):
    status, code = 431, "request_header_fields_too_large"


class UnsupportedMediaType(GatewayError):
    status, code = 415, "unsupported_media_type"


class NoReplicaAvailable(GatewayError):
    """No replica can take the request now (none ready for the model, or all excluded)."""

    status, code, retry_after_s = 503, "no_replica", 1


class UpstreamConnectError(GatewayError):
    """The replica could not be reached: refused, reset, or the connect timeout expired."""

    status, code, retryable = 502, "upstream_connect", True


class UpstreamDisconnected(GatewayError):
    """The replica closed the connection before or during the response.

    Retryable because the proxy retries only while no byte has reached the client; after that
    the same error ends the stream instead.
    """

    status, code, retryable = 502, "upstream_disconnected", True


class UpstreamTimeout(GatewayError):
    """No first byte within ``upstream.first_byte_timeout_s``.

    Retryable like a disconnect (before any byte reached the client, on a replica not tried
    yet): a replica that accepts connections and never answers is the case this timeout exists
    for, and the attempt also counts against its passive health. The abandoned request is
    closed, so a replica that was only slow stops working on it.
    """

    status, code, retryable = 504, "upstream_timeout", True


class UpstreamResponseInvalid(GatewayError):
    status, code = 502, "upstream_protocol"


Answer = tuple[int, list[tuple[str, str]], bytes]  # status, headers, body


def render(error: GatewayError, request_id: str | None) -> Answer:
    headers = [("Content-Type", "application/json")]
    if request_id is not None:
        headers.append(("x-request-id", request_id))
    if error.retry_after_s is not None:
        headers.append(("Retry-After", str(error.retry_after_s)))
    return error.status, headers, error.body()


def sse_error_event(error: GatewayError) -> bytes:
    """A final ``data:`` event the openai SDK raises as ``APIError`` (it checks ``error``)."""
    return b"data: " + error.body() + b"\n\n"
