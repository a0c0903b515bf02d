"""Optional: Kubernetes discovery against a real kube-apiserver + etcd.

Skipped unless both binaries are found (see kube_cluster.py; `make kube-apiserver` builds the
API server from Debian's kubernetes source package and caches it). Kubernetes 1.20 serves
EndpointSlices only as discovery.k8s.io/v1beta1, so this also proves the v1 -> v1beta1 fallback
against the real thing. Takes a few seconds, most of it API server startup.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from gateway.discovery import KubernetesDiscovery, kubeconfig_credentials
from tests.gateway.discovery.kube_cluster import (
    SLICES,
    endpoint,
    find_etcd,
    find_kube_apiserver,
    kube_cluster,
    slice_body,
)
from tests.gateway.discovery.recording_sink import RecordingSink, eventually, names, states

APISERVER = find_kube_apiserver()
ETCD = find_etcd()

pytestmark = [
    pytest.mark.skipif(
        APISERVER is None,
        reason="kube-apiserver not found: `make kube-apiserver` builds it from Debian's "
        "kubernetes source package (mk/kube.mk), or set KVGATE_KUBE_APISERVER",
    ),
    pytest.mark.skipif(
        ETCD is None, reason="etcd not found: apt-get install etcd-server, or set KVGATE_ETCD"
    ),
]


@pytest.mark.long
async def test_discovery_follows_a_real_apiserver(tmp_path: Path) -> None:
    assert APISERVER is not None and ETCD is not None
    async with kube_cluster(tmp_path, APISERVER, ETCD) as cluster, cluster.client() as api:
        a = slice_body(
            "vllm-a", [endpoint("10.0.0.1", "pod-a", True), endpoint("10.0.0.2", "pod-b", False)]
        )
        await cluster.request(api, "POST", SLICES, a)
        other = slice_body("other-x", [endpoint("10.0.9.9", "pod-x", True)], service="other")
        await cluster.request(api, "POST", SLICES, other)

        creds = kubeconfig_credentials(cluster.kubeconfig(tmp_path / "kubeconfig"))
        discovery = KubernetesDiscovery(
            creds,
            "vllm",
            port="http",
            watch_timeout_s=1,  # the server ends each watch after 1 s: re-watches happen
            backoff_initial_s=0.05,
            backoff_max_s=0.5,
            rng=random.Random(0),
        )
        sink = RecordingSink()
        task = asyncio.create_task(discovery.run(sink))
        try:
            first = await sink.wait_count(1, limit_s=10)
            assert states(first) == {"pod-a": "ready", "pod-b": "starting"}
            assert {r.name: r.url for r in first}["pod-a"] == "http://10.0.0.1:8000"
            assert discovery.api_version == "v1beta1"  # 1.20 has no discovery.k8s.io/v1

            a["endpoints"][1] = endpoint("10.0.0.2", "pod-b", True)
            await cluster.request(api, "PUT", f"{SLICES}/vllm-a", a)
            await sink.wait_for(lambda s: states(s)["pod-b"] == "ready", limit_s=5)

            b = slice_body("vllm-b", [endpoint("10.0.0.3", "pod-c", True)])
            await cluster.request(api, "POST", SLICES, b)
            await sink.wait_for(lambda s: "pod-c" in names(s), limit_s=5)

            a["endpoints"][0] = endpoint("10.0.0.1", "pod-a", False, terminating=True)
            await cluster.request(api, "PUT", f"{SLICES}/vllm-a", a)
            await sink.wait_for(lambda s: states(s)["pod-a"] == "terminating", limit_s=5)
            await eventually(lambda: discovery.watches_total >= 2, limit_s=5)

            # Any write moves etcd past the client's resourceVersion; the restarted API
            # server's fresh watch cache starts there, so resuming the watch gets 410.
            configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bump"}}
            await cluster.request(api, "POST", "/api/v1/namespaces/default/configmaps", configmap)
            await cluster.restart_apiserver()
            await cluster.request(api, "DELETE", f"{SLICES}/vllm-a")
            await sink.wait_for(lambda s: names(s) == {"pod-c"}, limit_s=10)
            await eventually(lambda: not discovery.errors.failing, limit_s=5)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert "pod-x" not in {r.name for _, s in sink.snapshots for r in s}
    assert discovery.relists_total >= 1, "the resume after the restart must have hit 410 Gone"
    assert discovery.errors.errors_total, "the restart must have broken the connection"
    assert set(discovery.errors.errors_total) <= {"connect", "disconnect", "http", "timeout"}
