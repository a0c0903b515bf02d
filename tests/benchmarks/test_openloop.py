"""The open-loop client against the replica simulator (and a tiny misbehaving SSE app).

Fast replicas (4 ms per step) and short fixed workloads keep each test well under two
seconds of real time.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from benchmarks.load.openloop import LoadConfig, run_load
from benchmarks.load.report import RequestRecord, distribution, format_table, percentile, summarize
from benchmarks.load.workloads import Workload, make_workload
from benchmarks.sim.server import ReplicaSettings, SimReplica

FAST = ReplicaSettings.fast(step_s=0.004)  # 4 ms per token, no jitter, ready at once
ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


@pytest.fixture
async def replica() -> AsyncIterator[SimReplica]:
    async with SimReplica(FAST, seed=1) as r:
        await r.wait_ready()
        yield r


def _fixed(input_len: int = 64, output_len: int = 16, seed: int = 0) -> Workload:
    return make_workload("fixed", seed, input_len=input_len, output_len=output_len)


def _max_overlap_and_mean(
    records: list[RequestRecord], start: float, end: float
) -> tuple[int, float]:
    """Requests in flight as seen from the records alone (send .. send + e2e)."""
    events = sorted(
        [(r.sent_s, 1) for r in records] + [(r.sent_s + (r.e2e_s or 0.0), -1) for r in records]
    )
    level = peak = 0
    area, last = 0.0, start
    for t, step in events:
        clipped = min(max(t, start), end)
        area += level * (clipped - last)
        last = clipped
        level += step
        peak = max(peak, level)
    return peak, area / (end - start)


async def test_open_loop_streams_records_and_reports_lateness(
    replica: SimReplica, tmp_path: Path
) -> None:
    cfg = LoadConfig(
        base_url=replica.url + "/v1", workload=_fixed(), rate=20.0, duration_s=1.5, seed=3
    )
    result = await run_load(cfg)
    n = len(result.records)
    assert 15 <= n <= 50  # Poisson(30): far outside only if the schedule is wrong
    assert replica.requests_seen == n
    for rec in result.records:
        assert rec.ok, rec
        assert rec.output_tokens == 16 and rec.status == 200
        assert rec.ttft_s is not None and rec.e2e_s is not None and rec.ttft_s < rec.e2e_s
        assert len(rec.itl_s) >= 1 and all(g >= 0 for g in rec.itl_s)
        assert rec.lateness_s is not None and rec.lateness_s >= 0
    assert [r.index for r in result.records] == list(range(n))
    s = result.summary
    assert s["requests"] == {"total": n, "ok": n, "errors": {}}
    assert s["ttft_s"]["n"] == n and s["ttft_s"]["p99"] >= s["ttft_s"]["p50"] > 0
    assert s["itl_s"]["p50"] is not None and s["tpot_s"]["p50"] > 0
    assert set(s["send_lateness_s"]) >= {"p50", "p99", "max"}
    assert s["client"]["cpu_s"] > 0 and s["config"]["model"] == replica.model

    records_path, summary_path = result.write(tmp_path / "out")
    lines = records_path.read_bytes().splitlines()
    assert len(lines) == n
    first = orjson.loads(lines[0])
    assert first["ok"] and first["ttft_s"] > 0 and first["lateness_s"] is not None
    assert orjson.loads(summary_path.read_bytes())["requests"]["ok"] == n


async def test_same_seed_sends_the_same_schedule(replica: SimReplica) -> None:
    cfg = LoadConfig(base_url=replica.url, workload=_fixed(), rate=50.0, num_requests=8, seed=5)
    a, b = await run_load(cfg), await run_load(cfg)
    assert [r.scheduled_s for r in a.records] == [r.scheduled_s for r in b.records]


async def test_completions_without_streaming(replica: SimReplica) -> None:
    cfg = LoadConfig(
        base_url=replica.url,
        workload=make_workload("sharegpt", 1, max_total_tokens=100),
        api="completions",
        stream=False,
        rate=40.0,
        num_requests=6,
    )
    result = await run_load(cfg)
    assert all(r.ok and r.ttft_s is None and r.e2e_s for r in result.records)
    assert [r.output_tokens for r in result.records] == [r.max_tokens for r in result.records]
    assert result.summary["ttft_s"]["p50"] is None  # not measured is None, never 0


async def test_closed_loop_holds_the_concurrency(replica: SimReplica) -> None:
    cfg = LoadConfig(
        base_url=replica.url, workload=_fixed(output_len=30), concurrency=4, num_requests=24
    )
    result = await run_load(cfg)
    recs = result.records
    assert len(recs) == 24 and all(r.ok for r in recs)
    assert all(r.scheduled_s is None for r in recs)
    # Judged from the records, not from the client's own counter: 4 in flight from the first
    # send until the last send, never more.
    last_send = max(r.sent_s for r in recs)
    peak, mean = _max_overlap_and_mean(recs, 0.0, last_send)
    assert peak == 4
    assert mean > 3.5  # gaps between one request and the next are client overhead only
    assert result.summary["client"]["inflight_max"] == 4


async def test_dropped_streams_are_errors_not_successes() -> None:
    async with SimReplica(replace(FAST, drop_streams_after_tokens=3)) as r:
        await r.wait_ready()
        cfg = LoadConfig(base_url=r.url, workload=_fixed(), rate=40.0, num_requests=6)
        result = await run_load(cfg)
    assert r.streams_dropped == 6
    assert not any(rec.ok for rec in result.records)
    errors = result.summary["requests"]["errors"]
    # The replica closes the connection mid-body: a broken transfer, with the tokens so far kept.
    assert errors == {"disconnect": 6}
    assert [rec.output_tokens for rec in result.records] == [3] * 6
    assert result.summary["requests"]["ok"] == 0 and result.summary["ttft_s"]["n"] == 0


async def test_http_and_connection_errors_are_classified(
    replica: SimReplica, unused_tcp_port: int
) -> None:
    wrong_model = LoadConfig(
        base_url=replica.url, model="nope", workload=_fixed(), rate=50.0, num_requests=3
    )
    result = await run_load(wrong_model)
    assert result.summary["requests"]["errors"] == {"http_404": 3}
    refused = LoadConfig(
        base_url=f"http://127.0.0.1:{unused_tcp_port}",
        model="m",
        workload=_fixed(),
        concurrency=2,
        num_requests=4,
    )
    result = await run_load(refused)
    assert result.summary["requests"]["errors"] == {"connect": 4}


def _sse_app(events: list[bytes]) -> web.Application:
    """A server that answers every chat request with exactly these SSE bytes."""

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in events:
            await resp.write(event)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


_TOKEN = b'data: {"choices":[{"index":0,"delta":{"content":" the"}}]}\n\n'


@pytest.mark.parametrize(
    ("events", "kind"),
    [
        ([_TOKEN, b'data: {"error":{"message":"boom","code":500}}\n\n'], "stream_error"),
        ([_TOKEN, _TOKEN], "missing_done"),
        ([_TOKEN, b"data: {not json\n\n", b"data: [DONE]\n\n"], "bad_response"),
        ([_TOKEN, b"data: [1, 2]\n\n", b"data: [DONE]\n\n"], "bad_response"),
    ],
    ids=["error-event", "no-done", "bad-json", "not-an-object"],
)
async def test_stream_failures_are_classified(
    aiohttp_server: ServerFactory, events: list[bytes], kind: str
) -> None:
    server = await aiohttp_server(_sse_app(events))
    cfg = LoadConfig(
        base_url=str(server.make_url("")), model="m", workload=_fixed(), concurrency=1,
        num_requests=2,
    )  # fmt: skip
    result = await run_load(cfg)
    assert result.summary["requests"]["errors"] == {kind: 2}


async def test_crlf_events_and_usage_count_tokens(aiohttp_server: ServerFactory) -> None:
    usage = b'data: {"choices":[],"usage":{"completion_tokens":5}}\r\n\r\n'
    done = b"data: [DONE]\r\n\r\n"
    server = await aiohttp_server(_sse_app([_TOKEN.replace(b"\n", b"\r\n")] * 2 + [usage, done]))
    cfg = LoadConfig(
        base_url=str(server.make_url("")), model="m", workload=_fixed(), concurrency=1,
        num_requests=1,
    )  # fmt: skip
    (rec,) = (await run_load(cfg)).records
    assert rec.ok and rec.output_tokens == 5 and len(rec.itl_s) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 1.0, "concurrency": 1, "num_requests": 1},
        {"num_requests": 1},
        {"rate": 1.0},
        {"rate": -1.0, "num_requests": 1},
        {"concurrency": 0, "num_requests": 1},
        {"rate": 1.0, "num_requests": 1, "api": "embeddings"},
    ],
    ids=["both-modes", "no-mode", "no-stop", "bad-rate", "bad-concurrency", "bad-api"],
)
def test_config_rejects_bad_combinations(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        LoadConfig(base_url="http://127.0.0.1:1", workload=_fixed(), **kwargs)


async def test_cli_writes_records_and_summary(replica: SimReplica, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.load.openloop", "--url", replica.url,
        "--rate", "30", "--num-requests", "5", "--workload", "fixed",
        "--workload-param", "input_len=32", "--workload-param", "output_len=4",
        "--out", str(tmp_path), "--no-progress",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()
    assert "TTFT" in out.decode() and "send lateness" in out.decode()
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert summary["requests"]["ok"] == 5
    assert len((tmp_path / "records.jsonl").read_bytes().splitlines()) == 5


async def test_cli_rejects_bad_arguments() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.load.openloop", "--url", "http://127.0.0.1:1",
        "--rate", "1", "--num-requests", "1", "--workload-param", "bogus=1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 2 and b"bad parameters" in err


def test_percentiles_interpolate_like_numpy_and_empty_is_none() -> None:
    xs = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 90) == pytest.approx(7.6)  # numpy.percentile(xs, 90)
    assert percentile(xs, 100) == 10.0 and percentile([5.0], 99) == 5.0
    assert percentile([], 50) is None
    assert distribution([]) == {
        "n": 0,
        "mean": None,
        "p50": None,
        "p90": None,
        "p99": None,
        "max": None,
    }


def test_summary_counts_only_successes_in_latency_and_throughput() -> None:
    good = RequestRecord(0, 10, 3, scheduled_s=0.0, sent_s=0.002, ok=True, status=200,
                         output_tokens=3, ttft_s=0.1, e2e_s=0.3, itl_s=[0.1, 0.1])  # fmt: skip
    bad = RequestRecord(1, 10, 3, scheduled_s=1.0, sent_s=1.0, error="http_503", status=503)
    s = summarize([good, bad], duration_s=2.0)
    assert s["requests"] == {"total": 2, "ok": 1, "errors": {"http_503": 1}}
    assert s["ttft_s"]["n"] == 1 and s["tpot_s"]["p50"] == pytest.approx(0.1)
    assert s["throughput"]["output_tokens_per_s"] == 1.5
    assert s["throughput"]["sent_per_s"] == 2.0
    assert s["send_lateness_s"]["max"] == pytest.approx(0.002)
    assert "TTFT" in format_table(s) and "http_503" in format_table(s)
