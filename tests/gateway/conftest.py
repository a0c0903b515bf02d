"""Gateway test fixtures: a real GatewayServer (both ports, port 0, loopback) in front of real
simulated replicas (``benchmarks.sim``), and bounded waits on the pool's own signals."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from gateway.app import GatewayServer
from gateway.config import GatewayConfig, config_from_builtins
from gateway.pool import ReplicaPool
from tests.benchmarks.conftest import fast_settings, start_replicas  # noqa: F401  (fixtures)

StartGateway = Callable[..., Awaitable[GatewayServer]]


def gateway_config(urls: list[str], **sections: Any) -> GatewayConfig:
    """A config for tests: loopback, free ports, round-robin unless ``policy`` says otherwise."""
    doc: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "replicas": {"urls": urls},
        "policy": {"name": "round_robin"},
        "shutdown": {"drain_s": 5.0},
    }
    doc.update(sections)
    return config_from_builtins(doc)


@pytest.fixture
def fast_path() -> bool:
    """``upstream.fast_path`` for ``start_gateway``; a module that overrides this fixture with
    ``params=[True, False]`` runs its tests on both request paths (``gateway/exchange.py``)."""
    return True


@pytest.fixture
async def start_gateway(fast_path: bool) -> AsyncIterator[StartGateway]:
    """``await start_gateway(urls, **sections)``: started, with every replica's models listed."""
    servers: list[GatewayServer] = []

    async def start(urls: list[str], *, wait_models: bool = True, **sections: Any) -> GatewayServer:
        sections["upstream"] = {"fast_path": fast_path, **sections.get("upstream", {})}
        server = GatewayServer(
            gateway_config(urls, **sections), rng=random.Random(7), registry=CollectorRegistry()
        )
        servers.append(server)
        await server.start()
        if wait_models:
            await server.gateway.catalog.refresh_once()
        return server

    yield start
    for server in servers:
        await server.stop()


async def wait_pool(pool: ReplicaPool, predicate: Callable[[], bool], limit_s: float = 2.0) -> None:
    """Wait until ``predicate()`` holds, re-checked whenever the pool's capacity changes."""
    async with asyncio.timeout(limit_s):
        while not predicate():
            await pool.capacity.wait()


async def post_chat(
    server: GatewayServer, body: object, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` to the gateway's chat endpoint: (status, decoded JSON answer)."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{server.port}/v1/chat/completions", json=body, headers=headers
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


def sample(server: GatewayServer, name: str, **labels: str) -> float:
    value = server.gateway.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value
