"""The exporter: the concurrency signal, per-request accounting (TTFT, ITL, tokens, queue wait),
the pool aggregates and per-replica gauges, bounded model labels, and series that leave.

Pure parts (usage parsing, the token estimate, the collector over a hand-built pool with an
injected clock) are tested directly; the request accounting through a real gateway in front of
simulated replicas.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry

from benchmarks.sim.server import ReplicaSettings
from gateway.app import GatewayServer
from gateway.engine_metrics import EngineSample
from gateway.exporter import GatewayMetrics, ModelLabels, ReplicaStateCollector
from gateway.pool import ReplicaPool
from gateway.usage import stream_token_estimate, usage_tokens
from policies.types import ReplicaId
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import StartGateway, sample, wait_pool

# --- usage and the token estimate --------------------------------------------------------------

_ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
_TOKEN = b'data: {"choices":[{"index":0,"delta":{"content":" w"}}],"usage":null}\n\n'
_USAGE = (
    b'data: {"choices":[],"usage":{"prompt_tokens":12,"total_tokens":19,'
    b'"completion_tokens":7,"prompt_tokens_details":{"cached_tokens":0}}}\n\n'
)
_DONE = b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("buf", "expected"),
    [
        (_TOKEN * 3 + _USAGE + _DONE, (12, 7)),
        (_TOKEN * 3 + _DONE, None),  # only "usage": null
        (b'{"id":"x","choices":[],"usage": {"completion_tokens": 5, "prompt_tokens": 3}}', (3, 5)),
        (b'{"object":"list","data":[],"usage":{"prompt_tokens":9,"total_tokens":9}}', (9, 0)),
        (b'{"choices":[{"text":"say \\"usage\\": {1}"}]}', None),  # inside a string
        (b"", None),
    ],
    ids=["stream-usage-chunk", "usage-null", "spaces-and-order", "embeddings", "escaped", "empty"],
)
def test_usage_tokens(buf: bytes, expected: tuple[int, int] | None) -> None:
    assert usage_tokens(buf) == expected


@pytest.mark.parametrize(
    ("stream", "chat", "tokens"),
    [
        (_ROLE + _TOKEN * 5 + _DONE, True, 5),
        (_TOKEN * 5 + _DONE, False, 5),
        ((_ROLE + _TOKEN * 5 + _DONE).replace(b"\n", b"\r\n"), True, 5),
        (_ROLE + _TOKEN * 2, True, 2),  # cut before [DONE]
        (_ROLE, True, 0),
    ],
    ids=["chat", "completions", "crlf", "no-done", "role-only"],
)
def test_stream_token_estimate(stream: bytes, chat: bool, tokens: int) -> None:
    assert stream_token_estimate(stream.count(b"\n"), stream[-200:], chat=chat) == tokens


def test_stream_finished_observes_one_mean_inter_token_latency_per_request() -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry, version="t", policy="p")
    stream = _ROLE + _TOKEN * 6 + _USAGE + _DONE  # usage says 7 tokens
    metrics.stream_finished("m", span_s=0.6, newlines=stream.count(b"\n"), tail=stream, chat=True)
    get = registry.get_sample_value
    assert get("kvgate_generation_tokens_total", {"model": "m"}) == 7
    assert get("kvgate_prompt_tokens_total", {"model": "m"}) == 12
    assert get("kvgate_inter_token_latency_seconds_count", {"model": "m"}) == 1
    assert get("kvgate_inter_token_latency_seconds_sum", {"model": "m"}) == pytest.approx(0.1)
    # One token: no gap to observe; no usage: prompt tokens stay unknown (not counted).
    one = _ROLE + _TOKEN + _DONE
    metrics.stream_finished("m", span_s=0.0, newlines=one.count(b"\n"), tail=one, chat=True)
    assert get("kvgate_generation_tokens_total", {"model": "m"}) == 8
    assert get("kvgate_prompt_tokens_total", {"model": "m"}) == 12
    assert get("kvgate_inter_token_latency_seconds_count", {"model": "m"}) == 1


# --- the collector over a hand-built pool ------------------------------------------------------


def _pool() -> ReplicaPool:
    pool = ReplicaPool(max_metrics_age_s=1.0)
    pool.add(ReplicaId("a:1"), "http://a:1", phase="ready", models={"m"}, now=0.0)
    pool.add(ReplicaId("b:1"), "http://b:1", phase="ready", models={"m"}, now=0.0)
    pool.add(ReplicaId("c:1"), "http://c:1", phase="ready", models={"m"}, now=0.0)
    pool.add(ReplicaId("d:1"), "http://d:1", models={"m", "n"})  # starting
    return pool


def test_pool_aggregates_use_ready_replicas_with_fresh_scrapes() -> None:
    pool = _pool()
    now = [10.0]
    pool.apply_scrape(ReplicaId("a:1"), EngineSample("vllm-v1", 4, 8, 0.5), at=9.8)
    pool.apply_scrape(ReplicaId("b:1"), EngineSample("vllm-v1", 2, 8, 0.7), at=9.9)
    pool.apply_scrape(ReplicaId("c:1"), EngineSample("vllm-v1", 50, 8, 1.0), at=5.0)  # stale
    pool.apply_scrape(ReplicaId("d:1"), EngineSample("vllm-v1", 9, 0, 0.9), at=9.9)  # starting
    registry = CollectorRegistry()
    in_flight = {"m": 3}
    registry.register(
        ReplicaStateCollector(
            pool,
            lambda: now[0],
            labels=ModelLabels(pool, ["configured"]),
            in_flight=in_flight,
            queued=lambda: {"m": 2, "unknown": 1},
        )
    )
    get = registry.get_sample_value
    assert get("kvgate_model_ready_replicas", {"model": "m"}) == 3
    assert get("kvgate_model_replicas", {"model": "m", "state": "starting"}) == 1
    assert get("kvgate_model_replicas", {"model": "m", "state": "ejected"}) == 0
    assert get("kvgate_model_kv_cache_usage_ratio_mean", {"model": "m"}) == pytest.approx(0.6)
    assert get("kvgate_model_queue_depth", {"model": "m"}) == 6
    # n: only a starting replica; nothing waits at a ready one, KV usage unknown.
    assert get("kvgate_model_ready_replicas", {"model": "n"}) == 0
    assert get("kvgate_model_queue_depth", {"model": "n"}) == 0
    assert get("kvgate_model_kv_cache_usage_ratio_mean", {"model": "n"}) is None
    # The concurrency signal: every known model, configured ones included, at 0 when idle.
    assert get("kvgate_requests_in_flight", {"model": "m"}) == 3
    assert get("kvgate_requests_queued", {"model": "m"}) == 2
    assert get("kvgate_requests_queued", {"model": "unknown"}) == 1
    for model in ("n", "configured"):
        assert get("kvgate_requests_in_flight", {"model": model}) == 0
        assert get("kvgate_requests_queued", {"model": model}) == 0
    # Every fresh scrape goes stale: the mean and the sum become unknown, not 0.
    now[0] = 20.0
    assert get("kvgate_model_kv_cache_usage_ratio_mean", {"model": "m"}) is None
    assert get("kvgate_model_queue_depth", {"model": "m"}) is None
    assert get("kvgate_replica_queue_depth", {"replica": "c:1"}) == 50  # still the last value
    assert get("kvgate_replica_metrics_age_seconds", {"replica": "c:1"}) == 15


def test_a_model_scaled_to_zero_keeps_its_series_and_replicas_leave() -> None:
    pool = _pool()
    registry = CollectorRegistry()
    registry.register(ReplicaStateCollector(pool, lambda: 1.0))
    get = registry.get_sample_value
    assert get("kvgate_replica_state", {"replica": "a:1", "state": "ready"}) == 1
    for rid in pool.ids():
        pool.remove(rid)
    assert get("kvgate_replica_state", {"replica": "a:1", "state": "ready"}) is None
    assert get("kvgate_replica_in_flight_requests", {"replica": "a:1"}) is None
    assert get("kvgate_model_ready_replicas", {"model": "m"}) == 0
    assert get("kvgate_requests_in_flight", {"model": "m"}) == 0
    assert get("kvgate_model_queue_depth", {"model": "m"}) == 0


def test_model_labels_are_bounded() -> None:
    pool = _pool()
    labels = ModelLabels(pool, ["configured"])
    assert labels.label("m") == "m"
    assert labels.label("configured") == "configured"
    assert labels.label("made-up-by-a-client") == "unknown"
    assert labels.label(None) == ""
    assert labels.known() == {"m", "n", "configured"}
    for rid in pool.ids():
        pool.remove(rid)
    assert labels.label("m") == "m"  # served once: still its own series
    assert labels.known() == {"m", "n", "configured"}


def test_scrape_error_series_leave_with_their_replica() -> None:
    pool = _pool()
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry, version="t", policy="p")
    pool.add_listener(metrics.forget_replicas)
    metrics.scrape_failed(ReplicaId("a:1"), "timeout")
    metrics.scrape_failed(ReplicaId("b:1"), "connection")
    metrics.scrape_failed(ReplicaId("b:1"), "connection")
    get = registry.get_sample_value
    assert get("kvgate_scrape_errors_total", {"replica": "b:1", "reason": "connection"}) == 2
    pool.remove(ReplicaId("b:1"))
    assert get("kvgate_scrape_errors_total", {"replica": "b:1", "reason": "connection"}) is None
    assert get("kvgate_scrape_errors_total", {"replica": "a:1", "reason": "timeout"}) == 1


# --- through a live gateway ----------------------------------------------------------------


def _chat(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 6,
        "ignore_eos": True,
        **extra,
    }


async def _post(
    server: GatewayServer, body: dict[str, Any], path: str = "chat/completions"
) -> bytes:
    url = f"http://127.0.0.1:{server.port}/v1/{path}"
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def test_tokens_ttft_itl_and_queue_wait_per_request(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    step_s = 0.02
    (replica,) = await start_replicas(1, ReplicaSettings.fast(step_s=step_s))
    server = await start_gateway([replica.url])
    m = replica.model
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    await _post(server, _chat(m, **usage))
    await _post(server, _chat(m, stream=True))  # no usage: counted from the events
    prompt = orjson.loads(await _post(server, _chat(m)))["usage"]["prompt_tokens"]
    completion = {"model": m, "prompt": "x y z", "max_tokens": 6, "ignore_eos": True}
    await _post(server, {**completion, "stream": True}, "completions")
    assert sample(server, "kvgate_generation_tokens_total", model=m) == 4 * 6
    # Prompt tokens only from usage: the first stream's usage chunk and the non-streamed body.
    assert sample(server, "kvgate_prompt_tokens_total", model=m) == 2 * prompt
    assert sample(server, "kvgate_time_to_first_token_seconds_count", model=m) == 3
    assert sample(server, "kvgate_inter_token_latency_seconds_count", model=m) == 3
    # The engine makes one token per step, so a mean gap cannot be shorter than a step.
    itl = sample(server, "kvgate_inter_token_latency_seconds_sum", model=m) / 3
    assert step_s * 0.9 <= itl < 1.0
    assert sample(server, "kvgate_queue_wait_seconds_count", model=m) == 4
    assert sample(server, "kvgate_queue_wait_seconds_bucket", model=m, le="0.001") == 4
    assert sample(server, "kvgate_request_duration_seconds_count", model=m) == 4


async def test_in_flight_is_exactly_the_open_streams(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    (replica,) = await start_replicas(1, ReplicaSettings.fast(step_s=0.05))
    server = await start_gateway([replica.url])
    m = replica.model
    assert sample(server, "kvgate_requests_in_flight", model=m) == 0
    assert server.gateway.registry.get_sample_value("kvgate_requests_queued", {"model": m}) == 0
    n = 5
    async with aiohttp.ClientSession() as http:
        streams = [
            await http.post(
                f"http://127.0.0.1:{server.port}/v1/chat/completions",
                json=_chat(m, stream=True, max_tokens=1000),
            )
            for _ in range(n)
        ]
        async with asyncio.timeout(5):
            for resp in streams:
                assert resp.status == 200
                await resp.content.readuntil(b"\n\n")  # streaming: dispatched and relaying
        assert sample(server, "kvgate_requests_in_flight", model=m) == n
        (rid,) = server.gateway.pool.ids()
        assert sample(server, "kvgate_replica_in_flight_requests", replica=rid) == n
        for resp in streams:
            resp.close()  # the client leaves: the gateway's handler is cancelled and releases
        pool = server.gateway.pool
        await wait_pool(pool, lambda: pool.total_inflight() == 0)
    assert sample(server, "kvgate_requests_in_flight", model=m) == 0


async def test_upstream_5xx_retry_and_unknown_model_labels(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    a, b = await start_replicas(2)
    server = await start_gateway([a.url, b.url])
    a.drain()  # the replica answers 503 while the gateway still believes it ready
    for _ in range(2):  # round robin: one of the two goes to a first and is retried on b
        await _post(server, _chat(a.model))
    assert sample(server, "kvgate_upstream_errors_total", reason="http_5xx") == 1
    assert sample(server, "kvgate_retries_total", reason="upstream_503") == 1
    assert sample(server, "kvgate_upstream_errors_total", reason="connect") == 0  # initialised
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
        async with http.post(url, json=_chat("no-such-model")) as resp:
            assert resp.status == 404
    assert sample(server, "kvgate_requests_total", model="unknown", code="404") == 1
