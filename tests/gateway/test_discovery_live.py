"""Discovery with traffic flowing: a real dnsmasq resolving a headless-Service name to
simulated replicas on 127.0.0.x, and the static list re-read from the config file (the SIGHUP
path); replicas come and go and no request fails."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from benchmarks.sim.server import ReplicaSettings, SimReplica
from gateway.app import GatewayServer
from gateway.config import load_config
from gateway.discovery.dns import DnsDiscovery
from gateway.discovery.static import FileWatch
from policies.types import ReplicaId
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import gateway_config, wait_pool
from tests.gateway.discovery.dnsmasq_server import DOMAIN, Dnsmasq, find_dnsmasq
from tests.gateway.steady_load import SteadyLoad

DNSMASQ = find_dnsmasq()
NAME = f"vllm.{DOMAIN}"
HEALTH = {"probe_interval_s": 0.05, "probe_max_interval_s": 0.2}


def _port_free_on(hosts: list[str]) -> int | None:
    """A port that every host in ``hosts`` can bind (the Service's one target port)."""
    for _ in range(20):
        with socket.socket() as first:
            try:
                first.bind((hosts[0], 0))
            except OSError:
                return None  # 127.0.0.x beyond .1 not bindable here
            port: int = first.getsockname()[1]
            free = True
            for host in hosts[1:]:
                with socket.socket() as other:
                    try:
                        other.bind((host, port))
                    except OSError:
                        free = False
            if free:
                return port
    return None


@pytest.fixture
async def dnsmasq(tmp_path: Path) -> AsyncIterator[Dnsmasq]:
    if DNSMASQ is None:
        pytest.skip("dnsmasq not installed (Debian: dnsmasq-base; `make system-deps`)")
    server = Dnsmasq(DNSMASQ, tmp_path)
    server.write_hosts({NAME: []})
    await server.start()
    yield server
    await server.stop()


async def test_dns_records_added_and_removed_while_traffic_flows(
    dnsmasq: Dnsmasq, start_replicas: StartReplicas
) -> None:
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    port = _port_free_on(hosts)
    if port is None:
        pytest.skip("cannot bind one port on 127.0.0.2-4")
    replicas: dict[str, SimReplica] = {}
    for i, host in enumerate(hosts):
        settings = ReplicaSettings.fast(step_s=0.005, host=host, port=port)
        (replicas[host],) = await start_replicas(1, settings, seed=i)
    dnsmasq.write_hosts({NAME: hosts[:2]})
    dnsmasq.reload()

    server = GatewayServer(
        gateway_config([], health=HEALTH, policy={"name": "p2c"}),
        rng=random.Random(5),
        registry=CollectorRegistry(),
    )
    gw = server.gateway
    gw.discovery = DnsDiscovery(
        NAME, port, interval_s=0.05, timeout_s=0.5, nameservers=["127.0.0.1"],
        nameserver_port=dnsmasq.port,
    )  # fmt: skip
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
