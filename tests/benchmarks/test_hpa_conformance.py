"""Optional: the HPA model against a real kube-controller-manager fed the same metric sequence.

Skipped unless etcd, kube-apiserver and kube-controller-manager are found (``make -f
mk/autoscale.mk kube-controller-manager`` builds the last two from Debian's ``kubernetes``
source package, upstream v1.20.2; etcd is Debian's ``etcd-server``). Marked slow: about a
minute of real HPA syncs. ``make -f mk/autoscale.mk autoscale-conformance`` runs it.

How the real controller is fed without nodes, kubelet or kube-proxy:
- The scale target is a Deployment whose own controllers are not running: the
  controller-manager runs only ``--controllers=horizontalpodautoscaling``, so no ReplicaSet or
  pod is ever made (pods could not run anyway: no kubelet, so they would stay Pending, which the
  HPA counts as unready). The test plays the workload controller: it watches the Deployment and
  writes ``status.replicas = spec.replicas`` through the status subresource at once.
  (A CRD with a ``/scale`` subresource was the first choice; the v1.20.2 kube-apiserver built
  with Debian's Go 1.19 dies with SIGSEGV on the first custom-resource write: its vendored
  modern-go/reflect2 v1.0.1 iterates maps with a ``hiter`` layout Go 1.18 changed.)
- Metrics come from ``External`` sources with ``AverageValue`` targets, which need no pods at
  all (the proposal is ``ceil(total / target)``; ``status.replicas`` only decides the tolerance).
- The external metrics API is an aiohttp HTTPS backend on 127.0.0.1 registered as the
  ``v1beta1.external.metrics.k8s.io`` APIService. The aggregator resolves an APIService's Service
  to ``https://<clusterIP>:<port>`` — unroutable without kube-proxy — except for an
  ``ExternalName`` Service, which it resolves to ``https://<externalName>:<port>``
  (``ResolveCluster`` in k8s.io/apiserver/pkg/util/proxy): ``externalName: localhost`` reaches
  the backend. ``insecureSkipTLSVerify`` takes its self-signed certificate.
- Every HPA sync fetches each metric exactly once, so the backend serves the k-th value of a
  scripted sequence on the k-th fetch and records when it was asked and what the target's
  replicas were. The model then replays those very syncs (same times, same inputs, v1.20
  semantics) and must make the same decision the real controller wrote to ``/scale``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from benchmarks.autoscale.controller import Observation
from benchmarks.autoscale.hpa import HorizontalPodAutoscaler
from benchmarks.autoscale.hpa_api import (
    Behavior,
    ControllerConfig,
    HPASpec,
    MetricSpec,
    ScalingPolicy,
    ScalingRules,
)
from tests.gateway.discovery.kube_cluster import (
    KUBE_GIT_VERSION,
    KubeCluster,
    find_etcd,
    find_kube_apiserver,
    kube_cluster,
)

# Windows and policy periods (whole seconds in the API) are kept >= 0.2 s away from every
# multiple of the sync period, so no recommendation or scale event sits on a cutoff where the
# real controller's few milliseconds of drift could tip it either way.
SYNC_S = 1.4
DOWNSCALE_WINDOW_S = 4.5
WARMUP = "warmup"  # a metric the test reads itself, so it is not counted as an HPA sync
OBJECTS = "/apis/apps/v1/namespaces/default/deployments"


def find_kube_controller_manager() -> str | None:
    if env := os.environ.get("KVGATE_KUBE_CONTROLLER_MANAGER"):
        return env if os.access(env, os.X_OK) else None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cached = cache / "kvgate" / f"kube-{KUBE_GIT_VERSION}" / "bin" / "kube-controller-manager"
    found = shutil.which("kube-controller-manager")
    return found or (str(cached) if os.access(cached, os.X_OK) else None)


APISERVER, ETCD, KCM = find_kube_apiserver(), find_etcd(), find_kube_controller_manager()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        APISERVER is None or KCM is None,
        reason="kube-apiserver/kube-controller-manager not found: `make -f mk/autoscale.mk "
        "kube-controller-manager` builds both from Debian's kubernetes source package, or set "
        "KVGATE_KUBE_APISERVER and KVGATE_KUBE_CONTROLLER_MANAGER",
    ),
    pytest.mark.skipif(ETCD is None, reason="etcd not found: apt-get install etcd-server"),
]

TARGET = 10.0  # AverageValue per replica
# Values per sync: tolerance band, the x2/4 scale-up cap, the downscale window, the rate
# policies, the max clamp.
LEGACY_VALUES: list[float] = [*[10, 10.8, 60, 60, 60, 60], *[25] * 8, *[200] * 4, 31, 31, *[9] * 8]
BEHAVIOR_VALUES: list[float] = [10, *[50] * 7, *[12] * 10, *[95] * 4, *[20] * 6]
BEHAVIOR = Behavior(
    scale_up=ScalingRules(0, "Max", (ScalingPolicy("Pods", 2, 3),)),
    scale_down=ScalingRules(2, "Max", (ScalingPolicy("Percent", 50, 3),)),
)


def external(metric: str) -> tuple[MetricSpec]:
    return (MetricSpec("External", metric, "AverageValue", TARGET),)


CASES: dict[str, tuple[HPASpec, list[float]]] = {
    "legacy": (HPASpec(external("q-legacy"), 12), LEGACY_VALUES),
    "behavior": (HPASpec(external("q-behavior"), 12, 1, BEHAVIOR), BEHAVIOR_VALUES),
}


@dataclass(slots=True)
class Fetch:
    t: float
    value: float
    spec: int
    status: int


@dataclass(slots=True)
class Target:
    """One scale target as the test's 'workload controller' sees it."""

    name: str
    values: list[float]
    spec: int = 1
    status: int = 1
    fetches: list[Fetch] = field(default_factory=list)
    changes: list[tuple[float, int]] = field(default_factory=list)  # spec writes by the HPA
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def serve(self) -> float:
        k = len(self.fetches)
        value = self.values[min(k, len(self.values) - 1)]
        self.fetches.append(Fetch(time.monotonic(), value, self.spec, self.status))
        if len(self.fetches) > len(self.values):  # one more: the last decision is written
            self.done.set()
        return value

    def decision_after(self, k: int) -> int:
        """The spec the HPA left after fetch k (before fetch k+1)."""
        t0 = self.fetches[k].t
        t1 = self.fetches[k + 1].t if k + 1 < len(self.fetches) else float("inf")
        written = [n for t, n in self.changes if t0 <= t < t1]
        return written[-1] if written else self.fetches[k].spec


