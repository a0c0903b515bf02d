"""The access log, off the request path: records are batched and written by a writer thread.

``AccessLog.record`` costs an append per request; every ``flush_interval_s`` (or every
``max_batch`` records) the batch is turned into lines and handed over in one piece. When logging
is set up the way ``gateway.log.setup_logging`` does it (one stream handler with kvgate's plain
or JSON formatter on the root logger), the lines are formatted here with one f-string each —
byte-for-byte what those formatters print, without a ``LogRecord``, ``dataclasses.asdict`` or
``Formatter`` per request — and a writer thread writes them, so a stderr pipe to a slow log
collector never stalls the event loop. Under any other logging configuration (tests capturing
records, a custom handler), each record goes through ``logging`` as before, still batched.

Invariants: the access line carries only ``AccessRecord``'s fields (never prompts, bodies or
headers); every recorded request is written exactly once, in order, and ``close`` writes what
is left (graceful shutdown loses no line).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TextIO

import orjson

from gateway.log import AccessRecord, JsonFormatter, PlainFormatter, access_logger, log_access

logger = logging.getLogger(__name__)

_FLUSH_INTERVAL_S = 0.05
_MAX_BATCH = 512


class AccessLog:
    """One gateway's access lines, batched."""

    def __init__(
        self,
        *,
        wall_clock: Callable[[], float] = time.time,
        flush_interval_s: float = _FLUSH_INTERVAL_S,
        max_batch: int = _MAX_BATCH,
    ) -> None:
        self._wall = wall_clock
        self._interval = flush_interval_s
        self._max_batch = max_batch
        self._batch: list[tuple[float, AccessRecord]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._writer: _Writer | None = None
        self._stamps = _Timestamps()

    def record(self, rec: AccessRecord) -> None:
        batch = self._batch
        batch.append((self._wall(), rec))
        if len(batch) >= self._max_batch:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        target = _fast_target()
        if target is None:
            for _, rec in batch:
                log_access(rec)
            return
        handler, json = target
        fmt = self._stamps.json_line if json else self._stamps.plain_line
        text = "".join([fmt(at, rec) for at, rec in batch])
        writer = self._writer
        if writer is None or writer.handler is not handler:
            if writer is not None:
                writer.close()
            writer = self._writer = _Writer(handler)
        writer.put(text)

    def close(self, timeout_s: float = 2.0) -> None:
        """Write what is batched and wait (bounded) until the writer has written it."""
        self.flush()
        if self._writer is not None:
            self._writer.close(timeout_s)
            self._writer = None


def _fast_target() -> tuple[logging.StreamHandler[TextIO], bool] | None:
    """The stream handler to write to directly, and whether it formats JSON; None when
    logging is configured any other way than ``setup_logging`` does."""
    if not access_logger.isEnabledFor(logging.INFO):
        return None
    if access_logger.handlers or access_logger.filters or not access_logger.propagate:
        return None
    root = logging.getLogger()
    if len(root.handlers) != 1 or root.filters:
        return None
    handler = root.handlers[0]
    if type(handler) is not logging.StreamHandler or handler.level > logging.INFO:
        return None
    kind = type(handler.formatter)
    if kind is JsonFormatter:
        return handler, True
    if kind is PlainFormatter:
        return handler, False
    return None


class _Timestamps:
    """The two line formats, with the timestamp text cached per second."""

    def __init__(self) -> None:
        self._plain_at = -1
        self._plain_text = ""
        self._json_at = -1
        self._json_text = ""

    def plain_line(self, at: float, r: AccessRecord) -> str:
        sec = int(at)
        if sec != self._plain_at:
            self._plain_at = sec
            self._plain_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))
        ms = int((at - sec) * 1000)
        ttfb = "-" if r.ttfb_s is None else f"{r.ttfb_s:.6f}"
        return (
            f"{self._plain_text},{ms:03d} INFO gateway.access access request_id={r.request_id} "
            f"method={r.method} path={r.path} model={_dash(r.model)} "
            f"replica={_dash(r.replica)} status={r.status} duration_s={r.duration_s:.6f} "
            f"ttfb_s={ttfb} attempts={r.attempts} error={_dash(r.error)} key={_dash(r.key)}\n"
        )

    def json_line(self, at: float, r: AccessRecord) -> str:
        sec = int(at)
        if sec != self._json_at:
            self._json_at = sec
            self._json_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        ms = int((at - sec) * 1000)
        doc = {
            "ts": f"{self._json_text}.{ms:03d}Z",
            "level": "INFO",
            "logger": "gateway.access",
            "msg": "access",
            "request_id": r.request_id,
            "method": r.method,
            "path": r.path,
            "model": r.model,
            "replica": r.replica,
            "status": r.status,
            "duration_s": r.duration_s,
            "ttfb_s": r.ttfb_s,
            "attempts": r.attempts,
            "error": r.error,
            "key": r.key,
        }
        return orjson.dumps(doc).decode() + "\n"


def _dash(value: str | None) -> str:
    return "-" if value is None else value


class _Writer:
    """A daemon thread writing batches to a handler's stream, under the handler's lock (the
    loop thread's own log records go through the same handler)."""

    def __init__(self, handler: logging.StreamHandler[TextIO]) -> None:
        self.handler = handler
        self._queue: queue.SimpleQueue[str | threading.Event] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="kvgate-access-log", daemon=True)
        self._worker.start()

    def put(self, text: str) -> None:
        self._queue.put(text)

    def close(self, timeout_s: float = 2.0) -> None:
        done = threading.Event()
        self._queue.put(done)
        if not done.wait(timeout_s):
            logger.warning("the access log writer did not finish within %.1f s", timeout_s)

    def _run(self) -> None:
        handler = self.handler
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
                return
            try:
                with handler.lock or threading.Lock():
                    handler.stream.write(item)
                    handler.stream.flush()
            except (OSError, ValueError) as exc:  # a closed or broken stream: say so, go on
                if logging.lastResort is not None:
                    logging.lastResort.handle(
                        logging.makeLogRecord({"msg": f"access log write failed: {exc!r}"})
                    )
