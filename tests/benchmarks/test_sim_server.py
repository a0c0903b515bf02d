"""The simulated replica's HTTP face, driven by the official openai SDK and raw aiohttp.

Real in-process replicas (2 ms steps, see conftest); every wait is bounded.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.sim.exposition import FLAVOURS, METRICS_PATH, Flavour
from benchmarks.sim.openai_shapes import count_tokens, render_chat
from benchmarks.sim.server import REPLICA, ReplicaSettings, SimReplica, build_replica_app
from tests.benchmarks.conftest import StartReplicas

MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Explain KV caches. " * 12},
]
PROMPT_TOKENS = count_tokens(render_chat(MESSAGES))


def sdk(replica: SimReplica, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{replica.url}/v1", api_key="sim", max_retries=0, **kw)


async def sse_events(resp: aiohttp.ClientResponse) -> list[bytes]:
    """The SSE payloads of a response, in order (the ``data: `` prefix removed)."""
    body = await resp.read()
    events = [e for e in body.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events), events
    return [e[len(b"data: ") :] for e in events]


async def test_chat_stream_has_vllm_chunk_shape_and_usage(sim_replica: SimReplica) -> None:
    client = sdk(sim_replica)
    stream = await client.chat.completions.create(
        model=sim_replica.model,
        messages=MESSAGES,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [c async for c in stream]
    await client.close()
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    tokens = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert len(tokens) == 12 and all(tokens)
    assert [c.choices[0].finish_reason for c in chunks[1:-1]] == [None] * 11 + ["length"]
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == PROMPT_TOKENS
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.total_tokens == PROMPT_TOKENS + 12
    assert len("".join(t or "" for t in tokens)) == 4 * 12  # ~4 characters per token


async def test_raw_sse_stream_ends_with_done(sim_replica: SimReplica) -> None:
    body = {"prompt": "once upon a time", "max_tokens": 3, "stream": True, "ignore_eos": True}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{sim_replica.url}/v1/completions", json=body) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = await sse_events(resp)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert len(chunks) == 3  # no role chunk and no usage chunk for a plain completion stream
    assert all(c["object"] == "text_completion" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]


async def test_completions_stream_with_token_ids_and_usage(sim_replica: SimReplica) -> None:
    client = sdk(sim_replica)
    stream = await client.completions.create(
        model=sim_replica.model,
        prompt=list(range(40)),
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [c async for c in stream]
    await client.close()
    assert [c.choices[0].text for c in chunks[:-1]] == [" the", " and", " for", " are", " but"]
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (40, 5)


async def test_sync_client_streaming_and_not(sim_replica: SimReplica) -> None:
    url, model = f"{sim_replica.url}/v1", sim_replica.model

    def run() -> tuple[int, int, str | None]:  # the sync client blocks: keep it off the loop
        with openai.OpenAI(base_url=url, api_key="sim", max_retries=0) as client:
            full = client.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=7, extra_body={"ignore_eos": True}
            )
            assert full.usage is not None
            stream = client.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=4, stream=True
            )
            parts = [c.choices[0].delta.content for c in stream if c.choices]
            return full.usage.completion_tokens, len(parts), full.choices[0].finish_reason

    completion_tokens, n_chunks, finish = await asyncio.to_thread(run)
    assert (completion_tokens, finish) == (7, "length")
    assert n_chunks == 1 + 4  # role chunk + at most max_tokens tokens (default mean 256 > 4)


async def test_non_streaming_usage_and_text(sim_replica: SimReplica) -> None:
    client = sdk(sim_replica)
    chat = await client.chat.completions.create(
        model=sim_replica.model,
        messages=MESSAGES,
        max_completion_tokens=9,
        extra_body={"ignore_eos": True},
    )
    text = await client.completions.create(
        model=sim_replica.model, prompt="x" * 400, max_tokens=3, extra_body={"ignore_eos": True}
    )
    await client.close()
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.completion_tokens == 9
    assert chat.usage.prompt_tokens == PROMPT_TOKENS
    assert len(chat.choices[0].message.content or "") == 36
    assert text.usage is not None and (text.usage.prompt_tokens, text.usage.completion_tokens) == (
        100,
        3,
    )
    assert text.choices[0].finish_reason == "length"


async def test_output_length_stops_early_honours_min_tokens_and_seed(
    start_replicas: StartReplicas,
) -> None:
    (replica,) = await start_replicas(1, ReplicaSettings.fast(output_tokens_mean=4.0))
    client = sdk(replica)

    async def run(**extra: Any) -> tuple[int, str]:
        r = await client.completions.create(
            model=replica.model, prompt="hello", max_tokens=500, extra_body=extra
        )
        assert r.usage is not None
        return r.usage.completion_tokens, r.choices[0].finish_reason

    free = [await run() for _ in range(5)]
    assert all(n < 500 and reason == "stop" for n, reason in free)
    for _ in range(3):
        assert (await run(min_tokens=30))[0] >= 30
    assert await run(seed=7) == await run(seed=7)
    await client.close()


async def test_explicit_prompt_token_count(sim_replica: SimReplica) -> None:
    client = sdk(sim_replica)
    r = await client.chat.completions.create(
        model=sim_replica.model,
        messages=MESSAGES,
        max_tokens=2,
        extra_body={"sim_prompt_tokens": 540},
    )
    await client.close()
    assert r.usage is not None and r.usage.prompt_tokens == 540
    assert sim_replica.engine.stats.prompt_tokens == 540


async def test_bad_requests_get_openai_errors(sim_replica: SimReplica) -> None:
    client = sdk(sim_replica)
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.chat.completions.create(model="nope", messages=MESSAGES)
    assert "does not exist" in not_found.value.message
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        await client.completions.create(model=sim_replica.model, prompt="hi", max_tokens=10**6)
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model=sim_replica.model, messages=[])
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model=sim_replica.model, prompt="hi", n=2)
    await client.close()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{sim_replica.url}/v1/chat/completions", data=b"{not json") as r:
            assert r.status == 400
            error = (await r.json())["error"]
        async with http.post(
            f"{sim_replica.url}/v1/completions",
            json={"prompt": "hi", "stream_options": {"include_usage": True}},
        ) as r:
            assert r.status == 400
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 400
    assert sim_replica.requests_rejected == 6 and sim_replica.requests_admitted == 0


async def test_models_and_embeddings(sim_replica: SimReplica) -> None:
    client = sdk(sim_replica)
    models = await client.models.list()
    assert [m.id for m in models.data] == [sim_replica.model]
    assert models.data[0].owned_by == "vllm"
    first = await client.embeddings.create(model=sim_replica.model, input=["a b c", "d"])
    again = await client.embeddings.create(model=sim_replica.model, input="a b c")
    await client.close()
    assert [len(d.embedding) for d in first.data] == [64, 64]
    assert first.data[0].embedding == again.data[0].embedding
    assert first.data[0].embedding != first.data[1].embedding
    assert abs(sum(v * v for v in first.data[0].embedding) - 1.0) < 1e-6


async def test_shared_prefix_hits_the_prefix_cache(sim_replica: SimReplica) -> None:
    client = sdk(sim_replica)
    prompt = "a shared system prompt " * 60  # ~345 tokens: 21 whole blocks
    for suffix in ("first question", "second question"):
        await client.completions.create(
            model=sim_replica.model, prompt=prompt + suffix, max_tokens=1
        )
    await client.close()
    stats = sim_replica.engine.stats
    assert stats.prefix_cache_hits >= 20 * 16  # the second prompt reused the shared blocks


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_metrics_page_per_flavour(start_replicas: StartReplicas, flavour: Flavour) -> None:
    (replica,) = await start_replicas(1, ReplicaSettings.fast(flavour=flavour))
    expected = {
        "vllm-v0": ("vllm:gpu_cache_usage_perc", "vllm:num_requests_waiting"),
        "vllm-v1": ("vllm:kv_cache_usage_perc", "vllm:num_requests_waiting"),
        "nim": ("gpu_cache_usage_perc", "num_requests_waiting"),
        "sglang": ("sglang:token_usage", "sglang:num_queue_reqs"),
    }[flavour]
    client = sdk(replica)
    await client.completions.create(
        model=replica.model, prompt="hi", max_tokens=5, extra_body={"ignore_eos": True}
    )
    await client.close()
    async with aiohttp.ClientSession() as http:
        async with http.get(replica.url + METRICS_PATH[flavour]) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            text = await resp.text()
        other = "/metrics" if flavour == "nim" else "/v1/metrics"
        async with http.get(replica.url + other) as resp:
            assert resp.status == 404
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in expected:
        (sample,) = families[name].samples
        assert sample.labels.get("model_name", replica.model) == replica.model
        assert sample.value == 0.0  # idle again
    if flavour == "vllm-v1":
        assert families[expected[0]].samples[0].labels["engine"] == "0"
    generation = next(f for n, f in families.items() if n.endswith("generation_tokens"))
    assert generation.samples[0].value == 5.0
    assert replica.metrics_scrapes == 1


async def test_client_disconnect_aborts_streaming_request(sim_replica: SimReplica) -> None:
    body = {"prompt": "x" * 800, "max_tokens": 5000, "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{sim_replica.url}/v1/completions", json=body)
        await resp.content.readuntil(b"\n\n")  # the first token arrived: KV is held
        assert sim_replica.engine.stats.kv_usage > 0
        resp.close()
        await sim_replica.wait_for(lambda r: r.requests_aborted == 1, timeout_s=2.0)
    engine = sim_replica.engine
    assert not engine.has_work() and sim_replica.inflight_streams == 0
    assert engine.num_free_blocks == sim_replica.profile.num_gpu_blocks - 1  # all KV freed
    assert engine.stats.kv_usage == 0.0


async def test_client_disconnect_aborts_non_streaming_request(sim_replica: SimReplica) -> None:
    body = {"prompt": "x" * 800, "max_tokens": 5000, "ignore_eos": True}
    async with aiohttp.ClientSession() as http:
        task = asyncio.create_task(http.post(f"{sim_replica.url}/v1/completions", json=body))
        await sim_replica.wait_for(lambda r: r.engine.stats.generation_tokens > 3, timeout_s=2.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await sim_replica.wait_for(lambda r: r.requests_aborted == 1, timeout_s=2.0)
    assert not sim_replica.engine.has_work()
    assert sim_replica.requests_finished == 0


async def test_concurrent_streams_all_complete(sim_replica: SimReplica) -> None:
    client = sdk(sim_replica)

    async def one(n: int) -> int:
        stream = await client.completions.create(
            model=sim_replica.model,
            prompt="p" * (40 * n),
            max_tokens=n,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return len([c async for c in stream if c.choices and c.choices[0].text])

    counts = await asyncio.gather(*(one(n) for n in range(1, 21)))
    await client.close()
    assert counts == list(range(1, 21))
    r = sim_replica
    assert r.requests_finished == r.requests_admitted == 20 and r.inflight_requests == 0
    sim_replica.engine.check_invariants()


async def test_app_under_a_foreign_runner(aiohttp_client: Any) -> None:
    app = build_replica_app(ReplicaSettings.fast(), rng_seed=3)
    client = await aiohttp_client(app)
    replica = app[REPLICA]
    assert replica.phase == "ready"
    resp = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert resp.status == 200 and (await resp.json())["usage"]["completion_tokens"] <= 2
    assert replica.requests_finished == 1


async def test_cli_serves_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.sim", "--replicas", "2", "--port", "0",
        "--load-time-s", "0", "--engine", "sglang", "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        urls = [
            (await asyncio.wait_for(proc.stdout.readline(), 10.0)).decode().strip()
            for _ in range(2)
        ]
        async with aiohttp.ClientSession() as http:
            for url in urls:
                async with http.get(url + "/metrics") as resp:
                    assert resp.status == 200 and "sglang:num_queue_reqs" in await resp.text()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10.0) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
