"""The proxy benchmark's mechanics: the upstream's answers, the client's framing, the report's
arithmetic, nginx's config, and one short harness run (direct and kvgate, CPU per request).

No timing goal is asserted here (those live in the benchmark's output); the paced-stream test
only checks a lower bound that scheduling cannot violate (events are never early).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import orjson
import pytest

from benchmarks.proxy import nginx, report
from benchmarks.proxy.accounting import Watched
from benchmarks.proxy.loadgen import run_closed, run_streams, summary_ms
from benchmarks.proxy.run import Plan, parse_wrk, run_benchmark
from benchmarks.proxy.upstream import MODEL, Upstream
from gateway.engine_metrics import detect_engine, names_for, parse_engine_metrics


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start([0, 0])
    yield up
    await up.close()


def _sse_events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e]


async def test_upstream_non_streaming_answers(upstream: Upstream) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(upstream.urls[0] + "/v1/chat/completions", json={"model": MODEL}) as r:
            assert r.status == 200
            chat = await r.json()
        async with s.post(upstream.urls[1] + "/v1/completions", json={"model": MODEL}) as r:
            completion = await r.json()
        async with s.get(upstream.urls[0] + "/v1/models") as r:
            models = await r.json()
        async with s.get(upstream.urls[0] + "/nope") as r:
            assert r.status == 404
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] == 16
    assert completion["object"] == "text_completion"
    assert completion["choices"][0]["text"]
    assert [m["id"] for m in models["data"]] == [MODEL]


async def test_upstream_metrics_page_is_what_the_scraper_reads(upstream: Upstream) -> None:
    async with aiohttp.ClientSession() as s, s.get(upstream.urls[0] + "/metrics") as r:
        page = await r.text()
    engine = detect_engine(page)
    assert engine == "vllm-v1"
    sample = parse_engine_metrics(page, engine, names_for(engine))
    assert (sample.queue_depth, sample.running, sample.kv_usage) == (0, 0, 0.0)


async def test_upstream_streams_events_then_done(upstream: Upstream) -> None:
    body = {"model": MODEL, "stream": True, "max_tokens": 5}
    url = upstream.urls[0] + "/v1/chat/completions"
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        assert r.content_type == "text/event-stream"
        events = _sse_events(await r.read())
    assert events[-1] == b"data: [DONE]"
    chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert len(chunks) == 5
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["length"]


async def test_stream_shape_is_the_default_and_paced_events_are_never_early(
    upstream: Upstream,
) -> None:
    async with aiohttp.ClientSession() as s:
        shape = {"events": 3, "interval_ms": 20.0, "hold": False}
        async with s.post(upstream.urls[1] + "/bench/shape", json=shape) as r:
            assert r.status == 204
        started = time.perf_counter()
        body = {"model": MODEL, "stream": True}  # no max_tokens: the shape decides
        async with s.post(upstream.urls[0] + "/v1/completions", json=body) as r:
            events = _sse_events(await r.read())
        elapsed = time.perf_counter() - started
    assert len(events) == 4  # 3 content events and [DONE]
    assert elapsed >= 0.040  # the third event is due 2 intervals after the first


async def test_client_counts_events_and_cpu_of_watched_processes(upstream: Upstream) -> None:
    addrs = [("127.0.0.1", p) for p in upstream.ports]
    watched = Watched()
    streams = await run_streams(
        addrs,
        concurrency=4,
        events=10,
        interval_ms=0.0,
        warmup_s=0.05,
        duration_s=0.3,
        watched=watched,
    )
    assert streams["errors"] == 0
    assert streams["streams"] > 0
    assert streams["events"] == streams["streams"] * 10  # each stream whole, [DONE] not counted
    closed = await run_closed(addrs, concurrency=4, warmup_s=0.05, duration_s=0.3, watched=watched)
    assert closed["errors"] == 0 and closed["requests"] > 0
    assert closed["cpu_s"]["loadgen"] > 0


def test_summary_percentiles_are_nearest_rank() -> None:
    s = summary_ms([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert (s["n"], s["p50"], s["p99"], s["max"]) == (100, 50.0, 99.0, 100.0)
    assert summary_ms([]) == {"n": 0}


def test_report_adds_latency_over_direct_per_repetition_then_takes_medians() -> None:
    def rep(direct_p99: float, kvgate_p99: float, cpu: float) -> dict[str, object]:
        open_ = {"latency_ms": {"p50": 0.2, "p99": direct_p99}, "errors": 0}
        kv_open = {
            "latency_ms": {"p50": 0.3, "p99": kvgate_p99},
            "errors": 0,
            "requests": 1000,
            "cpu_s": {"proxy": cpu},
        }
        return {"direct": {"open": {"1500": open_}}, "kvgate": {"open": {"1500": kv_open}}}

    raw = {"targets": ["direct", "kvgate"], "reps": [rep(1.0, 1.5, 0.05), rep(5.0, 5.2, 0.06)]}
    summary = report.summarize(raw)
    added = summary["kvgate"]["open1500_added_p99_ms"]
    assert added["values"] == pytest.approx([0.5, 0.2])
    assert added["median"] == pytest.approx(0.35)
    assert summary["kvgate"]["open1500_cpu_us_per_request"]["median"] == pytest.approx(55.0)
    verdicts = {g["goal"]: g for g in report.goals(summary)}
    assert verdicts["open_p99"]["met"] == {"kvgate": True}
    assert verdicts["open_p50"]["values"]["kvgate"] == pytest.approx(0.1)
    assert "direct" not in verdicts["open_p50"]["values"]


def test_relative_goals_compare_with_each_rust_router_in_the_same_repetition() -> None:
    def paced(cpu_s: float) -> dict[str, object]:
        return {"paced": {"events": 10_000, "cpu_s": {"proxy": cpu_s}}}

    # µs per chunk: kvgate 30 then 40; sglang-router 40 then 30; vllm-router level with kvgate.
    reps = [
        {"kvgate": paced(0.3), "sglang-router": paced(0.4), "vllm-router": paced(0.3)},
        {"kvgate": paced(0.4), "sglang-router": paced(0.3), "vllm-router": paced(0.4)},
    ]
    targets = ["kvgate", "sglang-router", "vllm-router"]
    summary = report.summarize({"targets": targets, "reps": reps})
    ratio = summary["kvgate"]["chunk_cpu_x_sglang-router"]
    assert ratio["values"] == pytest.approx([0.75, 4 / 3])  # per repetition, not of medians
    verdicts = {g["goal"]: g for g in report.goals(summary)}
    assert verdicts["chunk_cpu_sglang"]["values"]["kvgate"] == pytest.approx((0.75 + 4 / 3) / 2)
    assert verdicts["chunk_cpu_sglang"]["met"]["kvgate"] is False
    # Level with vllm-router in every repetition: "below" is strict, so level is not met.
    assert verdicts["chunk_cpu_vllm"]["values"]["kvgate"] == 1.0
    assert verdicts["chunk_cpu_vllm"]["met"]["kvgate"] is False
    assert "sglang-router" not in verdicts["chunk_cpu_sglang"]["values"]  # not with itself


WRK_OUTPUT = """Running 2s test @ http://127.0.0.1:8080/v1/chat/completions
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.31ms    1.01ms  17.56ms   86.60%
    Req/Sec    28.50k     2.10k   31.40k    80.00%
  Latency Distribution
     50%    2.12ms
     75%    2.60ms
     90%    3.30ms
     99%  850.00us
  56741 requests in 2.00s, 25.02MB read
  Non-2xx or 3xx responses: 5
