"""Request validation and shaping: every client error in the OpenAI shape, model routing and
defaults, request ids, and the headers the replica receives."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from gateway.app import GatewayServer
from gateway.proxy import _event_boundary
from gateway.upstream import request_fields, response_fields
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import StartGateway, sample

JSON = {"Content-Type": "application/json"}
TEXT = {"Content-Type": "text/plain"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
async def one(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> tuple[str, GatewayServer]:
    (replica,) = await start_replicas(1)
    return replica.model, await start_gateway([replica.url], upstream={"max_body_bytes": 4096})


async def _post(
    server: GatewayServer, path: str, **kwargs: Any
) -> tuple[int, CIMultiDictProxy[str], Any]:
    url = f"http://127.0.0.1:{server.port}{path}"
    async with aiohttp.ClientSession() as http, http.post(url, **kwargs) as resp:
        body = await resp.json(content_type=None)
        return resp.status, resp.headers, body


def _assert_openai_error(body: Any, code: str, type_: str = "invalid_request_error") -> None:
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["type"] == type_
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"data": b"{not json", "headers": JSON}, 400, "invalid_json"),
        ({"json": [1, 2]}, 400, "invalid_request"),
        ({"json": "text"}, 400, "invalid_request"),
        ({"data": b"", "headers": JSON}, 400, "invalid_json"),
        ({"json": {"model": 5, "messages": []}}, 400, "invalid_request"),
        ({"json": {"model": "x", "stream": "yes"}}, 400, "invalid_request"),
        ({"json": {"model": "no-such-model", "messages": []}}, 404, "model_not_found"),
        ({"data": b"a=b", "headers": TEXT}, 415, "unsupported_media_type"),
        ({"data": b"{}", "headers": FORM}, 415, "unsupported_media_type"),
        ({"json": {"model": "x", "pad": "a" * 5000}}, 413, "request_too_large"),
    ],
    ids=["invalid-json", "array", "string", "empty", "model-int", "stream-str", "unknown-model",
         "text-plain", "form", "too-large"],
)  # fmt: skip
async def test_client_errors_in_openai_shape(
    one: tuple[str, GatewayServer], kwargs: dict[str, Any], status: int, code: str
) -> None:
    _, server = one
    got, headers, body = await _post(server, "/v1/chat/completions", **kwargs)
    assert got == status
    _assert_openai_error(body, code)
    assert headers["Content-Type"].startswith("application/json")
    assert len(headers["x-request-id"]) == 32
    answered = [
        s.value
        for m in server.gateway.registry.collect()
        for s in m.samples
        if s.name == "kvgate_requests_total" and s.labels["code"] == str(status)
    ]
    assert sum(answered) == 1
    assert server.gateway.pool.total_inflight() == 0


async def test_chunked_body_over_the_limit_is_rejected_before_being_read_whole(
    one: tuple[str, GatewayServer],
) -> None:
    _, server = one
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"model": "x", "pad": "'
        for _ in range(64):  # up to 64 KiB, far over the 4 KiB limit
            sent += 1024
            yield b"a" * 1024
        yield b'"}'

    status, _, payload = await _post(
        server, "/v1/completions", data=body(), headers={"Content-Type": "application/json"}
    )
    assert status == 413
    _assert_openai_error(payload, "request_too_large")


async def test_unknown_routes_and_methods_use_the_same_shape(
    one: tuple[str, GatewayServer],
) -> None:
    _, server = one
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{server.port}/v1/nothing") as resp:
            assert resp.status == 404
            _assert_openai_error(await resp.json(), "not_found")
        async with http.get(f"http://127.0.0.1:{server.port}/v1/chat/completions") as resp:
            assert resp.status == 405
            _assert_openai_error(await resp.json(), "method_not_allowed")


async def test_missing_model_uses_the_single_served_model(one: tuple[str, GatewayServer]) -> None:
    model, server = one
    status, _, body = await _post(
        server, "/v1/completions", json={"prompt": "hello", "max_tokens": 3}
    )
    assert status == 200
    assert body["model"] == model  # the replica got the spliced-in model


async def test_missing_model_with_several_models(
    start_replicas: StartReplicas, start_gateway: StartGateway, fast_settings: Any
) -> None:
    (a,) = await start_replicas(1)
    (b,) = await start_replicas(1, replace(fast_settings, model="second"))
    server = await start_gateway([a.url, b.url])
    status, _, body = await _post(server, "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert status == 400
    _assert_openai_error(body, "model_required")
    with_default = await start_gateway([a.url, b.url], models={"default_model": "second"})
    status, _, body = await _post(
        with_default, "/v1/completions", json={"prompt": "x", "max_tokens": 2}
    )
    assert status == 200
    assert body["model"] == "second"
    assert b.requests_finished == 1 and a.requests_seen == 0


async def test_no_ready_replica_is_503_with_retry_after(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    (a,) = await start_replicas(1)
    await a.crash()  # refuses connections: it never lists its models, so it stays starting
    # With the buffer off, a request that no replica can take now is refused at once (with the
    # buffer on it would wait for the replica to come up: tests/gateway/test_buffer.py).
    server = await start_gateway([a.url], buffer={"max_queued_per_model": 0})
    status, headers, body = await _post(
        server, "/v1/chat/completions", json={"model": "anything", "messages": []}
    )
    assert status == 503
    assert headers["Retry-After"] == "1"
    _assert_openai_error(body, "no_replica", "server_error")
    assert (
        sample(
            server, "kvgate_routing_decisions_total", policy="round_robin", reason="no_candidate"
        )
        == 1
    )


async def test_request_id_is_kept_or_generated(one: tuple[str, GatewayServer]) -> None:
    model, server = one
    req = {"model": model, "prompt": "x", "max_tokens": 2}
    _, headers, _ = await _post(
        server, "/v1/completions", json=req, headers={"x-request-id": "abc-123"}
    )
    assert headers["x-request-id"] == "abc-123"
    _, headers, _ = await _post(
        server, "/v1/completions", json=req, headers={"x-request-id": "a b;" + "x" * 200}
    )
    assert headers["x-request-id"] != "a b;" + "x" * 200 and len(headers["x-request-id"]) == 32
    _, headers, _ = await _post(server, "/v1/completions", json={"model": 1})
    assert len(headers["x-request-id"]) == 32


def test_hop_by_hop_headers_are_stripped_and_forwarding_headers_set() -> None:
    incoming = [
        (b"Host", b"gateway:8080"),
        (b"Connection", b"keep-alive, X-Secret-Hop"),
        (b"Keep-Alive", b"timeout=5"),
        (b"X-Secret-Hop", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"TE", b"trailers"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Content-Length", b"10"),
        (b"Authorization", b"Bearer sk-test"),
        (b"X-Forwarded-For", b"10.0.0.1"),
        (b"X-Request-Id", b"the-clients"),
        (b"OpenAI-Organization", b"org"),
    ]

    def fields(**kw: object) -> list[tuple[str, str]]:
        args: dict[str, object] = {
            "client_ip": "127.0.0.1",
            "request_id": "rid-1",
            "forward_auth": False,
            "authorization": None,
        }
        out = request_fields(incoming, **(args | kw))  # type: ignore[arg-type]
        assert out.endswith(b"\r\n")
        lines = out.decode().split("\r\n")[:-1]
        return [(k, v) for k, _, v in (line.partition(": ") for line in lines)]

    assert fields() == [
        ("OpenAI-Organization", "org"),
        ("X-Forwarded-For", "10.0.0.1, 127.0.0.1"),
        ("Content-Type", "application/json"),
        ("x-request-id", "rid-1"),
    ]
    assert ("Authorization", "Bearer sk-test") in fields(forward_auth=True)
    replaced = fields(forward_auth=True, authorization="Bearer upstream")
    assert [v for k, v in replaced if k == "Authorization"] == ["Bearer upstream"]
    upstream = [
        (b"Content-Type", b"text/event-stream"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"close, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Content-Length", b"99"),
        (b"Date", b"x"),
        (b"Server", b"uvicorn"),
        (b"X-Request-Id", b"the-replicas"),
        (b"Cache-Control", b"no-cache"),
    ]
    assert response_fields(upstream, "rid-1") == (
        b"Content-Type: text/event-stream\r\nCache-Control: no-cache\r\nx-request-id: rid-1\r\n"
    )


async def test_large_non_streaming_bodies_pass_through_as_they_arrive(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    (replica,) = await start_replicas(1)
    # Bodies over 512 bytes are not held: they are streamed with the replica's length.
    server = await start_gateway([replica.url], upstream={"max_buffered_response_bytes": 512})
    req = {"model": replica.model, "input": [f"text {i}" for i in range(20)]}
    raw: list[bytes] = []
    async with aiohttp.ClientSession() as http:
        for base in (replica.url, f"http://127.0.0.1:{server.port}"):
            async with http.post(base + "/v1/embeddings", json=req) as resp:
                assert resp.status == 200
                raw.append(await resp.read())
                length = resp.headers.get("Content-Length")
    assert len(raw[1]) > 512 and length == str(len(raw[1]))
    direct, via = (re.sub(rb'"(id|created)":("[^"]*"|\d+)', b"", r) for r in raw)
    assert via == direct


@pytest.mark.parametrize(
    ("buf", "cut"),
    [
        (b"", 0),
        (b"data: 1", 0),
        (b"data: 1\n\n", 9),
        (b"data: 1\n\ndata: 2", 9),
        (b"data: 1\n\ndata: 2\n\n", 18),
        (b"data: 1\r\n\r\ndata: 2", 11),
        (b": keep-alive\n\n", 14),
    ],
)
def test_sse_event_boundary(buf: bytes, cut: int) -> None:
    assert _event_boundary(buf) == cut