def metrics_app(targets: dict[str, Target]) -> web.Application:
    """The external.metrics.k8s.io/v1beta1 API: discovery + one value per metric name."""
    group = "/apis/external.metrics.k8s.io/v1beta1"

    async def discovery(_: web.Request) -> web.Response:
        resources = [{"name": m, "namespaced": True, "kind": "ExternalMetricValueList",
                      "verbs": ["get"], "singularName": ""} for m in targets]  # fmt: skip
        return web.json_response({"kind": "APIResourceList", "apiVersion": "v1",
                                  "groupVersion": "external.metrics.k8s.io/v1beta1",
                                  "resources": resources})  # fmt: skip

    async def value(request: web.Request) -> web.Response:
        metric = request.match_info["metric"]
        if metric != WARMUP and metric not in targets:
            raise web.HTTPNotFound()
        milli = 0 if metric == WARMUP else round(targets[metric].serve() * 1000)
        item = {"metricName": metric, "metricLabels": {}, "value": f"{milli}m",
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        return web.json_response({"kind": "ExternalMetricValueList",
                                  "apiVersion": "external.metrics.k8s.io/v1beta1",
                                  "metadata": {}, "items": [item]})  # fmt: skip

    app = web.Application()
    app.router.add_get(group, discovery)
    app.router.add_get(group + "/namespaces/{ns}/{metric}", value)
    return app


@asynccontextmanager
async def https_backend(workdir: Path, app: web.Application) -> AsyncIterator[int]:
    key, crt = workdir / "backend.key", workdir / "backend.crt"
    proc = await asyncio.create_subprocess_exec(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(crt),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert await proc.wait() == 0, "openssl req failed"
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(crt, key)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def register(cluster: KubeCluster, api: aiohttp.ClientSession, port: int) -> None:
    """ExternalName Service + APIService, then wait until the aggregator calls it Available."""
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "metrics"},
               "spec": {"type": "ExternalName", "externalName": "localhost"}}  # fmt: skip
    await cluster.request(api, "POST", "/api/v1/namespaces/default/services", service)
    apiservice = {
        "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
        "metadata": {"name": "v1beta1.external.metrics.k8s.io"},
        "spec": {"group": "external.metrics.k8s.io", "version": "v1beta1",
                 "service": {"namespace": "default", "name": "metrics", "port": port},
                 "insecureSkipTLSVerify": True, "groupPriorityMinimum": 100,
                 "versionPriority": 100},
    }  # fmt: skip
    path = "/apis/apiregistration.k8s.io/v1/apiservices"
    await cluster.request(api, "POST", path, apiservice)
    await watch_until(api, path, "v1beta1.external.metrics.k8s.io", _available, 60)
    # Available is reported before the aggregator installs the proxy handler (the API server
    # answers 404 meanwhile); that installation has no event to wait on, so retry (bounded).
    async with asyncio.timeout(30):
        while True:
            async with api.get(
                f"/apis/external.metrics.k8s.io/v1beta1/namespaces/default/{WARMUP}"
            ) as resp:
                if resp.status == 200:
                    return
            await asyncio.sleep(0.2)


