"""The official openai SDK through the gateway sees exactly what it sees from the replica."""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace
from typing import Any

import aiohttp
import openai

from benchmarks.sim.server import SimReplica
from gateway.app import GatewayServer
from tests.benchmarks.conftest import StartReplicas
from tests.gateway.conftest import StartGateway, sample

_VOLATILE = re.compile(rb'"(id|created)":("[^"]*"|\d+)')


def _base(server: GatewayServer) -> str:
    return f"http://127.0.0.1:{server.port}/v1"


def _normal(obj: Any) -> Any:
    """An SDK object as plain data without the per-response id and timestamp."""
    data = obj.model_dump()
    data.pop("id", None)
    data.pop("created", None)
    return data


async def _both(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> tuple[SimReplica, GatewayServer]:
    (replica,) = await start_replicas(1)
    return replica, await start_gateway([replica.url])


async def test_async_sdk_chat_completions_and_embeddings_match(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    replica, server = await _both(start_replicas, start_gateway)
    model = replica.model
    messages: Any = [{"role": "user", "content": "Say something short."}]
    results: list[list[Any]] = []
    for base in (replica.url + "/v1", _base(server)):
        async with openai.AsyncOpenAI(base_url=base, api_key="k", max_retries=0) as client:
            chat = await client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=12,
                seed=5,
            )
            stream = await client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=12,
                seed=5,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [_normal(c) async for c in stream]
            completion = await client.completions.create(
                model=model, prompt="Once upon a time", max_tokens=6, seed=2
            )
            cstream = await client.completions.create(
                model=model, prompt="Once upon a time", max_tokens=6, seed=2, stream=True
            )
            cchunks = [_normal(c) async for c in cstream]
            emb = await client.embeddings.create(model=model, input=["a b c", "d e"])
            results.append([_normal(chat), chunks, _normal(completion), cchunks, _normal(emb)])
    direct, via = results
    assert via == direct
    chat = via[0]
    assert chat["usage"]["completion_tokens"] > 0
    assert chat["choices"][0]["message"]["content"]
    assert via[1][-1]["usage"] is not None  # the usage chunk came through
    assert len(via[4]["data"]) == 2
    assert sample(server, "kvgate_requests_total", model=model, code="200") == 5


async def test_sync_sdk_streaming_and_not(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    replica, server = await _both(start_replicas, start_gateway)

    def run(base: str) -> list[Any]:
        # The sync client blocks: it runs in a thread so the gateway's loop keeps serving.
        with openai.OpenAI(base_url=base, api_key="k", max_retries=0) as client:
            msgs: Any = [{"role": "user", "content": "hello there"}]
            chat = client.chat.completions.create(
                model=replica.model, messages=msgs, max_tokens=7, seed=1
            )
            stream = client.chat.completions.create(
                model=replica.model, messages=msgs, max_tokens=7, seed=1, stream=True
            )
            return [_normal(chat), [_normal(c) for c in stream], client.models.list().data[0].id]

    direct = await asyncio.to_thread(run, replica.url + "/v1")
    via = await asyncio.to_thread(run, _base(server))
    assert via == direct
    assert via[2] == replica.model


async def test_sse_bytes_pass_through_unchanged(
    start_replicas: StartReplicas, start_gateway: StartGateway
) -> None:
    replica, server = await _both(start_replicas, start_gateway)
    body = {
        "model": replica.model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 20,
        "seed": 9,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    raw: list[bytes] = []
    async with aiohttp.ClientSession() as http:
        for base in (replica.url, f"http://127.0.0.1:{server.port}"):
            async with http.post(base + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                raw.append(await resp.read())
    direct, via = (_VOLATILE.sub(b"", r) for r in raw)
    assert via == direct
    assert via.endswith(b"data: [DONE]\n\n")


async def test_models_is_the_union_of_the_replicas_models(
    start_replicas: StartReplicas, start_gateway: StartGateway, fast_settings: Any
) -> None:
    a, b = await start_replicas(2)
    (c,) = await start_replicas(1, replace(fast_settings, model="other-model"))
    server = await start_gateway([a.url, b.url, c.url])
    async with openai.AsyncOpenAI(base_url=_base(server), api_key="k", max_retries=0) as client:
        listed = await client.models.list()
        assert sorted(m.id for m in listed.data) == sorted({a.model, "other-model"})
        # Routing by model: only the replica serving "other-model" gets it.
        for _ in range(4):
            await client.completions.create(model="other-model", prompt="x", max_tokens=2)
    assert c.requests_seen == 4
    assert a.requests_seen == b.requests_seen == 0
