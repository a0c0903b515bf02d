"""Faults of the gateway process itself, with the real ``python -m gateway serve`` (uvloop, its
own signal handling) in front of simulated replicas: SIGTERM with 500 streams in flight,
SIGKILL and restart, and clients that walk away mid-stream."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from benchmarks.sim.server import ReplicaSettings, SimReplica
from benchmarks.soak.processes import (
    GatewayProc,
    free_port,
    raise_fd_limit,
    start_gateway,
    stop_all,
)
from benchmarks.soak.processes import start_replicas as start_sim_process
from tests.benchmarks.conftest import StartReplicas

STREAMS = 500


@pytest.fixture(autouse=True)
def _fds() -> None:
    # 500 client connections plus the replicas' 500, in this process; CI defaults can be 1024.
    if raise_fd_limit() < 4 * STREAMS:
        pytest.skip("RLIMIT_NOFILE hard limit too low for 500 streams")


def _body(model: str, tokens: int, *, stream: bool = True) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": stream,
    }


async def _requests_with_code(http: aiohttp.ClientSession, gw: GatewayProc, code: str) -> float:
    async with http.get(gw.admin + "/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kvgate_requests_total{") and f'code="{code}"' in line
    )


async def _wait_log(gw: GatewayProc, needle: str, limit_s: float = 10.0) -> None:
    async with asyncio.timeout(limit_s):
        while needle not in gw.log_text():  # noqa: ASYNC110  (another process's log)
            await asyncio.sleep(0.02)


async def _idle(replicas: list[SimReplica]) -> None:
    for r in replicas:
        await r.wait_for(lambda s: s.inflight_requests == 0, timeout_s=5.0)


async def test_sigterm_with_500_streams_in_flight_completes_every_stream(
    start_replicas: StartReplicas, tmp_path: Path
) -> None:
    # 5 tokens a second per stream: every stream is mid-way when SIGTERM arrives, and 500 of
    # them stay a modest load for one gateway process on a shared CI machine.
    replicas = await start_replicas(2, ReplicaSettings.fast(step_s=0.2))
    tokens = 8
    sections: dict[str, Any] = {"policy": {"name": "least_request"}, "shutdown": {"drain_s": 15}}
    gw = await start_gateway([r.url for r in replicas], log_dir=tmp_path, **sections)
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            url = gw.api + "/v1/chat/completions"
            body = _body(replicas[0].model, tokens)
            streams = await asyncio.gather(*(http.post(url, json=body) for _ in range(STREAMS)))
            assert {s.status for s in streams} == {200}
            await asyncio.gather(*(s.content.readuntil(b"\n\n") for s in streams))
            assert sum(r.inflight_requests for r in replicas) == STREAMS

            gw.proc.send_signal(signal.SIGTERM)
            await _wait_log(gw, f"draining {STREAMS} in-flight requests")
            with pytest.raises(aiohttp.ClientConnectionError):  # no longer accepting
                async with aiohttp.ClientSession() as fresh:
                    await fresh.post(url, json=body)
            rests = await asyncio.gather(*(s.read() for s in streams))
        for rest in rests:
            assert rest.endswith(b"data: [DONE]\n\n")
            assert rest.count(b'"content"') >= tokens - 1  # every token after the first event
        async with asyncio.timeout(15):
            assert await gw.proc.wait() == 0
        assert "shutdown complete" in gw.log_text()
        assert sum(r.requests_finished for r in replicas) == STREAMS
        assert sum(r.requests_aborted for r in replicas) == 0
    finally:
        if gw.proc.returncode is None:
            gw.proc.kill()
            await gw.proc.wait()


async def test_sigkill_gives_clients_connection_errors_only_and_a_restart_serves_at_once(
    start_replicas: StartReplicas, tmp_path: Path
) -> None:
    replicas = await start_replicas(2, ReplicaSettings.fast(step_s=0.02))
    urls = [r.url for r in replicas]
    port = free_port()
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    gw = await start_gateway(urls, log_dir=tmp_path / "first", port=port)
    second: GatewayProc | None = None
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            url = gw.api + "/v1/chat/completions"
            # Generations far longer than the test (1000 tokens x 20 ms): every request is still
            # running when the gateway is killed, however slowly a loaded machine gets there.
            streams = [await http.post(url, json=_body(replicas[0].model, 1000))
                       for _ in range(10)]  # fmt: skip
            await asyncio.gather(*(s.content.readuntil(b"\n\n") for s in streams))
            plain = [
                asyncio.create_task(
                    http.post(url, json=_body(replicas[0].model, 1000, stream=False))
                )
                for _ in range(4)
            ]
            # All 14 requests running at the replicas (the split between them does not matter;
            # replica 0 re-checks on every engine step while its streams run).
            await replicas[0].wait_for(
                lambda _: sum(r.inflight_requests for r in replicas) == 14, timeout_s=15.0
            )

            gw.proc.kill()
            await gw.proc.wait()
            for s in streams:  # cut mid-stream: a broken transfer, never a clean end
                with pytest.raises(aiohttp.ClientPayloadError):
                    await s.read()
            for task in plain:
                with pytest.raises(aiohttp.ServerDisconnectedError):
                    await task
            with pytest.raises(aiohttp.ClientConnectorError):  # nobody listens now
                await http.post(url, json=_body(replicas[0].model, 2))
            await _idle(replicas)  # the replicas saw the connections drop and stopped

            # A new process on the same port; the first request it accepts succeeds (it waits
            # for the replicas' model lists if it must, it is never refused).
            second = await start_gateway(urls, log_dir=tmp_path / "second", port=port,
                                         wait_ready=False)  # fmt: skip
            async with http.post(url, json=_body(replicas[0].model, 4, stream=False)) as resp:
                assert resp.status == 200
            async with http.post(url, json=_body(replicas[0].model, 4)) as resp:
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    finally:
        for p in (gw, second):
            if p is not None and p.proc.returncode is None:
                await p.stop()


async def test_clients_walking_away_mid_stream_are_counted_and_not_logged_as_errors(
    tmp_path: Path,
) -> None:
    # The soak found that under uvloop a client's FIN can surface as a reset on the next write
    # instead of as handler cancellation (aiohttp then logged a 500 with a traceback; the
    # deterministic test of that is in test_faults.py). Here, end to end: every walk-away is
    # a 499, nothing stays in flight on either side, nothing is logged as an error. The
    # replicas run in their own process, as in production, so tokens keep coming meanwhile.
    sims, urls = await start_sim_process(2, step_s=0.02, max_num_seqs=64, log_dir=tmp_path)
    gw = await start_gateway(urls, log_dir=tmp_path)
    try:
        async with aiohttp.ClientSession() as http:
            url = gw.api + "/v1/chat/completions"
            async with http.get(gw.api + "/v1/models") as resp:
                model = (await resp.json())["data"][0]["id"]

            async def walk_away() -> None:
                async with http.post(url, json=_body(model, 20)) as resp:
                    async for _ in resp.content.iter_any():
                        break
                # leaving the block releases the connection: the client closes it (FIN)

            await asyncio.gather(*(walk_away() for _ in range(40)))
            async with asyncio.timeout(5):  # another process's counter: polled
                while await _requests_with_code(http, gw, "499") < 40:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            assert await _requests_with_code(http, gw, "499") == 40
            async with asyncio.timeout(5):
                while await _inflight(http, gw, urls) != (0, 0):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        assert "Error handling request" not in gw.log_text()
        assert "Traceback" not in gw.log_text()
    finally:
        await stop_all(gw, sims)


async def _inflight(
    http: aiohttp.ClientSession, gw: GatewayProc, urls: list[str]
) -> tuple[int, int]:
    """(gateway's in-flight total, replicas' in-flight total)."""
    async with http.get(gw.admin + "/debug/replicas") as resp:
        gateway = sum(r["inflight"] for r in (await resp.json())["replicas"])
    replicas = 0
    for url in urls:
        async with http.get(url + "/sim/state") as resp:
            replicas += (await resp.json())["inflight_requests"]
    return gateway, replicas
