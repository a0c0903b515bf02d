"""Replicas that crash, hang or lie, driven through the whole gateway with the simulator's fault
controls and with real servers serving broken ``/metrics`` pages.

What each test proves is in its name; the shared rule is that after every fault the gateway's
in-flight counts equal the replicas' own (compared with the simulator's counters, not assumed),
nothing is left behind, and the gateway keeps serving."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from benchmarks.sim.server import ReplicaSettings, SimReplica
from gateway.app import GatewayServer
from gateway.http_server import Request
from gateway.log import AccessRecord
from gateway.scrape_http import MAX_PAGE_BYTES
from gateway.upstream import MAX_CONTROL_BODY_BYTES
from policies.types import ReplicaId
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import StartGateway, sample, wait_pool
from tests.gateway.scripted_replica import (
    FIXTURES,
    ScriptedReplica,
    StartScripted,
    scripted_replicas,
    vllm_page,
)

CHAT = "/v1/chat/completions"
# Eject on the second failure in a row, and keep the replica out for the whole test.
HEALTH = {"consecutive_failures": 2, "base_ejection_s": 30.0, "max_ejection_s": 60.0}


@pytest.fixture
async def start_scripted() -> AsyncIterator[StartScripted]:
    async with scripted_replicas() as start:
        yield start


def _rid(replica: SimReplica | ScriptedReplica) -> ReplicaId:
    return ReplicaId(replica.url.removeprefix("http://"))


def _body(model: str, *, stream: bool, tokens: int = 8) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": stream,
    }


async def _debug(server: GatewayServer) -> dict[str, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{server.admin_port}/debug/replicas") as resp,
    ):
        return {r["id"]: r for r in (await resp.json())["replicas"]}


def _counts_agree(server: GatewayServer, replicas: list[SimReplica]) -> None:
    pool = server.gateway.pool
    gateway = {_rid(r): pool.inflight(_rid(r)) for r in replicas if _rid(r) in pool}
    truth = {_rid(r): r.inflight_requests for r in replicas if _rid(r) in pool}
    assert gateway == truth


def _events(raw: bytes) -> list[bytes]:
    return [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e.startswith(b"data: ")]


# -- a replica crashes ------------------------------------------------------------------------


async def test_replica_crash_mid_stream_is_explicit_ejected_and_counts_return_to_truth(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    replicas = await start_replicas(3, ReplicaSettings.fast(step_s=0.01))
    victim, others = replicas[0], replicas[1:]
    server = await start_gateway([r.url for r in replicas], health=HEALTH)
    pool = server.gateway.pool
    url = f"http://127.0.0.1:{server.port}{CHAT}"
    model = victim.model
    async with aiohttp.ClientSession() as http:
        # Round-robin: 6 streams and 3 non-streaming requests, 2 + 1 on each replica.
        streams: list[tuple[aiohttp.ClientResponse, bool]] = []
        for _ in range(6):
            before = victim.inflight_requests
            resp = await http.post(url, json=_body(model, stream=True, tokens=150))
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")
            streams.append((resp, victim.inflight_requests > before))
        body = _body(model, stream=False, tokens=150)
        plain = [asyncio.create_task(http.post(url, json=body)) for _ in range(3)]
        for replica in replicas:
            await replica.wait_for(lambda r: r.inflight_requests == 3)
        _counts_agree(server, replicas)  # 3 on each replica, on both sides

        errors_before = sample(server, "kvgate_upstream_errors_total", reason="connect")
        await victim.crash()
        assert sum(on_victim for _, on_victim in streams) == 2
        for s, on_victim in streams:
            events = _events(await s.read())
            if on_victim:
                assert b"[DONE]" not in events
                assert orjson.loads(events[-1])["error"]["code"] == "upstream_disconnected"
            else:
                assert events[-1] == b"[DONE]"
        for task in plain:  # the one on the victim is retried elsewhere: nothing had been sent
            async with await task as resp:
                assert resp.status == 200
        assert sample(server, "kvgate_retries_total", reason="upstream_disconnected") == 1

        assert (await _debug(server))[_rid(victim)]["phase"] == "ejected"
        for _ in range(8):  # new requests go elsewhere, without even trying the victim
            async with http.post(url, json=_body(model, stream=False)) as resp:
                assert resp.status == 200
        assert sample(server, "kvgate_upstream_errors_total", reason="connect") == errors_before
    await wait_pool(pool, lambda: pool.total_inflight() == 0)
    _counts_agree(server, replicas)
    assert all(r.inflight_requests == 0 for r in others)
    assert victim.requests_aborted == 3


async def test_non_streaming_request_on_a_crashing_replica_is_a_502_when_it_cannot_retry(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    (victim,) = await start_replicas(1, ReplicaSettings.fast(step_s=0.01))
    server = await start_gateway([victim.url], upstream={"max_attempts": 1})
    pool = server.gateway.pool
    async with aiohttp.ClientSession() as http:
        task = asyncio.create_task(
            http.post(f"http://127.0.0.1:{server.port}{CHAT}",
                      json=_body(victim.model, stream=False, tokens=200))
        )  # fmt: skip
        await victim.wait_for(lambda r: r.inflight_requests == 1)
        await victim.crash()
        async with await task as resp:
            assert resp.status == 502
            err = (await resp.json())["error"]
    assert err["code"] == "upstream_disconnected" and err["type"] == "server_error"
    await wait_pool(pool, lambda: pool.total_inflight() == 0)
    assert victim.inflight_requests == 0


# -- a replica hangs ----------------------------------------------------------------------


async def test_a_hung_replica_times_out_is_retried_elsewhere_and_ejected(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    hung, good = await start_replicas(2)
    server = await start_gateway(
        [hung.url, good.url],
        health=HEALTH,
        upstream={"first_byte_timeout_s": 0.3},
        scraper={"interval_s": 0.1, "timeout_s": 0.05, "max_metrics_age_s": 0.5},
    )
    hung.hang()
    url = f"http://127.0.0.1:{server.port}{CHAT}"
    async with aiohttp.ClientSession() as http:
        for i in range(4):  # round-robin: 0 and 2 try the hung replica first
            async with http.post(url, json=_body(good.model, stream=i % 2 == 0)) as resp:
                assert resp.status == 200
                await resp.read()
        assert sample(server, "kvgate_upstream_errors_total", reason="timeout") == 2
        assert sample(server, "kvgate_retries_total", reason="upstream_timeout") == 2
        assert (await _debug(server))[_rid(hung)]["phase"] == "ejected"
        started = time.monotonic()
        for _ in range(4):  # ejected: no more waiting for it
            async with http.post(url, json=_body(good.model, stream=False)) as resp:
                assert resp.status == 200
        assert time.monotonic() - started < 4 * 0.3  # none of them waited for a timeout
    assert sample(server, "kvgate_upstream_errors_total", reason="timeout") == 2
    assert good.requests_finished == 8
    # The hung replica's scrape times out on its own; the good one's stays fresh.
    scraper = server.gateway.scraper
    started = time.monotonic()
    await scraper.scrape_once()
    assert time.monotonic() - started < 1.0  # bounded by timeout_s, not by the hung replica
    report = await _debug(server)
    assert report[_rid(hung)]["scrape_error"] == "timeout"
    assert report[_rid(good)]["scrape_error"] is None
    assert report[_rid(good)]["metrics_age_s"] < 0.5
    hung.unhang()
    pool = server.gateway.pool
    await wait_pool(pool, lambda: pool.total_inflight() == 0)
    assert hung.inflight_requests == 0  # the abandoned attempts were closed, not left running


# -- a replica's /metrics lies ---------------------------------------------------------------

_SGLANG = (FIXTURES / "sglang-docs-2024-llama-3.1-8b.txt").read_bytes()
_VLLM = (FIXTURES / "handmade-vllm-v1-0.11-dp2.txt").read_bytes()


def _huge_page() -> bytes:
    line = b'vllm:num_requests_waiting{engine="0",model_name="m",pad="' + b"x" * 1000 + b'"} 1\n'
    return line * (MAX_PAGE_BYTES // len(line) + 2)


# (page, extra scraper config, expected scrape-error reason or None when the scrape succeeds
# but yields nothing usable)
METRICS_FAULTS: dict[str, tuple[bytes, dict[str, Any], int, str | None]] = {
    "garbage": (b"\x00\x01 this is not prometheus {{{ \n" * 50, {}, 200, "unknown_engine"),
    "html error page": (b"<html><body>502 Bad Gateway</body></html>", {}, 200, "unknown_engine"),
    # Cut inside the first waiting series: running is complete, waiting and KV are not.
    "truncated": (_VLLM[: _VLLM.index(b"vllm:num_requests_waiting{") + 40], {}, 200, None),
    "huge": (_huge_page(), {}, 200, "too_large"),
    "nan inf negative": (
        b"vllm:num_requests_waiting NaN\nvllm:num_requests_running -3\n"
        b"vllm:kv_cache_usage_perc +Inf\n",
        {},
        200,
        None,
    ),
    "kv above 1": (vllm_page(waiting=2, kv=7.5), {}, 200, None),
    "wrong engine": (_SGLANG, {"engine": "vllm-v1"}, 200, None),
    "not utf-8": (b"vllm:num_requests_waiting 1\n\xff\xfe\n", {}, 200, "bad_encoding"),
    "http 500": (vllm_page(), {}, 500, "http_status"),
}


@pytest.mark.parametrize("fault", sorted(METRICS_FAULTS))
async def test_broken_metrics_pages_are_unknown_counted_and_routing_falls_back(
    start_scripted: StartScripted, start_gateway: StartGateway, fault: str
) -> None:
    page, scraper_cfg, status, reason = METRICS_FAULTS[fault]
    replicas = await start_scripted(2, metrics=page, metrics_status=status)
    server = await start_gateway(
        [r.url for r in replicas],
        policy={"name": "p2c"},
        # Scraped by the test (scrape_once), not by the background task's 30 s cadence.
        scraper={"interval_s": 30.0, "timeout_s": 2.0, **scraper_cfg},
    )
    gw = server.gateway
    await gw.scraper.scrape_once()
    report = await _debug(server)
    for r in replicas:
        entry = report[_rid(r)]
        assert entry["scrape_error"] == reason
        if reason is not None:
            assert sample(server, "kvgate_scrape_errors_total", replica=_rid(r), reason=reason) >= 1
        # Whatever the page said, nothing unusable became a number: unknown, never 0.
        assert entry["queue_depth"] == (2 if fault == "kv above 1" else None)
        assert entry["kv_usage"] is None
    async with aiohttp.ClientSession() as http:
        for _ in range(6):
            async with http.post(
                f"http://127.0.0.1:{server.port}{CHAT}", json=_body("m", stream=False)
            ) as resp:
                assert resp.status == 200
    # An unknown queue on either candidate: both compared on the gateway's in-flight count.
    # (Only KV unknown: the queues are still compared, KV is skipped.)
    fallbacks = sample(
        server, "kvgate_routing_decisions_total", policy="p2c", reason="p2c_inflight_fallback"
    )
    assert fallbacks == (0 if fault == "kv above 1" else 6)
    assert not gw.failed.is_set()  # the scraper task is alive
    assert gw.pool.total_inflight() == 0


async def test_a_good_page_after_a_bad_one_recovers(
    start_scripted: StartScripted, start_gateway: StartGateway
) -> None:
    (replica,) = await start_scripted(1, metrics=b"garbage\n")
    server = await start_gateway([replica.url], scraper={"interval_s": 30.0, "timeout_s": 2.0})
    await server.gateway.scraper.scrape_once()
    assert (await _debug(server))[_rid(replica)]["scrape_error"] == "unknown_engine"
    replica.metrics = vllm_page(waiting=3, running=2, kv=0.25)
    await server.gateway.scraper.scrape_once()
    entry = (await _debug(server))[_rid(replica)]
    assert (entry["scrape_error"], entry["queue_depth"], entry["running"], entry["kv_usage"]) == (
        None,
        3,
        2,
        0.25,
    )


async def test_a_huge_model_list_is_refused_without_buffering_it(
    start_scripted: StartScripted, start_gateway: StartGateway
) -> None:
    padding = b" " * (MAX_CONTROL_BODY_BYTES + 1)
    hostile, good = await start_scripted(2)
    hostile.models_body = b'{"object": "list", "data": [{"id": "m"}]' + padding + b"}"
    server = await start_gateway([hostile.url, good.url])
    report = await _debug(server)
    assert report[_rid(hostile)]["models"] == [] and report[_rid(hostile)]["phase"] != "ready"
    assert report[_rid(good)]["phase"] == "ready"
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{server.port}{CHAT}", json=_body("m", stream=False)) as resp,
    ):
        assert resp.status == 200
    assert hostile.generation_requests() == []


# -- a client leaves while its response is being written -----------------------------------


async def test_a_client_gone_mid_write_is_a_quiet_499(
    start_replicas: StartReplicas, start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """The request wrapper, in the real server, in front of a route whose client's connection
    closes between two writes (what uvloop reports when a client's FIN arrives in the same loop
    iteration as the next upstream chunk): waiting for the client's buffer then raises a
    connection reset, which must end as a 499 in the metrics, not as a 500 with a traceback in
    the error log."""
    (replica,) = await start_replicas(1)
    server = await start_gateway([replica.url])

    async def route(request: Request, _rec: AccessRecord) -> None:
        resp = request.stream(200, [("Content-Type", "text/event-stream")])
        resp.write(b"data: 1\n\n")
        resp.transport.close()  # closing, not yet closed: the handler is not cancelled
        resp.write(b"data: 2\n\n")
        await resp.drain()  # raises ConnectionResetError

    server.gateway.routes[CHAT] = ("POST", route)
    del server.gateway.fast_routes[CHAT]  # the task path, where the route runs
    caplog.set_level(logging.INFO)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.post(f"http://127.0.0.1:{server.port}{CHAT}", json={}) as resp:
                await resp.read()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert sample(server, "kvgate_requests_total", model="", code="499") == 1
    assert sample(server, "kvgate_requests_total", model="", code="500") == 0
