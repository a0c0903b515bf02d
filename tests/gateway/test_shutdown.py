"""Graceful shutdown of the real process: ``python -m gateway serve`` receives SIGTERM while
streams are in flight; every stream completes, readiness fails first, the listener closes."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from gateway.app import GatewayServer
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import gateway_config


@pytest.fixture(params=[True, False], ids=["callbacks", "tasks"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    """Every test here runs on both request paths: the callback path and the task path."""
    return bool(request.param)


ROOT = Path(__file__).resolve().parents[2]


class LogWatch:
    """Collects a subprocess's stderr lines; ``wait_for(pattern)`` returns the first match."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[str] = []
        self._stream = stream
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while line := await self._stream.readline():
            self.lines.append(line.decode(errors="replace").rstrip())
            self._changed.set()
        self._changed.set()

    async def wait_for(self, pattern: str, limit_s: float = 10.0, count: int = 1) -> re.Match[str]:
        regex = re.compile(pattern)
        async with asyncio.timeout(limit_s):
            while True:
                matches = [m for line in self.lines if (m := regex.search(line))]
                if len(matches) >= count:
                    return matches[count - 1]
                if self.task.done():
                    raise AssertionError(f"process ended before {pattern!r}:\n" + self.text())
                self._changed.clear()
                await self._changed.wait()

    def text(self) -> str:
        return "\n".join(self.lines)


async def test_sigterm_drains_streams_in_flight(
    start_replicas: StartReplicas, fast_settings: Any, tmp_path: Path
) -> None:
    # ~0.6 s per stream: long enough to be mid-stream at SIGTERM, short for the suite.
    replicas = await start_replicas(2, fast_settings.with_overrides(weights_floor_s=0.01))
    model = replicas[0].model
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "listen: {host: 127.0.0.1, port: 0}\n"
        "admin: {host: 127.0.0.1, port: 0}\n"
        f"replicas: {{urls: [{', '.join(r.url for r in replicas)}]}}\n"
        "policy: {name: round_robin}\n"
        "shutdown: {drain_s: 10}\n"
    )
    env = {**os.environ, "KVGATE_LOG_LEVEL": "INFO", "PYTHONPATH": str(ROOT)}
    env.pop("KVGATE_CONFIG", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.stderr is not None
    log = LogWatch(proc.stderr)
    try:
        ports = await log.wait_for(r"on port (\d+), admin on port (\d+)")
        api, admin = (f"http://127.0.0.1:{p}" for p in ports.groups())
        await log.wait_for(r"replica \S+ serves", count=2)
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 60,
            "ignore_eos": True,
            "stream": True,
        }
        async with aiohttp.ClientSession() as http:
            async with http.get(admin + "/readyz") as resp:
                assert resp.status == 200
            streams = [await http.post(api + "/v1/chat/completions", json=body) for _ in range(4)]
            for s in streams:
                assert s.status == 200
                await s.content.readuntil(b"\n\n")  # each is mid-stream now

            proc.send_signal(signal.SIGTERM)
            await log.wait_for("no longer accepting")
            async with http.get(admin + "/readyz") as resp:
                assert resp.status == 503
                assert (await resp.json())["draining"] is True
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as fresh:  # a new connection is refused
                    await fresh.post(api + "/v1/chat/completions", json=body)

            for s in streams:
                rest = await s.read()
                assert rest.endswith(b"data: [DONE]\n\n")
                assert rest.count(b"\n\n") >= 55  # ~60 token events, none lost
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
        await log.task
        assert "shutdown complete" in log.text()
        assert sum(r.requests_finished for r in replicas) == 4
        assert sum(r.requests_aborted for r in replicas) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_streams_still_running_when_drain_time_ends_are_cut_and_released(
    start_replicas: StartReplicas, fast_settings: Any
) -> None:
    (replica,) = await start_replicas(1, fast_settings.with_overrides(weights_floor_s=0.02))
    cfg = gateway_config([replica.url], shutdown={"drain_s": 0.2})
    server = GatewayServer(cfg, rng=random.Random(1), registry=CollectorRegistry())
    await server.start()
    await server.gateway.catalog.refresh_once()
    body = {
        "model": replica.model,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 1000,
        "ignore_eos": True,
        "stream": True,
    }
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", json=body)
        await resp.content.readuntil(b"\n\n")
        await server.stop()  # 1000 tokens take ~20 s: far longer than drain_s
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()  # cut, never a complete-looking stream
    assert server.gateway.pool.total_inflight() == 0
    await replica.wait_for(lambda r: r.requests_aborted == 1, 2.0)
