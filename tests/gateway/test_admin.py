"""The admin port: probes, /metrics from the injected registry, per-replica gauges."""

from __future__ import annotations

import aiohttp
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.engine_metrics import EngineSample
from gateway.exporter import ReplicaStateCollector
from gateway.pool import ReplicaPool
from policies.types import ReplicaId
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import StartGateway


async def test_probes_metrics_and_debug(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    a, b = await start_replicas(2)
    server = await start_gateway([a.url, b.url])
    await server.gateway.scraper.scrape_once()
    admin = f"http://127.0.0.1:{server.admin_port}"
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"http://127.0.0.1:{server.port}/v1/completions",
            json={"model": a.model, "prompt": "x", "max_tokens": 2},
        ) as resp:
            assert resp.status == 200
        async with http.get(admin + "/healthz") as resp:
            assert resp.status == 200
        async with http.get(admin + "/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["replicas_ready"] == 2
        async with http.get(admin + "/debug/replicas") as resp:
            replicas = (await resp.json())["replicas"]
        async with http.get(admin + "/metrics") as resp:
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
        server.gateway.draining = True
        async with http.get(admin + "/readyz") as resp:
            assert resp.status == 503
        server.gateway.draining = False
    assert [r["phase"] for r in replicas] == ["ready", "ready"]
    assert replicas[0]["engine"] == "vllm-v1" and replicas[0]["metrics_stale"] is False
    assert replicas[0]["models"] == [a.model]
    names = {f.name for f in text_string_to_metric_families(text)}
    for name in (
        "kvgate_requests",
        "kvgate_request_duration_seconds",
        "kvgate_routing_decisions",
        "kvgate_routing_decision_duration_seconds",
        "kvgate_replica_in_flight_requests",
        "kvgate_model_replicas",
        "kvgate_replica_queue_depth",
        "kvgate_replica_kv_cache_usage_ratio",
        "kvgate_replica_metrics_age_seconds",
        "kvgate_build_info",
    ):
        assert name in names, name
    assert all(n.startswith("kvgate_") for n in names)
    assert 'kvgate_requests_total{code="200",model="' + a.model + '"} 1.0' in text


def test_replica_gauges_are_absent_when_unknown_and_leave_with_the_replica() -> None:
    pool = ReplicaPool(max_metrics_age_s=1.0)
    a, b = ReplicaId("a:1"), ReplicaId("b:1")
    pool.add(a, "http://a:1", phase="ready", models={"m"}, now=0.0)
    pool.add(b, "http://b:1", models={"m"})
    pool.apply_scrape(a, EngineSample("tgi", 2, 1, None), at=10.0)  # TGI: no KV signal
    registry = CollectorRegistry()
    registry.register(ReplicaStateCollector(pool, clock=lambda: 10.5))
    get = registry.get_sample_value
    assert get("kvgate_replica_queue_depth", {"replica": "a:1"}) == 2
    assert get("kvgate_replica_kv_cache_usage_ratio", {"replica": "a:1"}) is None
    assert get("kvgate_replica_queue_depth", {"replica": "b:1"}) is None  # never scraped
    assert get("kvgate_replica_metrics_age_seconds", {"replica": "a:1"}) == 0.5
    assert get("kvgate_model_replicas", {"model": "m", "state": "ready"}) == 1
    assert get("kvgate_model_replicas", {"model": "m", "state": "starting"}) == 1
    assert get("kvgate_replica_state", {"replica": "b:1", "state": "starting"}) == 1
    pool.remove(a)
    assert get("kvgate_replica_in_flight_requests", {"replica": "a:1"}) is None
    assert get("kvgate_model_replicas", {"model": "m", "state": "ready"}) == 0
