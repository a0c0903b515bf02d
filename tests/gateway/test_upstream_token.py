"""The gateway's own credential on its control-plane calls: a replica that requires an API key
(vLLM ``--api-key``: every ``/v1`` path) must still list its models, pass its probe and become
ready, with the token of ``upstream.api_key_file`` (re-read when the file changes) — and the
token never reaches a log line.

Replicas are the simulator with ``api_key`` set, which answers as vLLM does (401
``{"error": "Unauthorized"}`` under ``/v1``; ``/health`` and the metrics page open)."""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from benchmarks.sim.server import ReplicaSettings
from gateway.app import GatewayServer
from gateway.log import JsonFormatter, PlainFormatter
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import StartGateway, gateway_config, post_chat, wait_pool

TOKEN = "sk-replica-token-0123456789"
TOKEN_2 = "sk-replica-token-rotated-42"


def _write_token(path: Path, token: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{token}\n")
    os.replace(tmp, path)  # atomically, as a Secret update is


def _phase(server: GatewayServer) -> str:
    pool = server.gateway.pool
    (rid,) = pool.ids()
    return pool.state(rid).phase


async def _gateway_models(server: GatewayServer) -> list[str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{server.port}/v1/models") as resp,
    ):
        assert resp.status == 200
        doc = await resp.json()
    return [card["id"] for card in doc["data"]]


async def _chat(
    server: GatewayServer, model: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    return await post_chat(server, body, headers)


def _assert_not_logged(caplog: pytest.LogCaptureFixture, *tokens: str) -> None:
    assert caplog.records, "the test must capture the gateway's logs to prove anything"
    for record in caplog.records:
        for text in (PlainFormatter().format(record), JsonFormatter().format(record)):
            for token in tokens:
                assert token not in text


async def test_the_simulator_guards_v1_paths_like_vllm_api_key(
    start_replicas: StartReplicas,
) -> None:
    (vllm,) = await start_replicas(1, ReplicaSettings.fast(api_key=TOKEN))
    (nim,) = await start_replicas(1, ReplicaSettings.fast(api_key=TOKEN, flavour="nim"))
    good = {"Authorization": f"Bearer {TOKEN}"}
    wrong = {"Authorization": f"Bearer {TOKEN_2}"}
    chat = {"model": vllm.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with aiohttp.ClientSession() as http:

        async def status(method: str, url: str, headers: dict[str, str] | None = None) -> int:
            body = chat if method == "POST" else None
            async with http.request(method, url, json=body, headers=headers) as resp:
                if resp.status == 401:
                    assert await resp.json() == {"error": "Unauthorized"}
                return resp.status

        assert await status("GET", f"{vllm.url}/v1/models") == 401
        assert await status("GET", f"{vllm.url}/v1/models", wrong) == 401
        assert await status("POST", f"{vllm.url}/v1/chat/completions") == 401
        assert await status("GET", f"{vllm.url}/v1/models", good) == 200
        assert await status("POST", f"{vllm.url}/v1/chat/completions", good) == 200
        assert await status("GET", f"{vllm.url}/health") == 200
        assert await status("GET", f"{vllm.url}/metrics") == 200
        assert await status("GET", f"{nim.url}/v1/metrics") == 200  # the scrape stays open
        assert await status("GET", f"{nim.url}/v1/health/ready") == 401
        assert await status("GET", f"{nim.url}/v1/health/ready", good) == 200
    assert vllm.requests_unauthorized == 3 and nim.requests_unauthorized == 1
    assert vllm.requests_finished == 1


async def test_a_replica_that_requires_a_key_becomes_ready_and_serves_through_the_gateway(
    tmp_path: Path,
    start_replicas: StartReplicas,
    start_gateway: StartGateway,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    (replica,) = await start_replicas(1, ReplicaSettings.fast(api_key=TOKEN))
    token = tmp_path / "upstream-token"
    _write_token(token, TOKEN)
    server = await start_gateway([replica.url], upstream={"api_key_file": str(token)})
    await wait_pool(server.gateway.pool, lambda: _phase(server) == "ready")
    assert await _gateway_models(server) == [replica.model]
    # The client's own Authorization is dropped; the gateway's token replaces it.
    status, reply = await _chat(server, replica.model, {"Authorization": "Bearer sk-client-1"})
    assert status == 200 and reply["choices"][0]["message"]["content"]
    # The scrape needs no key (vLLM's /metrics is outside /v1) and still works.
    await replica.wait_for(lambda r: r.metrics_scrapes > 0, timeout_s=2.0)
    assert replica.requests_unauthorized == 0
    await server.stop()  # flushes the access line of the request above
    _assert_not_logged(caplog, TOKEN)


async def test_without_the_token_file_the_replica_never_lists_its_models(
    start_replicas: StartReplicas,
    start_gateway: StartGateway,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    (replica,) = await start_replicas(1, ReplicaSettings.fast(api_key=TOKEN))
    server = await start_gateway([replica.url])  # awaits one full catalog round
    # Each round is bounded by the list timeout; a second proves a retry does not help.
    await server.gateway.catalog.refresh_once()
    assert replica.requests_unauthorized >= 2
    assert _phase(server) == "starting"
    assert await _gateway_models(server) == []
    hints = [r for r in caplog.records if "upstream.api_key_file" in r.getMessage()]
    assert hints and all("answered 401" in r.getMessage() for r in hints)


class _Clock:
    """Real monotonic time plus a jump the test controls (the token file's re-read interval)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


async def test_a_rotated_token_file_is_picked_up_by_the_catalog(
    tmp_path: Path,
    start_replicas: StartReplicas,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    (replica,) = await start_replicas(1, ReplicaSettings.fast(api_key=TOKEN_2))
    token = tmp_path / "upstream-token"
    _write_token(token, TOKEN)  # the old token: the replica already wants the new one
    clock = _Clock()
    cfg = gateway_config([replica.url], upstream={"api_key_file": str(token)})
    server = GatewayServer(cfg, clock=clock, rng=random.Random(7), registry=CollectorRegistry())
    await server.start()
    try:
        await server.gateway.catalog.refresh_once()
        assert replica.requests_unauthorized >= 1
        assert _phase(server) == "starting"
        _write_token(token, TOKEN_2)
        clock.offset += 6.0  # past UpstreamCredentials' 5 s re-read interval
        # The catalog's own loop retries a starting replica's list within STARTING_LIST_S.
        await wait_pool(server.gateway.pool, lambda: _phase(server) == "ready", limit_s=3.0)
        assert await _gateway_models(server) == [replica.model]
        status, _ = await _chat(server, replica.model)
        assert status == 200  # the proxy shares the object: it sends the new token too
    finally:
        await server.stop()
    _assert_not_logged(caplog, TOKEN, TOKEN_2)


async def test_the_health_probe_carries_the_token_to_a_guarded_probe_path(
    tmp_path: Path,
    start_replicas: StartReplicas,
    start_gateway: StartGateway,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    (replica,) = await start_replicas(1, ReplicaSettings.fast(api_key=TOKEN, flavour="nim"))
    health = {"probe_path": "/v1/health/ready"}  # NIM's readiness path, under /v1
    token = tmp_path / "upstream-token"
    _write_token(token, TOKEN)
    server = await start_gateway(
        [replica.url], health=health, upstream={"api_key_file": str(token)}
    )
    await wait_pool(server.gateway.pool, lambda: _phase(server) == "ready")
    assert replica.requests_unauthorized == 0
    bare = await start_gateway([replica.url], health=health)  # probe only: fails at the probe
    assert _phase(bare) == "starting"
    assert replica.requests_unauthorized >= 1
    hints = [r for r in caplog.records if "/v1/health/ready answered 401" in r.getMessage()]
    assert hints and "upstream.api_key_file" in hints[0].getMessage()
    _assert_not_logged(caplog, TOKEN)
