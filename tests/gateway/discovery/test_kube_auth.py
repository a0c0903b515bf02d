"""API server credentials: in-cluster service account and kubeconfig, against real TLS servers."""

from __future__ import annotations

import asyncio
import base64
import random
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.discovery import (
    KubeConfigError,
    KubeCredentials,
    KubernetesDiscovery,
    in_cluster_credentials,
    kubeconfig_credentials,
)
from tests.gateway.discovery.conftest import Pki, load_events, load_json
from tests.gateway.discovery.fake_apiserver import FakeApiServer
from tests.gateway.discovery.recording_sink import RecordingSink, eventually, names, states

P3 = "vllm-7d9f8b6c5-h8w3t"
MODIFIED_P3_READY = load_events("endpointslices-v1-watch.jsonl")[0]


def server_tls(pki: Pki, *, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki.ca)
    return context


async def started(server: FakeApiServer) -> FakeApiServer:
    server.load_list(load_json("endpointslices-v1-list.json"))
    await server.start()
    return server


async def first_snapshot(
    creds: KubeCredentials, **kwargs: Any
) -> tuple[KubernetesDiscovery, RecordingSink]:
    discovery = KubernetesDiscovery(
        creds, "vllm", port="http", backoff_initial_s=0.001, backoff_max_s=0.01,
        rng=random.Random(0), **kwargs,
    )  # fmt: skip
    sink = RecordingSink()
    task = asyncio.create_task(discovery.run(sink))
    try:
        await sink.wait_count(1)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    return discovery, sink


@pytest.fixture
async def tls_api(pki: Pki) -> AsyncIterator[FakeApiServer]:
    server = await started(FakeApiServer(token="tok-1", ssl_context=server_tls(pki)))
    yield server
    await server.stop()


def service_account(tmp_path: Path, pki: Pki, token: str) -> Path:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(token)
    shutil.copy(pki.ca, sa / "ca.crt")
    (sa / "namespace").write_text("llm\n")
    return sa


async def test_in_cluster_token_is_reread_after_rotation(
    tls_api: FakeApiServer, pki: Pki, tmp_path: Path
) -> None:
    sa = service_account(tmp_path, pki, "tok-1")
    environ = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(tls_api.port)}
    creds = in_cluster_credentials(sa, environ)
    assert creds.server == tls_api.url and creds.namespace == "llm"
    discovery = KubernetesDiscovery(
        creds, "vllm", port="http", backoff_initial_s=0.001, backoff_max_s=0.01,
        rng=random.Random(0),
    )  # fmt: skip
    sink = RecordingSink()
    task = asyncio.create_task(discovery.run(sink))
    try:
        assert len(await sink.wait_count(1)) == 3  # namespace "llm" came from the service account
        await tls_api.wait_streams(1)
        # The kubelet rotates the projected token; the old one stops working.
        (sa / "token").write_text("tok-2")
        tls_api.token = "tok-2"
        tls_api.emit(MODIFIED_P3_READY, broadcast=False)
        tls_api.drop_watches()
        await sink.wait_for(lambda s: states(s)[P3] == "ready")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert {r.authorization for r in tls_api.requests} == {"Bearer tok-1", "Bearer tok-2"}
    assert "auth" not in discovery.errors.errors_total


