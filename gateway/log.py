"""Logging setup (plain or JSON lines), the request-id context and the access line.

Invariants: prompts, bodies and headers are never logged — the access line carries only the
fields of ``AccessRecord``. Every record logged while a request is handled carries its request
id (a contextvar set by the request middleware), so a request's lines can be found together.
Named ``log.py`` so it does not shadow the standard library's ``logging``.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from dataclasses import asdict, dataclass
from typing import TextIO

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kvgate_request_id", default=None
)

access_logger = logging.getLogger("gateway.access")


@dataclass(slots=True)
class AccessRecord:
    """One request as the access log reports it; filled in as the request progresses."""

    request_id: str
    method: str
    path: str
    model: str | None = None
    replica: str | None = None
    status: int = 0
    duration_s: float = 0.0
    ttfb_s: float | None = None  # time to the first response byte sent to the client
    attempts: int = 0
    error: str | None = None  # GatewayError.code when the gateway produced the status
    key: str | None = None  # the client API key's name (auth on); never the key itself
    started: float = 0.0  # clock reading at arrival (not logged)
    priority: int = 0  # the key's priority class value (not logged)

    def fields(self) -> dict[str, object]:
        out = asdict(self)
        del out["started"], out["priority"]
        return out


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        access = getattr(record, "access", None)
        if isinstance(access, AccessRecord):
            fields = " ".join(f"{k}={_plain(v)}" for k, v in access.fields().items())
            return f"{line} {fields}"
        rid = getattr(record, "request_id", None)
        return f"{line} request_id={rid}" if rid else line


def _plain(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, AccessRecord):
            out.update(access.fields())
        else:
            rid = getattr(record, "request_id", None)
            if rid:
                out["request_id"] = rid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


def setup_logging(level: str, fmt: str, *, stream: TextIO | None = None) -> None:
    """Configure the root logger once, at process start (the CLI calls this)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # aiohttp's own access log is replaced by ours (one line per request, no headers).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def log_access(record: AccessRecord) -> None:
    access_logger.info("access", extra={"access": record, "request_id": record.request_id})
