"""End to end: a real Prometheus scrapes a gateway under a known load, and the scaling query
that KEDA sends returns that load.

Prometheus (Debian's ``prometheus`` binary) runs on loopback with a temporary storage dir,
scrapes the gateway's admin port every second with the target labels a ServiceMonitor would add
(``namespace``, ``pod``), and loads the recording rules from
``config/prometheus/scaling-rules.yaml`` unchanged except for the group's evaluation interval
(10 s there, 1 s here, to keep the test short). The gateway sits in front of simulated replicas
serving the example deployment's model name. Four streams are held open (slow replicas, long
generations) with a saturation bound of one request per replica, so exactly two are in flight
at the two replicas and two wait in the gateway's buffer: the KEDA ScaledObject's own query
string, sent to Prometheus' HTTP API, must return 4 (in flight + queued), and 0 once the
clients have left.

Waiting is bounded everywhere: Prometheus' readiness and every query are polled against a
deadline (Prometheus offers no push notification to wait on).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from benchmarks.sim.server import ReplicaSettings
from tests.benchmarks.conftest import StartReplicas
from tests.config.artifacts import MODEL, NAMESPACE, PROM, keda_trigger
from tests.gateway.conftest import StartGateway, wait_pool

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus not installed (Debian package 'prometheus'; `make system-deps`)",
)

STREAMS = 4
REPLICAS = 2
DEADLINE_S = 12.0  # per wait; Prometheus needs ~1 s to start, then 1-2 scrape+rule rounds
POLL_S = 0.2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _write_config(tmp: Path, admin_port: int) -> Path:
    rules = yaml.safe_load((PROM / "scaling-rules.yaml").read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    (tmp / "rules.yaml").write_text(yaml.safe_dump(rules))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp / "rules.yaml")],
        "scrape_configs": [
            {
                "job_name": "kvgate",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{admin_port}"],
                        "labels": {"namespace": NAMESPACE, "pod": "kvgate-0"},
                    }
                ],
            }
        ],
    }
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
async def prometheus_for(tmp_path: Path) -> AsyncIterator[Any]:
    """``await prometheus_for(admin_port)`` -> base URL of a ready Prometheus scraping it."""
    procs: list[asyncio.subprocess.Process] = []

    async def start(admin_port: int) -> str:
        assert PROMETHEUS is not None
        port = _free_port()
        proc = await asyncio.create_subprocess_exec(
            PROMETHEUS,
            f"--config.file={_write_config(tmp_path, admin_port)}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("wb"),
        )
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http, asyncio.timeout(DEADLINE_S):
            while True:
                assert proc.returncode is None, (tmp_path / "prometheus.log").read_text()
                try:
                    async with http.get(f"{base}/-/ready") as resp:
                        if resp.status == 200:
                            return base
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(POLL_S)

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _query(http: aiohttp.ClientSession, base: str, promql: str) -> float | None:
    """The single value of an instant query, None while it returns no series."""
    async with http.get(f"{base}/api/v1/query", params={"query": promql}) as resp:
        body = await resp.json()
    assert body["status"] == "success", body
    result = body["data"]["result"]
    if not result:
        return None
    assert len(result) == 1, result
    return float(result[0]["value"][1])


async def _until(http: aiohttp.ClientSession, base: str, promql: str, expected: float) -> None:
    """Poll ``promql`` until it returns ``expected``; fail with the last value at the deadline."""
    last: float | None = None
    try:
        async with asyncio.timeout(DEADLINE_S):
            while True:
                last = await _query(http, base, promql)
                if last == expected:
                    return
                await asyncio.sleep(POLL_S)  # the next poll: Prometheus cannot notify us
    except TimeoutError:
        pytest.fail(f"{promql} = {last}, expected {expected} within {DEADLINE_S} s")


_BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "count to a thousand"}],
    "max_tokens": 1000,
    "ignore_eos": True,
    "stream": True,
}


async def _stream_until_first_event(http: aiohttp.ClientSession, url: str) -> None:
    """One chat stream, held open (until cancelled) once its first event arrived."""
    async with http.post(url, json=_BODY) as resp:
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        await asyncio.Event().wait()  # hold the stream open until cancelled


@pytest.mark.long
async def test_keda_query_returns_the_gateway_concurrency(
    start_replicas: StartReplicas, start_gateway: StartGateway, prometheus_for: Any
) -> None:
    # 50 ms per engine step: a 1000-token stream stays open far longer than the test. With one
    # request per replica allowed, 2 replicas take 2 streams and the other 2 wait in the buffer.
    replicas = await start_replicas(REPLICAS, ReplicaSettings.fast(step_s=0.05, model=MODEL))
    server = await start_gateway(
        [r.url for r in replicas], saturation={"max_inflight_per_replica": 1}
    )
    base = await prometheus_for(server.admin_port)
    keda_query = keda_trigger()["metadata"]["query"]
    assert f'model="{MODEL}"' in keda_query and f'namespace="{NAMESPACE}"' in keda_query
    in_flight = f'sum(kvgate_requests_in_flight{{model="{MODEL}"}})'
    queued = f'sum(kvgate_requests_queued{{model="{MODEL}"}})'
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        await _until(http, base, keda_query, 0)  # idle: the series exists, at 0
        streams = [
            asyncio.create_task(_stream_until_first_event(http, url)) for _ in range(STREAMS)
        ]
        try:
            await _until(http, base, keda_query, STREAMS)
            assert await _query(http, base, in_flight) == REPLICAS
            assert await _query(http, base, queued) == STREAMS - REPLICAS
        finally:
            for task in streams:
                task.cancel()  # the clients leave: replicas are released, waiters dequeued
            await asyncio.gather(*streams, return_exceptions=True)
        pool = server.gateway.pool
        await wait_pool(pool, lambda: pool.total_inflight() == 0)
        await _until(http, base, keda_query, 0)
