"""The batched access log: the same lines as kvgate's formatters, written off the loop, nothing
lost at close, and plain ``logging`` whenever logging is configured some other way."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator

import orjson
import pytest

from gateway.access_log import AccessLog
from gateway.log import AccessRecord, JsonFormatter, PlainFormatter, access_logger, setup_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def record(i: int, **fields: object) -> AccessRecord:
    base: dict[str, object] = {
        "request_id": f"r{i}",
        "method": "POST",
        "path": "/v1/chat/completions",
        "model": "m",
        "replica": "a:1",
        "status": 200,
        "duration_s": 1.5,
        "ttfb_s": 0.25,
        "attempts": 1,
        "started": 99.0,
    }
    base.update(fields)
    return AccessRecord(**base)  # type: ignore[arg-type]


def formatter_line(fmt: logging.Formatter, rec: AccessRecord, at: float) -> str:
    """What the logging formatter prints for ``rec`` logged at wall time ``at``."""
    log_record = access_logger.makeRecord(
        "gateway.access", logging.INFO, __file__, 0, "access", (), None,
        extra={"access": rec, "request_id": rec.request_id},
    )  # fmt: skip
    log_record.created = at
    log_record.msecs = int((at - int(at)) * 1000) + 0.0
    return fmt.format(log_record)


@pytest.mark.parametrize("fmt", ["plain", "json"])
async def test_lines_are_those_of_the_formatters(fmt: str, restore_logging: None) -> None:
    stream = io.StringIO()
    setup_logging("INFO", fmt, stream=stream)
    at = 1_700_000_000.123456
    log = AccessLog(wall_clock=lambda: at)
    recs = [record(1), record(2, model=None, replica=None, ttfb_s=None, error="no_replica")]
    for rec in recs:
        log.record(rec)
    log.close()
    formatter = JsonFormatter() if fmt == "json" else PlainFormatter()
    expected = [formatter_line(formatter, rec, at) for rec in recs]
    lines = stream.getvalue().splitlines()
    if fmt == "json":
        assert [orjson.loads(x) for x in lines] == [orjson.loads(x) for x in expected]
    else:
        assert lines == expected


async def test_batches_are_written_by_the_timer_and_in_order(restore_logging: None) -> None:
    stream = io.StringIO()
    setup_logging("INFO", "plain", stream=stream)
    log = AccessLog(flush_interval_s=0.01, max_batch=3)
    for i in range(7):  # two full batches flushed at once, one left for the timer
        log.record(record(i))
    log.close()
    ids = [line.split("request_id=")[1].split()[0] for line in stream.getvalue().splitlines()]
    assert ids == [f"r{i}" for i in range(7)]


async def test_a_stuck_stream_never_blocks_the_loop(restore_logging: None) -> None:
    release = threading.Event()

    class Stuck(io.StringIO):
        def write(self, s: str) -> int:
            release.wait(5.0)  # a log collector that stopped reading
            return super().write(s)

    stream = Stuck()
    setup_logging("INFO", "plain", stream=stream)
    log = AccessLog()
    log.record(record(1))
    log.flush()  # handed to the writer thread, which is now stuck
    log.record(record(2))
    log.flush()  # returns at once all the same
    release.set()
    log.close()
    assert stream.getvalue().count("INFO gateway.access access") == 2


async def test_other_logging_setups_get_log_records(
    caplog: pytest.LogCaptureFixture, restore_logging: None
) -> None:
    caplog.set_level(logging.INFO)
    log = AccessLog()
    log.record(record(1))
    assert not [r for r in caplog.records if r.name == "gateway.access"]  # batched
    log.close()
    (rec,) = [r for r in caplog.records if r.name == "gateway.access"]
    assert rec.request_id == "r1"  # type: ignore[attr-defined]