def _available(obj: dict[str, Any]) -> bool:
    conditions = obj.get("status", {}).get("conditions", [])
    return any(c["type"] == "Available" and c["status"] == "True" for c in conditions)


async def watch_until(
    api: aiohttp.ClientSession, path: str, name: str, done: Any, timeout_s: float
) -> None:
    params = {"watch": "1", "fieldSelector": f"metadata.name={name}"}
    async with asyncio.timeout(timeout_s), api.get(path, params=params) as resp:
        async for line in resp.content:
            if done(json.loads(line)["object"]):
                return


async def create_targets(
    cluster: KubeCluster, api: aiohttp.ClientSession, names: list[str]
) -> None:
    for name in names:
        labels = {"app": name}
        template = {"metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "sim", "image": "none"}]}}  # fmt: skip
        body = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                         "template": template}}  # fmt: skip
        await cluster.request(api, "POST", OBJECTS, body)
        await set_status(api, name, 1)


async def set_status(api: aiohttp.ClientSession, name: str, n: int) -> None:
    async with api.patch(
        f"{OBJECTS}/{name}/status",
        data=json.dumps({"status": {"replicas": n}}),
        headers={"Content-Type": "application/merge-patch+json"},
    ) as resp:
        assert resp.status == 200, await resp.text()


async def workload_controller(
    cluster: KubeCluster, api: aiohttp.ClientSession, targets: dict[str, Target]
) -> None:
    """Watch the targets; record each spec write and mirror it into status at once."""
    by_name = {t.name: t for t in targets.values()}
    async with api.get(OBJECTS, params={"watch": "1"}, timeout=aiohttp.ClientTimeout()) as resp:
        async for line in resp.content:
            obj = json.loads(line)["object"]
            target = by_name.get(obj["metadata"]["name"])
            spec = obj.get("spec", {}).get("replicas")
            if target is None or spec is None or spec == target.spec:
                continue
            target.changes.append((time.monotonic(), spec))
            target.spec = spec
            await set_status(api, target.name, spec)
            target.status = spec


