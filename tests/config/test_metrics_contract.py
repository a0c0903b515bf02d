"""The live /metrics output against its contract, docs/metrics.md, and against promtool.

A real gateway (both ports on loopback) runs in front of simulated replicas and is driven
through every path that produces a sample: streamed and non-streamed requests, a dead replica
(retries, upstream and scrape errors) and a model with no routable replica (a rejection). Then:

- every metric in the docs/metrics.md tables is in the output with the documented type and
  label names, and every ``kvgate_`` family in the output is documented (so a rename in the
  exporter cannot silently break the recording rules, the HPAs, KEDA or the dashboard; the
  names used in config/ are checked against the same table by test_monitoring.py);
- ``promtool check metrics`` (Prometheus' own linter) reports nothing.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.sim.server import ReplicaSettings, SimReplica
from gateway.app import GatewayServer
from tests.config.artifacts import METRICS_DOC, PROMTOOL, needs_promtool
from tests.gateway.conftest import gateway_config

DOC_ROW = re.compile(
    r"^\|\s*`(kvgate_[a-z0-9_]+)`\s*\|\s*(counter|gauge|histogram)\s*\|([^|]*)\|", re.M
)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@dataclass(frozen=True)
class Family:
    kind: str
    labels: frozenset[str]


def documented() -> dict[str, Family]:
    rows = DOC_ROW.findall(METRICS_DOC.read_text())
    assert len(rows) >= 25, "docs/metrics.md: the metric tables were not found"
    return {
        name: Family(kind, frozenset(re.findall(r"`([a-z_]+)`", labels)))
        for name, kind, labels in rows
    }


def exported(text: str) -> dict[str, Family]:
    """Families in an exposition, by the name a query uses (counters with ``_total``)."""
    out: dict[str, Family] = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        label_sets = {frozenset(s.labels) - {"le"} for s in fam.samples}
        assert len(label_sets) <= 1, f"{name}: samples with different label names {label_sets}"
        assert label_sets, f"{name}: no sample, so its labels cannot be checked (drive it)"
        out[name] = Family(fam.type, label_sets.pop())
    return out


@asynccontextmanager
async def running(*replicas: SimReplica) -> AsyncIterator[GatewayServer]:
    """The replicas, then a gateway in front of them with their models listed; all stopped."""
    started: list[SimReplica] = []
    server: GatewayServer | None = None
    try:
        for replica in replicas:
            started.append(replica)
            await replica.start()
        server = GatewayServer(
            # A short buffer deadline: a request nobody can take is refused within the test.
            gateway_config([r.url for r in replicas], buffer={"max_wait_s": 0.2}),
            rng=random.Random(7),
            registry=CollectorRegistry(),
        )
        await server.start()
        await server.gateway.catalog.refresh_once()
        yield server
    finally:
        if server is not None:
            await server.stop()
        for replica in started:
            await replica.stop()


async def loaded_exposition() -> str:
    """/metrics of a gateway that has been through every path that produces a sample."""
    a, dead = SimReplica(ReplicaSettings.fast(), seed=0), SimReplica(ReplicaSettings.fast(), seed=1)
    other = SimReplica(ReplicaSettings.fast(model="other-model"), seed=2)
    async with running(a, dead, other) as server:
        return await _drive(server, a, dead, other)


async def _drive(server: GatewayServer, a: SimReplica, dead: SimReplica, other: SimReplica) -> str:
    gw = server.gateway
    await gw.scraper.scrape_once()
    await dead.crash()  # refuses connections: retries, upstream errors, scrape errors
    await gw.scraper.scrape_once()
    base = f"http://127.0.0.1:{server.port}/v1"
    chat = {"model": a.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with aiohttp.ClientSession() as http:
        for body in (
            {**chat, "stream": True, "stream_options": {"include_usage": True}},
            {**chat, "stream": True},
            chat,
            {**chat, "model": other.model},
        ):
            async with http.post(f"{base}/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
        # The only replica of other-model stops taking requests: the request waits in the
        # buffer, then is refused with Retry-After.
        (other_id,) = [r for r in gw.pool.ids() if gw.pool.url(r) == other.url.rstrip("/")]
        gw.pool.set_phase(other_id, "draining", gw.clock())
        async with (
            asyncio.timeout(5),
            http.post(f"{base}/chat/completions", json={**chat, "model": other.model}) as resp,
        ):
            assert resp.status in (429, 503) and "Retry-After" in resp.headers
        async with http.get(f"http://127.0.0.1:{server.admin_port}/metrics") as resp:
            assert resp.status == 200
            return await resp.text()


async def test_live_metrics_match_the_documented_contract() -> None:
    text = await loaded_exposition()
    doc, live = documented(), exported(text)
    missing = sorted(set(doc) - set(live))
    undocumented = sorted(set(live) - set(doc))
    assert not missing, f"documented but not exported: {missing}"
    assert not undocumented, f"exported but not in docs/metrics.md: {undocumented}"
    for name, family in doc.items():
        assert live[name] == family, f"{name}: exported {live[name]}, documented {family}"
    # Every sample name is a documented one (a histogram's series carry their suffixes).
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series = line.split("{")[0].split(" ")[0]
            base = next((series[: -len(s)] for s in HISTOGRAM_SUFFIXES if series.endswith(s)), "")
            assert series in doc or doc.get(base, Family("", frozenset())).kind == "histogram", (
                series
            )


@needs_promtool
async def test_promtool_check_metrics_reports_nothing() -> None:
    text = await loaded_exposition()
    assert "kvgate_time_to_first_token_seconds_bucket" in text  # histograms have samples
    assert PROMTOOL is not None
    proc = await asyncio.create_subprocess_exec(
        PROMTOOL,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(30):
        output, _ = await proc.communicate(text.encode())
    assert (proc.returncode, output.decode()) == (0, "")