Requests/sec:  28360.23
Transfer/sec:     12.51MB
"""


def test_parse_wrk() -> None:
    parsed = parse_wrk(WRK_OUTPUT)
    assert parsed["requests"] == 56741
    assert parsed["rps"] == pytest.approx(28360.23)
    assert parsed["errors"] == 5
    assert parsed["latency_ms"] == pytest.approx({"p50": 2.12, "p75": 2.6, "p90": 3.3, "p99": 0.85})


@pytest.mark.skipif(nginx.nginx_binary() is None, reason="nginx not installed (make proxy-deps)")
def test_nginx_accepts_the_generated_config(tmp_path: Path) -> None:
    binary = nginx.nginx_binary()
    assert binary is not None
    conf = nginx.write_config(tmp_path, port=18999, replica_ports=[18001, 18002, 18003, 18004])
    cmd = [*nginx.command(binary, tmp_path, conf), "-t", "-q"]
    out = subprocess.run(cmd, capture_output=True, timeout=10, check=False)
    assert out.returncode == 0, out.stderr.decode()
    text = conf.read_text()
    assert "proxy_buffering off;" in text and "random two least_conn;" in text


async def test_harness_measures_cpu_per_request_for_direct_and_kvgate(tmp_path: Path) -> None:
    plan = replace(
        Plan.quick(),
        targets=("direct", "kvgate"),
        tests=("max_rps",),
        max_rps_s=1,
        warmup_s=0.3,
        use_wrk=False,
        nice=0,
        realtime_tests=(),
    )
    # run_benchmark blocks (subprocesses); keep the test's loop free while it runs.
    result = await asyncio.to_thread(
        run_benchmark, plan, pin=False, workdir=tmp_path, log=lambda _: None
    )
    summary = result["summary"]
    assert isinstance(summary, dict)
    assert summary["kvgate"]["cpu_us_per_request"]["median"] > 0
    assert summary["direct"]["max_rps"]["median"] > 0
    assert summary["kvgate"]["max_rps_errors"]["median"] == 0
    assert summary["kvgate"]["max_rps_x_direct"]["median"] > 0
    assert "cpu_us_per_request" not in summary["direct"]  # direct has no proxy process
    assert {g["goal"] for g in result["goals"]} >= {"request_cpu", "chunk_cpu", "idle_memory"}
    assert "| kvgate |" in report.markdown(result)