def hpa_object(name: str, spec: HPASpec) -> dict[str, Any]:
    metric = spec.metrics[0]
    body: dict[str, Any] = {
        "apiVersion": "autoscaling/v2beta2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                 "minReplicas": spec.min_replicas, "maxReplicas": spec.max_replicas,
                 "metrics": [{"type": "External", "external": {
                     "metric": {"name": metric.name},
                     "target": {"type": "AverageValue", "averageValue": str(metric.target)}}}]},
    }  # fmt: skip
    if spec.behavior is not None:
        rules = {"scaleUp": spec.behavior.scale_up, "scaleDown": spec.behavior.scale_down}
        body["spec"]["behavior"] = {
            key: {"stabilizationWindowSeconds": r.stabilization_window_s,
                  "selectPolicy": r.select_policy,
                  "policies": [{"type": p.type, "value": p.value, "periodSeconds": p.period_s}
                               for p in r.policies or ()]}
            for key, r in rules.items()
            if r is not None
        }  # fmt: skip
    return body


@asynccontextmanager
async def controller_manager(workdir: Path, cluster: KubeCluster) -> AsyncIterator[None]:
    assert KCM is not None
    log = (workdir / "kcm.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        KCM,
        f"--kubeconfig={cluster.kubeconfig(workdir / 'kubeconfig')}",
        "--controllers=horizontalpodautoscaling",
        f"--horizontal-pod-autoscaler-sync-period={SYNC_S}s",
        f"--horizontal-pod-autoscaler-downscale-stabilization={DOWNSCALE_WINDOW_S}s",
        "--leader-elect=false", "--port=0", "--secure-port=0", "-v=4",
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield
    finally:
        if proc.returncode is None:
            proc.terminate()
            with suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        log.close()


def replay(spec: HPASpec, target: Target) -> list[tuple[int, int, int]]:
    """(sync, real decision, model decision) for every recorded sync."""
    config = ControllerConfig(
        sync_period_s=SYNC_S, downscale_stabilization_s=DOWNSCALE_WINDOW_S, semantics="v1.20"
    )
    model = HorizontalPodAutoscaler(spec, config)
    t0 = target.fetches[0].t
    rows = []
    for k, f in enumerate(target.fetches[: len(target.values)]):
        obs = Observation(f.spec, f.status, external={spec.metrics[0].name: (f.value,)})
        rows.append((k, target.decision_after(k), model.reconcile(f.t - t0, obs)))
    return rows


async def test_model_makes_the_real_hpa_controllers_decisions(tmp_path: Path) -> None:
    assert APISERVER is not None and ETCD is not None
    targets = {spec.metrics[0].name: Target(name, values) for name, (spec, values) in CASES.items()}
    async with (
        kube_cluster(tmp_path, APISERVER, ETCD) as cluster,
        cluster.client() as api,
        https_backend(tmp_path, metrics_app(targets)) as port,
    ):
        await register(cluster, api, port)
        await create_targets(cluster, api, list(CASES))
        watcher = asyncio.create_task(workload_controller(cluster, api, targets))
        try:
            async with controller_manager(tmp_path, cluster):
                for name, (spec, _) in CASES.items():
                    path = "/apis/autoscaling/v2beta2/namespaces/default/horizontalpodautoscalers"
                    await cluster.request(api, "POST", path, hpa_object(name, spec))
                async with asyncio.timeout(len(LEGACY_VALUES) * SYNC_S * 3 + 30):
                    await asyncio.gather(*(t.done.wait() for t in targets.values()))
        finally:
            watcher.cancel()
            with suppress(asyncio.CancelledError):
                await watcher
    for name, (spec, _) in CASES.items():
        rows = replay(spec, targets[spec.metrics[0].name])
        mismatches = [r for r in rows if r[1] != r[2]]
        assert not mismatches, f"{name}: (sync, real, model) {rows}"
        assert len({real for _, real, _ in rows}) >= 4, f"{name}: too few distinct decisions"
