"""The Kubernetes manifests under config/, checked without a cluster.

- Core objects validate strictly (unknown fields, wrong types and unknown kinds fail) against
  the newest Kubernetes schema that kubernetes-validate ships, file by file and as rendered by
  `kubectl kustomize`.
- CRD objects (ServiceMonitor, PrometheusRule, ScaledObject) validate against their CRDs'
  openAPIV3Schema, vendored in tests/config/schemas/ (provenance in each file), with unknown
  fields rejected as the API server's strict field validation does.
- The gateway's ConfigMap loads with the real config loader, and the Deployment's drain timing
  matches it; the example vLLM replicas drain before they stop.
- The objects reference each other correctly: selectors, port names, the RBAC subject, the
  model name the autoscalers select, and the autoscalers' behaviour.
"""

from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from aiohttp import web

from tests.config.artifacts import (
    AUTOSCALING,
    CRD_SCHEMAS,
    K8S,
    K8S_VERSION,
    KUSTOMIZE_DIRS,
    MODEL,
    SCHEMAS,
    by_kind,
    gateway_deployment,
    hpa,
    is_crd_object,
    keda_object,
    keda_trigger,
    kustomize,
    load_docs,
    load_one,
    manifest_files,
    needs_kubectl,
    pod_spec,
    rel,
    vllm_deployment,
)

CORE_FILES = [p for p in manifest_files() if not any(is_crd_object(d) for d in load_docs(p))]
CRD_FILES = [p for p in manifest_files() if p not in CORE_FILES]


# --- strict schema validation ----------------------------------------------------------------


@pytest.mark.parametrize("path", CORE_FILES, ids=rel)
def test_core_manifest_validates_strictly(path: Path) -> None:
    for doc in load_docs(path):
        # Raises for an unknown field, a wrong type, or a kind without a schema.
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@needs_kubectl
@pytest.mark.parametrize("directory", KUSTOMIZE_DIRS, ids=rel)
def test_kustomization_renders_and_validates(directory: Path) -> None:
    docs = kustomize(directory)
    assert docs
    for doc in docs:
        if is_crd_object(doc):
            validate_crd_object(doc)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@needs_kubectl
def test_model_cache_component_swaps_in_the_shared_volume(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(K8S, overlay)
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{base}]\ncomponents: [{base}/components/model-cache-pvc]\n"
    )
    docs = kustomize(overlay)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    pvc = by_kind(docs, "PersistentVolumeClaim", "vllm-model-cache")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in pod_spec(by_kind(docs, "Deployment", "vllm"))["volumes"]}
    assert volumes["model-cache"] == {
        "name": "model-cache",
        "persistentVolumeClaim": {"claimName": "vllm-model-cache"},
    }


