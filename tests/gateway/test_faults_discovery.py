"""Discovery faults through the whole gateway, with traffic: a real dnsmasq that dies and comes
back, a Kubernetes API server (real aiohttp, speaking list/watch) whose watch drops, answers
410 Gone or goes away, and every replica removed at once. The gateway never crashes, keeps
its last good membership while the authority is unreachable, follows an authoritative "none"
(and then refuses with 503 instead of hanging), and recovers by itself."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from benchmarks.sim.server import ReplicaSettings, SimReplica
from gateway.app import GatewayServer
from gateway.discovery import KubeCredentials, KubernetesDiscovery
from gateway.pool import ReplicaPool
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import gateway_config, wait_pool
from tests.gateway.discovery.fake_apiserver import SERVICE_LABEL, FakeApiServer
from tests.gateway.discovery.recording_sink import eventually
from tests.gateway.dns_fixture import (
    HOSTS,
    NAME,
    dns_discovery,
    replicas_on_one_port,
    running_dnsmasq,
)
from tests.gateway.steady_load import SteadyLoad

HEALTH = {"probe_interval_s": 0.05, "probe_max_interval_s": 0.2}
# With no replica at all a request may wait for one (scale from zero); not for long here.
BUFFER = {"max_wait_s": 0.5}


def _ready(pool: ReplicaPool) -> set[str]:
    return {str(r) for r in pool.ids() if pool.state(r).phase == "ready"}


async def _status(server: GatewayServer, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", json=body) as resp,
    ):
        await resp.read()
        return resp.status


@pytest.fixture
async def server_factory() -> AsyncIterator[Any]:
    servers: list[GatewayServer] = []

    async def start(discovery: Any) -> GatewayServer:
        cfg = gateway_config([], health=HEALTH, buffer=BUFFER, policy={"name": "p2c"})
        server = GatewayServer(cfg, registry=CollectorRegistry(), rng=random.Random(3))
        server.gateway.discovery = discovery
        servers.append(server)
        await server.start()
        return server

    yield start
    for server in servers:
        await server.stop()


# -- DNS -----------------------------------------------------------------------------------


async def test_dns_server_down_keeps_membership_and_everything_recovers(
    tmp_path: Path, start_replicas: StartReplicas, server_factory: Any
) -> None:
    hosts = list(HOSTS)
    port, replicas = await replicas_on_one_port(start_replicas)
    model = replicas[0].model
    async with running_dnsmasq(tmp_path, hosts[:2]) as dns:
        discovery = dns_discovery(dns, port, timeout_s=0.3)
        server = await server_factory(discovery)
        pool = server.gateway.pool
        two = {f"{h}:{port}" for h in hosts[:2]}
        await wait_pool(pool, lambda: _ready(pool) == two, limit_s=5.0)
        async with SteadyLoad(f"http://127.0.0.1:{server.port}", model) as load:
            await load.wait_for_requests(20)
            await dns.stop()  # the DNS server dies: SIGKILL, no answer at all
            await eventually(lambda: discovery.errors.failing, limit_s=3.0)
            await load.wait_for_requests(30)  # traffic flows on the last good membership
            assert _ready(pool) == two
            dns.write_hosts({NAME: hosts})  # it comes back, and the Service grew meanwhile
            await dns.start(dns.port)
            await wait_pool(pool, lambda: _ready(pool) == {f"{h}:{port}" for h in hosts}, 5.0)
            await load.wait_for_requests(30)
        assert load.failures == [], load.summary()
        assert not discovery.errors.failing

        dns.write_hosts({NAME: []})  # every replica removed at once: NXDOMAIN, authoritative
        dns.reload()
        await wait_pool(pool, lambda: len(pool) == 0, limit_s=5.0)
        assert await _status(server, model) == 503  # refused after max_wait_s, not hanging
        dns.write_hosts({NAME: hosts[1:]})
        dns.reload()
        await wait_pool(pool, lambda: len(_ready(pool)) == 2, limit_s=5.0)
        assert await _status(server, model) == 200
        assert not server.gateway.failed.is_set()


# -- Kubernetes ----------------------------------------------------------------------------


def _slice(name: str, pod: str, replica: SimReplica, rv: int) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "llm",
            "labels": {SERVICE_LABEL: "vllm"},
            "resourceVersion": str(rv),
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": ["127.0.0.1"],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "targetRef": {"kind": "Pod", "namespace": "llm", "name": pod},
            }
        ],
        "ports": [{"name": "http", "port": replica.port, "protocol": "TCP"}],
    }


def _event(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "object": {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                                     **obj}}  # fmt: skip


async def test_kubernetes_watch_dropped_gone_or_down_and_all_removed(
    start_replicas: StartReplicas, server_factory: Any
) -> None:
    r0, r1, r2 = await start_replicas(3, ReplicaSettings.fast(step_s=0.005))
    model = r0.model
    api = FakeApiServer()
    slices = {"a": _slice("vllm-a", "pod-0", r0, 10), "b": _slice("vllm-b", "pod-1", r1, 11)}
    api.load_list({"metadata": {"resourceVersion": "11"}, "items": list(slices.values())})
    await api.start()
    discovery = KubernetesDiscovery(
        KubeCredentials(server=api.url, ssl_context=None), "vllm", namespace="llm",
        port="http", backoff_initial_s=0.01, backoff_max_s=0.05, rng=random.Random(0),
    )  # fmt: skip
    try:
        server = await server_factory(discovery)
        pool = server.gateway.pool
        await wait_pool(pool, lambda: _ready(pool) == {"pod-0", "pod-1"}, limit_s=5.0)
        await api.wait_streams(1)
        async with SteadyLoad(f"http://127.0.0.1:{server.port}", model) as load:
            await load.wait_for_requests(20)
            # The watch connection drops; an event happens while nobody watches.
            api.emit(_event("ADDED", _slice("vllm-c", "pod-2", r2, 12)), broadcast=False)
            api.drop_watches()
            await wait_pool(pool, lambda: "pod-2" in _ready(pool), limit_s=5.0)
            await load.wait_for_requests(20)
            # The resume point is compacted away: 410 Gone, then a fresh list.
            api.emit(_event("MODIFIED", _slice("vllm-a", "pod-0", r0, 13)), broadcast=False)
            api.compact()  # the missed event is compacted away too
            api.drop_watches()
            await eventually(lambda: discovery.relists_total >= 1, limit_s=3.0)
            await load.wait_for_requests(20)
            assert _ready(pool) == {"pod-0", "pod-1", "pod-2"}
            # The API server goes away entirely: keep serving the last good membership.
            port = api.port
            await api.stop()
            await eventually(lambda: discovery.errors.failing, limit_s=3.0)
            await load.wait_for_requests(30)
            assert _ready(pool) == {"pod-0", "pod-1", "pod-2"}
            await api.start(port)
            await eventually(lambda: not discovery.errors.failing, limit_s=3.0)
            await load.wait_for_requests(20)
        assert load.failures == [], load.summary()

        for i, (name, pod, replica) in enumerate(
            [("vllm-a", "pod-0", r0), ("vllm-b", "pod-1", r1), ("vllm-c", "pod-2", r2)]
        ):  # the Service scaled to zero: every slice deleted
            api.emit(_event("DELETED", _slice(name, pod, replica, 20 + i)))
        await wait_pool(pool, lambda: len(pool) == 0, limit_s=5.0)
        assert await _status(server, model) == 503
        api.emit(_event("ADDED", _slice("vllm-d", "pod-3", r1, 30)))
        await wait_pool(pool, lambda: _ready(pool) == {"pod-3"}, limit_s=5.0)
        assert await _status(server, model) == 200
        assert not server.gateway.failed.is_set()
    finally:
        await api.stop()