def test_in_cluster_requires_the_service_environment(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_HOST"):
        in_cluster_credentials(service_account(tmp_path, pki, "t"), {})


def test_in_cluster_ipv6_service_host(tmp_path: Path, pki: Pki) -> None:
    environ = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    creds = in_cluster_credentials(service_account(tmp_path, pki, "t"), environ)
    assert creds.server == "https://[fd00::1]:443"


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, user: dict[str, Any], **cluster: Any) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "dev",
        "clusters": [{"name": "c", "cluster": {"server": server, **cluster}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [
            {"name": "dev", "context": {"cluster": "c", "user": "u", "namespace": "llm"}},
            {"name": "other", "context": {"cluster": "c", "user": "u", "namespace": "elsewhere"}},
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


async def test_kubeconfig_client_certificate_data(pki: Pki, tmp_path: Path) -> None:
    server = await started(FakeApiServer(ssl_context=server_tls(pki, require_client_cert=True)))
    try:
        user = {
            "client-certificate-data": b64(pki.client_cert),
            "client-key-data": b64(pki.client_key),
        }
        path = write_kubeconfig(
            tmp_path / "config", server.url, user, **{"certificate-authority-data": b64(pki.ca)}
        )
        _, sink = await first_snapshot(kubeconfig_credentials(path))
    finally:
        await server.stop()
    assert len(sink.snapshots[0][1]) == 3
    assert {(r.peer_cn, r.authorization) for r in server.requests} == {("kvgate", None)}


async def test_kubeconfig_relative_files_and_token_file(
    tls_api: FakeApiServer, pki: Pki, tmp_path: Path
) -> None:
    shutil.copy(pki.ca, tmp_path / "ca.crt")
    (tmp_path / "token").write_text("tok-1\n")
    path = write_kubeconfig(
        tmp_path / "config",
        tls_api.url,
        {"tokenFile": "token"},
        **{"certificate-authority": "ca.crt"},
    )
    creds = kubeconfig_credentials(path)
    assert creds.namespace == "llm"
    _, sink = await first_snapshot(creds)
    assert len(sink.snapshots[0][1]) == 3


async def test_kubeconfig_context_selection_and_namespace(tmp_path: Path) -> None:
    server = await started(FakeApiServer(token="plain"))
    try:
        path = write_kubeconfig(tmp_path / "config", server.url + "/", {"token": "plain"})
        creds = kubeconfig_credentials(path, context="other")
        assert creds.server == server.url and creds.ssl_context is None
        # The "other" context's namespace has no slices of the Service: an authoritative empty.
        _, sink = await first_snapshot(creds)
    finally:
        await server.stop()
    assert sink.snapshots == [("kubernetes", ())]
    assert server.requests[0].authorization == "Bearer plain"


async def test_insecure_skip_tls_verify(tls_api: FakeApiServer, tmp_path: Path) -> None:
    path = write_kubeconfig(
        tmp_path / "config", tls_api.url, {"token": "tok-1"}, **{"insecure-skip-tls-verify": True}
    )
    _, sink = await first_snapshot(kubeconfig_credentials(path))
    assert names(sink.snapshots[0][1])


async def test_untrusted_server_certificate_is_a_tls_error(
    tls_api: FakeApiServer, tmp_path: Path
) -> None:
    # No CA configured: the system trust store does not know the test CA.
    path = write_kubeconfig(tmp_path / "config", tls_api.url, {"token": "tok-1"})
    discovery = KubernetesDiscovery(
        kubeconfig_credentials(path), "vllm", backoff_initial_s=0.001, backoff_max_s=0.01,
        rng=random.Random(0),
    )  # fmt: skip
    sink = RecordingSink()
    task = asyncio.create_task(discovery.run(sink))
    try:
        await eventually(lambda: discovery.errors.errors_total.get("tls", 0) >= 2)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert sink.snapshots == [] and tls_api.requests == []


@pytest.mark.parametrize(
    ("user", "context", "message"),
    [
        ({"exec": {"command": "aws"}}, None, "exec"),
        ({"auth-provider": {"name": "gcp"}}, None, "auth-provider"),
        ({"username": "admin", "password": "hunter2"}, None, "basic"),
        ({"token": "t"}, "missing", "no context named 'missing'"),
        ({"client-certificate-data": "not base64!"}, None, "base64"),
    ],
    ids=["exec", "auth-provider", "basic-auth", "unknown-context", "bad-data"],
)
def test_unsupported_kubeconfigs_fail_clearly(
    tmp_path: Path, user: dict[str, Any], context: str | None, message: str
) -> None:
    path = write_kubeconfig(tmp_path / "config", "https://127.0.0.1:6443", user)
    with pytest.raises(KubeConfigError, match=message) as info:
        kubeconfig_credentials(path, context)
    assert "hunter2" not in str(info.value)  # secrets never reach messages


def test_kubeconfig_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="kubeconfig"):
        kubeconfig_credentials(tmp_path / "nope")
