"""Simulated replicas behind a headless-Service-like DNS name, served by a real dnsmasq, for
gateway tests that run traffic while records change (``test_discovery_live``,
``test_faults_discovery``).

``running_dnsmasq``: a started dnsmasq answering ``NAME`` (the test rewrites the records and
reloads it); it skips the test when dnsmasq is not installed.
``replicas_on_one_port``: replicas on ``HOSTS`` (127.0.0.2-4), all on one port, as a headless
Service's pods share one target port; it skips where those addresses cannot be bound.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from benchmarks.sim.server import ReplicaSettings, SimReplica
from gateway.discovery.dns import DnsDiscovery
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.discovery.dnsmasq_server import DOMAIN, Dnsmasq, find_dnsmasq

NAME = f"vllm.{DOMAIN}"
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


@contextlib.asynccontextmanager
async def running_dnsmasq(workdir: Path, hosts: Sequence[str] = ()) -> AsyncIterator[Dnsmasq]:
    """A started dnsmasq answering ``NAME`` with ``hosts``, stopped (SIGKILL) on exit."""
    binary = find_dnsmasq()
    if binary is None:
        pytest.skip("dnsmasq not installed (Debian: dnsmasq-base; `make system-deps`)")
    server = Dnsmasq(binary, workdir)
    server.write_hosts({NAME: list(hosts)})
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def port_free_on(hosts: Sequence[str]) -> int | None:
    """A port that every host in ``hosts`` can bind; None if 127.0.0.x beyond .1 is not."""
    for _ in range(20):
        with socket.socket() as first:
            try:
                first.bind((hosts[0], 0))
            except OSError:
                return None
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


async def replicas_on_one_port(start_replicas: StartReplicas) -> tuple[int, list[SimReplica]]:
    """The shared port and one fast replica per host of ``HOSTS`` (seeded 0, 1, 2), in order."""
    port = port_free_on(HOSTS)
    if port is None:
        pytest.skip("cannot bind one port on 127.0.0.2-4")
    replicas: list[SimReplica] = []
    for i, host in enumerate(HOSTS):
        settings = ReplicaSettings.fast(step_s=0.005, host=host, port=port)
        replicas += await start_replicas(1, settings, seed=i)
    return port, replicas


def dns_discovery(dns: Dnsmasq, port: int, *, timeout_s: float) -> DnsDiscovery:
    """Discovery of ``NAME`` from ``dns``, polled every 50 ms."""
    return DnsDiscovery(
        NAME, port, interval_s=0.05, timeout_s=timeout_s, nameservers=["127.0.0.1"],
        nameserver_port=dns.port,
    )  # fmt: skip
