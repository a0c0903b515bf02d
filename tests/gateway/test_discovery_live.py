"""Discovery with traffic flowing: a real dnsmasq resolving a headless-Service name to
simulated replicas on 127.0.0.x, and the static list re-read from the config file (the SIGHUP
path); replicas come and go and no request fails."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from benchmarks.sim.server import ReplicaSettings
from gateway.app import GatewayServer
from gateway.config import load_config
from gateway.discovery.static import FileWatch
from policies.types import ReplicaId
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import gateway_config, wait_pool
from tests.gateway.discovery.dnsmasq_server import Dnsmasq
from tests.gateway.dns_fixture import (
    HOSTS,
    NAME,
    dns_discovery,
    replicas_on_one_port,
    running_dnsmasq,
)
from tests.gateway.steady_load import SteadyLoad

HEALTH = {"probe_interval_s": 0.05, "probe_max_interval_s": 0.2}


@pytest.fixture
async def dnsmasq(tmp_path: Path) -> AsyncIterator[Dnsmasq]:
    async with running_dnsmasq(tmp_path) as server:
        yield server


async def test_dns_records_added_and_removed_while_traffic_flows(
    dnsmasq: Dnsmasq, start_replicas: StartReplicas
) -> None:
    hosts = list(HOSTS)
    port, started = await replicas_on_one_port(start_replicas)
    replicas = dict(zip(hosts, started, strict=True))
    dnsmasq.write_hosts({NAME: hosts[:2]})
    dnsmasq.reload()

    server = GatewayServer(
        gateway_config([], health=HEALTH, policy={"name": "p2c"}),
        rng=random.Random(5),
        registry=CollectorRegistry(),
    )
    gw = server.gateway
    gw.discovery = dns_discovery(dnsmasq, port, timeout_s=0.5)
    pool = gw.pool

    def ready() -> set[str]:
        return {str(r).rsplit(":", 1)[0] for r in pool.ids() if pool.state(r).phase == "ready"}

    await server.start()
    try:
        await wait_pool(pool, lambda: ready() == set(hosts[:2]), limit_s=5.0)
        async with SteadyLoad(f"http://127.0.0.1:{server.port}", replicas[hosts[0]].model) as load:
            await load.wait_for_requests(20)
            dnsmasq.write_hosts({NAME: hosts})  # scale up: a record appears
            dnsmasq.reload()
            await wait_pool(pool, lambda: ready() == set(hosts), limit_s=5.0)
            await load.wait_for_requests(30)
            dnsmasq.write_hosts({NAME: hosts[1:]})  # scale down: a record disappears
            dnsmasq.reload()
            gone = ReplicaId(f"{hosts[0]}:{port}")
            await wait_pool(pool, lambda: gone not in pool, limit_s=5.0)
            await replicas[hosts[0]].stop()  # the pod exits once the gateway dropped it
            await load.wait_for_requests(30)
    finally:
        await server.stop()
    assert load.failures == [], load.summary()
    assert replicas[hosts[2]].requests_finished > 0  # the added replica took traffic
    print(f"\nDNS discovery: {load.done} requests while records changed, 0 failed")


async def test_static_replicas_reload_from_the_config_file_without_dropping_traffic(
    tmp_path: Path, start_replicas: StartReplicas
) -> None:
    a, b = await start_replicas(2, ReplicaSettings.fast(step_s=0.005))
    doc = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "replicas": {"urls": [a.url]},
        "health": HEALTH,
    }
    path = tmp_path / "kvgate.yaml"

    def write(urls: list[str], text: str | None = None) -> None:
        tmp = path.with_suffix(".tmp")  # replaced atomically, as a ConfigMap volume does
        tmp.write_text(
            text if text is not None else yaml.safe_dump({**doc, "replicas": {"urls": urls}})
        )
        os.replace(tmp, path)

    write([a.url])
    server = GatewayServer(
        load_config(path), config_path=path, rng=random.Random(5), registry=CollectorRegistry()
    )
    watch = server.gateway.discovery
    assert isinstance(watch, FileWatch)
    pool = server.gateway.pool
    rid_a, rid_b = (ReplicaId(u.removeprefix("http://")) for u in (a.url, b.url))

    def phase(rid: ReplicaId) -> str | None:
        return pool.state(rid).phase if rid in pool else None

    await server.start()
    try:
        await wait_pool(pool, lambda: phase(rid_a) == "ready")
        async with SteadyLoad(f"http://127.0.0.1:{server.port}", a.model) as load:
            await load.wait_for_requests(10)
            write([a.url, b.url])
            watch.request_reload()  # what SIGHUP does (kvgate serve wires it)
            await wait_pool(pool, lambda: phase(rid_b) == "ready")
            await load.wait_for_requests(20)
            write([], text="replicas: {urls: [not a url]}\n")  # a bad edit keeps the last good
            watch.request_reload()
            await load.wait_for_requests(10)
            assert {phase(rid_a), phase(rid_b)} == {"ready"}
            write([b.url])
            watch.request_reload()
            await wait_pool(pool, lambda: rid_a not in pool)
            served_by_a = a.requests_finished
            await load.wait_for_requests(20)
    finally:
        await server.stop()
    assert load.failures == [], load.summary()
    assert b.requests_finished > 0 and a.requests_finished == served_by_a
    assert watch.errors.errors_total == {"load": 1}
