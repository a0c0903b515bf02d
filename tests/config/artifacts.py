"""Loaders for the deployment artifacts under config/, shared by the tests in this package.

Paths, the example's namespace and model name, `kubectl kustomize` and `promtool` runners, and
the small views (the KEDA trigger, the adapter's rendered queries, the dashboard's expressions)
that several tests compare against each other.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"
K8S = CONFIG / "kubernetes"
AUTOSCALING = CONFIG / "autoscaling"
PROM = CONFIG / "prometheus"
DASHBOARD = CONFIG / "grafana" / "kvgate-dashboard.json"
METRICS_DOC = REPO / "docs" / "metrics.md"
SCHEMAS = Path(__file__).parent / "schemas"

K8S_VERSION = kubernetes_validate.latest_version()
NAMESPACE = "kvgate"
MODEL = "llama-3.1-8b-instruct"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors_v1.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules_v1.yaml",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects_v1alpha1.yaml",
}
KUSTOMIZE_DIRS = [
    K8S,
    K8S / "gateway",
    K8S / "vllm",
    K8S / "monitoring",
    AUTOSCALING / "hpa-concurrency",
    AUTOSCALING / "hpa-kv-cache",
    AUTOSCALING / "keda-concurrency",
]


KUBECTL = shutil.which("kubectl")
PROMTOOL = shutil.which("promtool")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian package 'prometheus'; `make system-deps`)",
)


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


def load_one(path: Path) -> dict[str, Any]:
    (doc,) = load_docs(path)
    return doc


def manifest_files() -> list[Path]:
    """Every YAML file under config/kubernetes and config/autoscaling that is an API object."""
    files = []
    for root in (K8S, AUTOSCALING):
        for path in sorted(root.rglob("*.yaml")):
            docs = load_docs(path)
            is_object = bool(docs) and all("apiVersion" in d and "kind" in d for d in docs)
            if is_object and not docs[0]["apiVersion"].startswith("kustomize.config.k8s.io/"):
                files.append(path)
    return files


def is_crd_object(doc: dict[str, Any]) -> bool:
    return (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def kustomize(directory: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def gateway_deployment() -> dict[str, Any]:
    return load_one(K8S / "gateway" / "deployment.yaml")


def vllm_deployment() -> dict[str, Any]:
    return load_one(K8S / "vllm" / "deployment.yaml")


def keda_object() -> dict[str, Any]:
    return load_one(AUTOSCALING / "keda-concurrency" / "scaledobject.yaml")


def keda_trigger() -> dict[str, Any]:
    (trigger,) = keda_object()["spec"]["triggers"]
    return trigger


def hpa(name: str) -> dict[str, Any]:
    return load_one(AUTOSCALING / name / "hpa.yaml")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def recorded_series() -> set[str]:
    rules = yaml.safe_load((PROM / "scaling-rules.yaml").read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"]}


def adapter_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = yaml.safe_load((PROM / "adapter-rules.yaml").read_text())[
        "externalRules"
    ]
    return rules


def adapter_series(rule: dict[str, Any]) -> str:
    match = re.fullmatch(r"\^(.+)\$", rule["name"]["matches"])
    assert match, rule["name"]
    return match.group(1)


def rendered_adapter_query(metric_name: str) -> str:
    """The query the adapter sends for an HPA in namespace kvgate selecting model=MODEL."""
    (rule,) = [r for r in adapter_rules() if r["name"]["as"] == metric_name]
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", adapter_series(rule))
        .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",model="{MODEL}"')
        .replace("<<.GroupBy>>", "")
    )


def hpa_metric_names() -> set[str]:
    return {
        m["external"]["metric"]["name"]
        for name in ("hpa-concurrency", "hpa-kv-cache")
        for m in hpa(name)["spec"]["metrics"]
    }


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def grafana_to_promql(expr: str) -> str:
    return (
        expr.replace("$__rate_interval", "5m")
        .replace("$namespace", NAMESPACE)
        .replace("$model", ".*")
    )
