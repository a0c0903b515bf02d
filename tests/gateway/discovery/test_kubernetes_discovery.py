"""Kubernetes discovery against a real aiohttp API server serving recorded EndpointSlices."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from gateway.discovery import KubeCredentials, KubernetesDiscovery
from gateway.discovery.endpointslice import PortSpec
from tests.gateway.discovery.conftest import load_events, load_json
from tests.gateway.discovery.fake_apiserver import FakeApiServer
from tests.gateway.discovery.recording_sink import RecordingSink, eventually, names, states

P1, P2, P3 = "vllm-7d9f8b6c5-4xk2p", "vllm-7d9f8b6c5-9qz7m", "vllm-7d9f8b6c5-h8w3t"
V1_EVENTS = load_events("endpointslices-v1-watch.jsonl")
MODIFIED_P3_READY, BOOKMARK, MODIFIED_P1_TERMINATING, MODIFIED_P1_GONE = V1_EVENTS[:4]
MODIFIED_P3_MOVED, DELETED_SLICE_B, ERROR_GONE = V1_EVENTS[4:]


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer(versions=("v1", "v1beta1"))
    server.load_list(load_json("endpointslices-v1-list.json"))
    await server.start()
    yield server
    await server.stop()


def discovery_for(
    server: FakeApiServer, *, port: PortSpec = "http", namespace: str = "llm"
) -> KubernetesDiscovery:
    return KubernetesDiscovery(
        KubeCredentials(server=server.url, ssl_context=None),
        "vllm",
        namespace=namespace,
        port=port,
        backoff_initial_s=0.001,
        backoff_max_s=0.01,
        rng=random.Random(0),
    )


@asynccontextmanager
async def running(discovery: KubernetesDiscovery) -> AsyncIterator[RecordingSink]:
    sink = RecordingSink()
    task = asyncio.create_task(discovery.run(sink))
    try:
        yield sink
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_list_then_watch_follows_a_rolling_update(api: FakeApiServer) -> None:
    discovery = discovery_for(api)
    async with running(discovery) as sink:
        first = await sink.wait_count(1)
        assert states(first) == {P1: "ready", P2: "ready", P3: "starting"}
        assert {r.name: r.url for r in first}[P1] == "http://10.244.1.12:8000"
        await api.wait_streams(1)

        api.emit(MODIFIED_P3_READY)  # the model finished loading
        await sink.wait_for(lambda s: states(s)[P3] == "ready")
        api.emit(BOOKMARK)
        api.emit(MODIFIED_P1_TERMINATING)  # rolling restart: not ready, serving, terminating
        await sink.wait_for(lambda s: states(s).get(P1) == "terminating")
        api.emit(MODIFIED_P1_GONE)
        await sink.wait_for(lambda s: P1 not in names(s))
        # The controller moves P3 into slice A, then deletes slice B: one pod in two slices
        # for a moment must not look like a departure.
        api.emit(MODIFIED_P3_MOVED)
        api.emit(DELETED_SLICE_B)
        api.emit(ERROR_GONE)  # the recorded 410 ERROR event: relist
        await api.wait_streams(2)

    assert [states(s) for _, s in sink.snapshots] == [
        {P1: "ready", P2: "ready", P3: "starting"},
        {P1: "ready", P2: "ready", P3: "ready"},
        {P1: "terminating", P2: "ready", P3: "ready"},
        {P2: "ready", P3: "ready"},
    ]
    assert all(source == "kubernetes" for source, _ in sink.snapshots)
    assert discovery.relists_total == 1
    first_list, relist = api.lists()
    assert first_list.query["labelSelector"] == "kubernetes.io/service-name=vllm"
    assert first_list.version == relist.version == "v1"
    watch = api.watches()[0].query
    assert watch["resourceVersion"] == "1204"
    assert watch["allowWatchBookmarks"] == "true"
    assert not discovery.errors.errors_total


async def test_http_410_on_resume_relists(api: FakeApiServer) -> None:
    discovery = discovery_for(api)
    async with running(discovery) as sink:
        await sink.wait_count(1)
        await api.wait_streams(1)
        api.emit(MODIFIED_P3_READY, broadcast=False)  # missed, and then compacted away
        api.compact()
        api.drop_watches()
        await sink.wait_for(lambda s: states(s)[P3] == "ready")
        await api.wait_streams(2)
    assert discovery.relists_total == 1
    assert len(api.lists()) == 2
    assert [w.query["resourceVersion"] for w in api.watches()] == ["1204", "1204", "1231"]


async def test_410_error_event_on_resume_relists(api: FakeApiServer) -> None:
    api.gone_as_event = True
    discovery = discovery_for(api)
    async with running(discovery) as sink:
        await sink.wait_count(1)
        await api.wait_streams(1)
        api.emit(MODIFIED_P3_READY, broadcast=False)
        api.compact()
        api.drop_watches()
        await sink.wait_for(lambda s: states(s)[P3] == "ready")
    assert discovery.relists_total == 1 and len(api.lists()) == 2


async def test_dropped_watch_resumes_from_the_last_bookmark(api: FakeApiServer) -> None:
    discovery = discovery_for(api)
    async with running(discovery) as sink:
        await sink.wait_count(1)
        await api.wait_streams(1)
        api.emit(MODIFIED_P3_READY)
        api.emit(BOOKMARK)
        api.emit(MODIFIED_P1_TERMINATING, broadcast=False)  # happens while disconnected
        api.drop_watches()
        await sink.wait_for(lambda s: states(s).get(P1) == "terminating")
    assert len(api.lists()) == 1, "a dropped connection resumes the watch, it does not relist"
    assert [w.query["resourceVersion"] for w in api.watches()] == ["1204", "1240"]
    assert discovery.errors.errors_total == {"disconnect": 1}
    assert not discovery.errors.failing


async def test_clean_watch_end_rewatches_without_relisting(api: FakeApiServer) -> None:
    discovery = discovery_for(api)
    async with running(discovery) as sink:
        await sink.wait_count(1)
        await api.wait_streams(1)
        api.emit(MODIFIED_P3_READY)
        await sink.wait_count(2)
        api.end_watches()  # the server's timeoutSeconds elapsed
        await api.wait_streams(2)
        api.emit(MODIFIED_P1_TERMINATING)
        await sink.wait_count(3)
    assert len(api.lists()) == 1
    assert [w.query["resourceVersion"] for w in api.watches()] == ["1204", "1231"]
    assert not discovery.errors.errors_total


async def test_events_split_across_chunks_are_reassembled(api: FakeApiServer) -> None:
    api.chunk_bytes = 7
    async with running(discovery_for(api)) as sink:
        await sink.wait_count(1)
        await api.wait_streams(1)
        for event in V1_EVENTS[:-1]:
            api.emit(event)
        await sink.wait_for(lambda s: states(s) == {P2: "ready", P3: "ready"})


async def test_v1beta1_fallback_with_responses_recorded_from_kube_apiserver_1_20() -> None:
    server = FakeApiServer(versions=("v1beta1",))
    server.load_list(load_json("endpointslices-v1beta1-list.json"))
    events = load_events("endpointslices-v1beta1-watch.jsonl")
    (gone,) = load_events("endpointslices-v1beta1-watch-gone.jsonl")
    await server.start()
    try:
        discovery = discovery_for(server, namespace="default")
        async with running(discovery) as sink:
            first = await sink.wait_count(1)
            assert states(first) == {"pod-a": "ready", "pod-b": "starting"}
            await server.wait_streams(1)
            for event in events:
                server.emit(event)
            await sink.wait_for(lambda s: states(s) == {"pod-c": "ready"})
            server.emit(gone)
            await server.wait_streams(2)
    finally:
        await server.stop()
    assert [states(s) for _, s in sink.snapshots] == [
        {"pod-a": "ready", "pod-b": "starting"},
        {"pod-a": "ready", "pod-b": "ready"},
        {"pod-a": "ready", "pod-b": "ready", "pod-c": "ready"},
        {"pod-a": "terminating", "pod-b": "ready", "pod-c": "ready"},
        {"pod-c": "ready"},
    ]
    assert discovery.api_version == "v1beta1" and discovery.relists_total == 1
    assert [(r.version, r.watch) for r in server.requests[:3]] == [
        ("v1", False),
        ("v1beta1", False),
        ("v1beta1", True),
    ]


async def test_api_server_down_keeps_members_and_resumes(api: FakeApiServer) -> None:
    discovery = discovery_for(api)
    async with running(discovery) as sink:
        good = await sink.wait_count(1)
        await api.wait_streams(1)
        port = api.port
        await api.stop()
        await eventually(lambda: discovery.errors.errors_total.get("connect", 0) >= 3)
        assert discovery.errors.failing
        assert sink.snapshots == [("kubernetes", good)]
        api.emit(MODIFIED_P3_READY, broadcast=False)
        await api.start(port)
        await sink.wait_for(lambda s: states(s)[P3] == "ready")
        assert not discovery.errors.failing
    assert len(api.lists()) == 1


async def test_forbidden_is_retried_with_backoff(api: FakeApiServer) -> None:
    api.fail_next = [403, 403, 500]  # e.g. the RBAC Role is applied after the gateway starts
    discovery = discovery_for(api)
    async with running(discovery) as sink:
        await sink.wait_count(1)
    assert discovery.errors.errors_total == {"auth": 2, "http": 1}


@pytest.mark.parametrize(
    ("port", "url"), [(9090, "http://10.244.1.12:9090"), ("metrics", "http://10.244.1.12:9090")]
)
async def test_port_by_number_or_name(api: FakeApiServer, port: PortSpec, url: str) -> None:
    async with running(discovery_for(api, port=port)) as sink:
        first = await sink.wait_count(1)
    assert {r.name: r.url for r in first}[P1] == url


async def test_ambiguous_port_ignores_the_slices(api: FakeApiServer) -> None:
    # Two named ports and none configured: no guess; the snapshot is empty, not wrong.
    async with running(discovery_for(api, port=None)) as sink:
        assert await sink.wait_count(1) == ()


async def test_other_watch_error_events_count_and_relist(api: FakeApiServer) -> None:
    discovery = discovery_for(api)
    async with running(discovery) as sink:
        await sink.wait_count(1)
        await api.wait_streams(1)
        status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500}
        api.emit({"type": "ERROR", "object": {**status, "message": "etcdserver: leader changed"}})
        await api.wait_streams(2)
    assert discovery.errors.errors_total == {"watch_error": 1}
    assert len(api.lists()) == 2 and discovery.relists_total == 0
