"""Record the v1beta1 EndpointSlice fixtures from a real kube-apiserver 1.20 + etcd.

    .venv/bin/python -m tests.gateway.discovery.record_kube_fixtures

Needs the binaries the optional test needs (see kube_cluster.py). Writes, byte for byte as the
API server sent them (the list re-indented for review):
    fixtures/endpointslices-v1beta1-list.json        the List the discovery starts from
    fixtures/endpointslices-v1beta1-watch.jsonl      the watch stream of a rolling change
    fixtures/endpointslices-v1beta1-watch-gone.jsonl resuming that watch after an API server
                                                     restart: the ERROR event with code 410
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

from tests.gateway.discovery.kube_cluster import (
    SLICES,
    KubeCluster,
    endpoint,
    find_etcd,
    find_kube_apiserver,
    kube_cluster,
    slice_body,
)

FIXTURES = Path(__file__).parent / "fixtures"
SELECTOR = "labelSelector=kubernetes.io%2Fservice-name%3Dvllm"


async def record(cluster: KubeCluster) -> None:
    async with cluster.client() as api:
        a = slice_body(
            "vllm-a", [endpoint("10.0.0.1", "pod-a", True), endpoint("10.0.0.2", "pod-b", False)]
        )
        await cluster.request(api, "POST", SLICES, a)
        await cluster.request(
            api,
            "POST",
            SLICES,
            slice_body("other-x", [endpoint("10.0.9.9", "pod-x", True)], "other"),
        )
        async with api.get(f"{SLICES}?{SELECTOR}") as resp:
            listed = await resp.json()
        (FIXTURES / "endpointslices-v1beta1-list.json").write_text(
            json.dumps(listed, indent=2) + "\n"
        )

        rv = listed["metadata"]["resourceVersion"]
        url = f"{SLICES}?{SELECTOR}&watch=true&resourceVersion={rv}&allowWatchBookmarks=true"
        async with api.get(url) as stream:
            a["endpoints"][1] = endpoint("10.0.0.2", "pod-b", True)
            await cluster.request(api, "PUT", f"{SLICES}/vllm-a", a)
            b = slice_body("vllm-b", [endpoint("10.0.0.3", "pod-c", True)])
            await cluster.request(api, "POST", SLICES, b)
            a["endpoints"][0] = endpoint("10.0.0.1", "pod-a", False, terminating=True)
            await cluster.request(api, "PUT", f"{SLICES}/vllm-a", a)
            await cluster.request(api, "DELETE", f"{SLICES}/vllm-a")
            lines = [await stream.content.readline() for _ in range(4)]
        (FIXTURES / "endpointslices-v1beta1-watch.jsonl").write_bytes(b"".join(lines))

        # Move etcd past the list's resourceVersion, restart the API server (its new watch
        # cache starts at the current revision) and resume from the old resourceVersion.
        configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bump"}}
        await cluster.request(api, "POST", "/api/v1/namespaces/default/configmaps", configmap)
        await cluster.restart_apiserver()
        async with api.get(url) as stream:
            assert stream.status == 200, stream.status
            line = await stream.content.readline()
        (FIXTURES / "endpointslices-v1beta1-watch-gone.jsonl").write_bytes(line)


async def main() -> int:
    apiserver, etcd = find_kube_apiserver(), find_etcd()
    if apiserver is None or etcd is None:
        print("need kube-apiserver and etcd: `make kube-apiserver`", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        async with kube_cluster(Path(tmp), apiserver, etcd) as cluster:
            await record(cluster)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
