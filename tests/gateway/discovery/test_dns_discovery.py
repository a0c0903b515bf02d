"""DNS discovery against a real dnsmasq on loopback: records come and go while it runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.discovery import DnsDiscovery
from gateway.discovery.dns import DnsResolveError
from tests.gateway.discovery.dnsmasq_server import DOMAIN, Dnsmasq, find_dnsmasq
from tests.gateway.discovery.recording_sink import RecordingSink, eventually, names

NAME = f"replicas.{DOMAIN}"
DNSMASQ = find_dnsmasq()

pytestmark = pytest.mark.skipif(
    DNSMASQ is None,
    reason="dnsmasq not installed (Debian: apt-get install dnsmasq-base; `make system-deps`)",
)


@pytest.fixture
async def dnsmasq(tmp_path: Path) -> AsyncIterator[Dnsmasq]:
    assert DNSMASQ is not None
    server = Dnsmasq(DNSMASQ, tmp_path)
    server.write_hosts(
        {NAME: ["127.0.0.2", "127.0.0.3", "fd00::5"], f"v6only.{DOMAIN}": ["fd00::9"]}
    )
    await server.start()
    yield server
    await server.stop()


def discovery_for(server: Dnsmasq, name: str = NAME) -> DnsDiscovery:
    return DnsDiscovery(
        name,
        8000,
        interval_s=0.01,
        timeout_s=0.15,
        nameservers=["127.0.0.1"],
        nameserver_port=server.port,
    )


@pytest.fixture
async def running(dnsmasq: Dnsmasq) -> AsyncIterator[tuple[DnsDiscovery, RecordingSink]]:
    discovery, sink = discovery_for(dnsmasq), RecordingSink()
    task = asyncio.create_task(discovery.run(sink))
    yield discovery, sink
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_all_a_and_aaaa_records_become_replicas(dnsmasq: Dnsmasq) -> None:
    replicas = await discovery_for(dnsmasq).resolve_once()
    assert [(r.name, r.url) for r in replicas] == [
        ("127.0.0.2:8000", "http://127.0.0.2:8000"),
        ("127.0.0.3:8000", "http://127.0.0.3:8000"),
        ("[fd00::5]:8000", "http://[fd00::5]:8000"),
    ]
    assert all(r.ready and not r.terminating for r in replicas)


async def test_no_data_for_one_family_is_not_an_error(dnsmasq: Dnsmasq) -> None:
    # v6only has AAAA records only: the A query is NOERROR with no data.
    replicas = await discovery_for(dnsmasq, f"v6only.{DOMAIN}").resolve_once()
    assert names(replicas) == {"[fd00::9]:8000"}


async def test_nxdomain_is_zero_replicas(dnsmasq: Dnsmasq) -> None:
    assert await discovery_for(dnsmasq, f"missing.{DOMAIN}").resolve_once() == ()


async def test_refused_is_an_error_not_zero_replicas(dnsmasq: Dnsmasq) -> None:
    with pytest.raises(DnsResolveError) as info:
        await discovery_for(dnsmasq, "outside.example").resolve_once()
    assert info.value.reason == "no_nameservers"


async def test_records_added_and_removed_while_running(
    dnsmasq: Dnsmasq, running: tuple[DnsDiscovery, RecordingSink]
) -> None:
    discovery, sink = running
    await sink.wait_for(
        lambda s: names(s) == {"127.0.0.2:8000", "127.0.0.3:8000", "[fd00::5]:8000"}
    )

    dnsmasq.write_hosts({NAME: ["127.0.0.3", "127.0.0.4"]})
    dnsmasq.reload()
    await sink.wait_for(lambda s: names(s) == {"127.0.0.3:8000", "127.0.0.4:8000"})

    # The Service scaled to zero: the name is gone (NXDOMAIN) and so are the replicas.
    dnsmasq.write_hosts({f"other.{DOMAIN}": ["127.0.0.9"]})
    dnsmasq.reload()
    assert await sink.wait_for(lambda s: not s) == ()
    assert not discovery.errors.failing

    dnsmasq.write_hosts({NAME: ["127.0.0.5"]})
    dnsmasq.reload()
    await sink.wait_for(lambda s: names(s) == {"127.0.0.5:8000"})
    # Each distinct membership was pushed once: no repeats on unchanged rounds.
    assert [len(s) for _, s in sink.snapshots] == [3, 2, 0, 1]


async def test_server_down_keeps_last_good_membership_until_it_returns(
    dnsmasq: Dnsmasq, running: tuple[DnsDiscovery, RecordingSink]
) -> None:
    discovery, sink = running
    good = await sink.wait_for(lambda s: len(s) == 3)

    await dnsmasq.stop()
    # A dead UDP server does not answer at all: each round times out (timeout_s).
    await eventually(lambda: discovery.errors.errors_total.get("timeout", 0) >= 2)
    assert discovery.errors.failing, discovery.errors.errors_total
    assert sink.latest == good and len(sink.snapshots) == 1

    dnsmasq.write_hosts({NAME: ["127.0.0.7"]})
    await dnsmasq.start(port=dnsmasq.port)
    await sink.wait_for(lambda s: names(s) == {"127.0.0.7:8000"})
    assert not discovery.errors.failing