def strict_schema(schema: Any) -> Any:
    """Reject unknown fields wherever an object lists its properties (kubectl --validate=strict)."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    open_object = out.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not open_object:
        out["additionalProperties"] = False
    if "properties" in out:
        out["properties"] = {k: strict_schema(v) for k, v in schema["properties"].items()}
    return out


def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    schema = yaml.safe_load((SCHEMAS / CRD_SCHEMAS[(api_version, kind)]).read_text())
    return jsonschema.Draft7Validator(strict_schema(schema))


def validate_crd_object(doc: dict[str, Any]) -> None:
    crd_validator(doc["apiVersion"], doc["kind"]).validate(doc)
    # The CRD leaves metadata to the API server's ObjectMeta: check it as core Kubernetes would.
    carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
    kubernetes_validate.validate(carrier, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", CRD_FILES, ids=rel)
def test_crd_object_validates_against_its_crd_schema(path: Path) -> None:
    for doc in load_docs(path):
        validate_crd_object(doc)


def test_crd_files_cover_every_custom_kind() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for p in CRD_FILES for d in load_docs(p)}
    assert kinds == set(CRD_SCHEMAS)


@pytest.mark.parametrize(
    ("path", "mutate"),
    [
        (AUTOSCALING / "keda-concurrency" / "scaledobject.yaml", ("spec", "minReplicas", 0)),
        (K8S / "monitoring" / "servicemonitor.yaml", ("endpoints", "intervall", "10s")),
        (K8S / "monitoring" / "prometheusrule.yaml", ("groups", "interval", 10)),
    ],
    ids=["scaledobject-unknown-field", "servicemonitor-misspelt-field", "rule-wrong-type"],
)
def test_crd_schema_check_rejects_mistakes(path: Path, mutate: tuple[str, str, Any]) -> None:
    doc = copy.deepcopy(load_one(path))
    where, key, value = mutate
    if where == "spec":
        doc["spec"][key] = value
    else:
        doc["spec"][where][0][key] = value
    with pytest.raises(jsonschema.ValidationError):
        validate_crd_object(doc)


# --- the gateway ---------------------------------------------------------------------------


def gateway_config_text() -> str:
    return (K8S / "gateway" / "gateway.yaml").read_text()


def test_gateway_config_loads_with_the_real_loader() -> None:
    from gateway.config import load_config

    cfg = load_config(K8S / "gateway" / "gateway.yaml", env={})
    assert (cfg.listen.port, cfg.admin.port) == (8080, 9090)


def test_gateway_discovers_the_vllm_service_in_its_own_namespace() -> None:
    from gateway.config import KubernetesReplicas, load_config

    replicas = load_config(K8S / "gateway" / "gateway.yaml", env={}).replicas
    assert isinstance(replicas, KubernetesReplicas)
    assert replicas.namespace is None  # the service account's namespace: kustomize sets it
    assert replicas.kubeconfig is None  # in-cluster credentials (role.yaml)
    svc = load_one(K8S / "vllm" / "service.yaml")
    assert replicas.service == svc["metadata"]["name"]
    (port,) = svc["spec"]["ports"]
    assert replicas.port in (port["name"], port["port"])


def test_kvgate_check_config_accepts_the_configmap(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    assert main(["check-config", str(K8S / "gateway" / "gateway.yaml")]) == 0
    assert "ok" in capsys.readouterr().out


@needs_kubectl
def test_rendered_configmap_is_mounted_where_the_gateway_reads_it() -> None:
    docs = kustomize(K8S)
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert configmap["data"]["gateway.yaml"] == gateway_config_text()
    spec = pod_spec(by_kind(docs, "Deployment", "kvgate"))
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    (container,) = spec["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_path = container["args"][container["args"].index("--config") + 1]
    assert config_path == f"{mounts['config']}/gateway.yaml"


def test_gateway_deployment_is_hardened_and_probed() -> None:
    dep = gateway_deployment()
    assert dep["spec"]["replicas"] >= 2
    spec = pod_spec(dep)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "admin": 9090}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    tmp = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    (tmp_volume,) = [name for name, path in tmp.items() if path == "/tmp"]
    assert "emptyDir" in volumes[tmp_volume]


def test_termination_grace_covers_prestop_and_drain() -> None:
    spec = pod_spec(gateway_deployment())
    (container,) = spec["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    prestop_s = float(command[1])
    # Read explicitly from the file: the comment's arithmetic names both values.
    shutdown = yaml.safe_load(gateway_config_text())["shutdown"]
    needed_s = prestop_s + shutdown["delay_s"] + shutdown["drain_s"]
    grace_s = spec["terminationGracePeriodSeconds"]
    # A margin for process exit, but not so much that a stuck pod lingers for minutes.
    assert needed_s + 5 <= grace_s <= needed_s + 30


def test_gateway_services_pdb_and_rbac_fit_together() -> None:
    dep = gateway_deployment()
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    (container,) = pod_spec(dep)["containers"]
    port_names = {p["name"] for p in container["ports"]}
    for name in ("service.yaml", "service-admin.yaml"):
        svc = load_one(K8S / "gateway" / name)
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    admin = load_one(K8S / "gateway" / "service-admin.yaml")
    assert admin["spec"]["clusterIP"] == "None"  # one scrape target per gateway pod
    pdb = load_one(K8S / "gateway" / "pdb.yaml")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    role = load_one(K8S / "gateway" / "role.yaml")
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = load_one(K8S / "gateway" / "rolebinding.yaml")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (subject,) = binding["subjects"]
    sa = load_one(K8S / "gateway" / "serviceaccount.yaml")
    assert subject == {"kind": "ServiceAccount", "name": sa["metadata"]["name"]}
    assert pod_spec(dep)["serviceAccountName"] == sa["metadata"]["name"]


def test_servicemonitor_scrapes_the_admin_service() -> None:
    monitor = load_one(K8S / "monitoring" / "servicemonitor.yaml")
    admin = load_one(K8S / "gateway" / "service-admin.yaml")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= admin["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in admin["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


# --- the example vLLM replicas ---------------------------------------------------------------


LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def vllm_arg(name: str) -> str:
    (container,) = pod_spec(vllm_deployment())["containers"]
    (value,) = [a.split("=", 1)[1] for a in container["args"] if a.startswith(f"--{name}=")]
    return value


def test_vllm_example_serves_the_model_the_autoscalers_select() -> None:
    model = vllm_arg("served-model-name")
    assert model == MODEL
    # HPA selectors compare it as a label value, so it must be one.
    assert LABEL_VALUE.match(model) and len(model) <= 63
    assert int(vllm_arg("max-model-len")) > 0
    for name in ("hpa-concurrency", "hpa-kv-cache"):
        (metric,) = hpa(name)["spec"]["metrics"]
        assert metric["external"]["metric"]["selector"]["matchLabels"] == {"model": model}
    assert f'model="{model}"' in keda_trigger()["metadata"]["query"]


def test_vllm_example_is_a_gpu_replica_with_patient_probes() -> None:
    spec = pod_spec(vllm_deployment())
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    # Model download and load: at least ten minutes before Kubernetes gives up.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["model-cache"] == "/root/.cache/huggingface"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["model-cache"]
    svc = load_one(K8S / "vllm" / "service.yaml")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= spec_labels(vllm_deployment()).items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}


def spec_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def vllm_drain_script(url: str) -> str:
    (container,) = pod_spec(vllm_deployment())["containers"]
    script: str = container["lifecycle"]["preStop"]["exec"]["command"][2]
    for old, new in (
        ('URL = "http://127.0.0.1:8000/metrics"', f'URL = "{url}"'),
        ("SETTLE_S = 5", "SETTLE_S = 0"),
        ("POLL_S = 1", "POLL_S = 0.05"),
    ):
        assert old in script
        script = script.replace(old, new)
    return script


async def run_script(script: str, timeout_s: float) -> int:
    import asyncio

    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script)
    return await asyncio.wait_for(proc.wait(), timeout_s)


async def test_vllm_prestop_waits_for_running_and_waiting_to_drain(aiohttp_server: Any) -> None:
    # Busy for two polls (running, then only waiting), then idle; the hook must return after
    # the idle page and not before.
    pages = [(2, 1), (0, 1), (0, 0)]
    served: list[tuple[int, int]] = []

    async def metrics(_: web.Request) -> web.Response:
        running, waiting = pages[min(len(served), len(pages) - 1)]
        served.append((running, waiting))
        labels = '{engine="0",model_name="llama-3.1-8b-instruct"}'
        body = (
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{labels} {float(running)}\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{labels} {float(waiting)}\n"
            f"vllm:kv_cache_usage_perc{labels} 0.5\n"
        )
        return web.Response(text=body)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    server = await aiohttp_server(app)
    script = vllm_drain_script(f"http://127.0.0.1:{server.port}/metrics")
    assert await run_script(script, timeout_s=15) == 0
    assert served == [(2, 1), (0, 1), (0, 0)]


async def test_vllm_prestop_returns_at_once_when_vllm_is_gone(unused_tcp_port: int) -> None:
    script = vllm_drain_script(f"http://127.0.0.1:{unused_tcp_port}/metrics")
    assert await run_script(script, timeout_s=5) == 0


# --- autoscaling -----------------------------------------------------------------------------


def behavior(name: str) -> dict[str, Any]:
    if name.startswith("keda"):
        advanced = keda_object()["spec"]["advanced"]
        spec: dict[str, Any] = advanced["horizontalPodAutoscalerConfig"]["behavior"]
        return spec
    hpa_behavior: dict[str, Any] = hpa(name)["spec"]["behavior"]
    return hpa_behavior


@pytest.mark.parametrize("name", ["hpa-concurrency", "hpa-kv-cache", "keda-concurrency"])
def test_scaling_behavior_is_fast_up_and_stabilised_down(name: str) -> None:
    rules = behavior(name)
    assert rules["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert rules["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert rules["scaleUp"]["policies"] and rules["scaleDown"]["policies"]


def test_every_autoscaler_targets_the_vllm_deployment() -> None:
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vllm"}
    assert hpa("hpa-concurrency")["spec"]["scaleTargetRef"] == target
    assert hpa("hpa-kv-cache")["spec"]["scaleTargetRef"] == target
    assert keda_object()["spec"]["scaleTargetRef"] == target
    assert vllm_deployment()["metadata"]["name"] == "vllm"


# Parameters of KEDA's prometheus scaler (https://keda.sh/docs/latest/scalers/prometheus/); the
# CRD types trigger metadata as a free string map, so KEDA itself only complains at runtime.
KEDA_PROMETHEUS_PARAMS = {
    "serverAddress",
    "query",
    "threshold",
    "activationThreshold",
    "namespace",
    "customHeaders",
    "ignoreNullValues",
    "queryParameters",
    "unsafeSsl",
    "timeout",
}


def test_keda_scales_from_zero_on_the_gateway_buffer() -> None:
    spec = keda_object()["spec"]
    assert spec["minReplicaCount"] == 0
    assert spec["maxReplicaCount"] >= 1
    trigger = keda_trigger()
    assert trigger["type"] == "prometheus"
    assert trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    assert set(meta) <= KEDA_PROMETHEUS_PARAMS
    assert {"serverAddress", "query", "threshold", "activationThreshold"} <= set(meta)
    # With zero replicas nothing is in flight, so the value is the buffered count: any value
    # above the activation threshold must mean at least one waiting request.
    assert 0 <= float(meta["activationThreshold"]) < 1
    assert meta["ignoreNullValues"] == "false"
    # The same per-replica target as the concurrency HPA.
    (metric,) = hpa("hpa-concurrency")["spec"]["metrics"]
    assert float(meta["threshold"]) == float(metric["external"]["target"]["averageValue"])
