"""Prometheus, the autoscaling queries, the Grafana dashboard and the metric-name contract.

- `promtool check rules`, `promtool test rules` and `promtool check config` on
  config/prometheus/, and every PromQL expression in the adapter rules, the KEDA trigger and the
  dashboard parses.
- The adapter serves what the HPAs ask for, from recorded series only, and the exact queries
  that the adapter and KEDA send are among the promtool unit tests.
- Every `kvgate_*` name used anywhere in config/ is in the contract, docs/metrics.md.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tests.config.artifacts import (
    K8S,
    METRICS_DOC,
    PROM,
    adapter_rules,
    adapter_series,
    dashboard,
    dashboard_exprs,
    grafana_to_promql,
    hpa_metric_names,
    keda_trigger,
    load_one,
    needs_promtool,
    promtool,
    recorded_series,
    rendered_adapter_query,
)

# --- Prometheus ------------------------------------------------------------------------------


@needs_promtool
def test_promtool_checks_the_recording_rules() -> None:
    out = promtool("check", "rules", str(PROM / "scaling-rules.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_unit_tests_of_the_scaling_queries_pass() -> None:
    out = promtool("test", "rules", str(PROM / "scaling-rules.test.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr


HTTP_CLIENT_KEYS = [
    "basic_auth",
    "authorization",
    "oauth2",
    "tls_config",
    "proxy_url",
    "no_proxy",
    "proxy_from_environment",
    "proxy_connect_header",
    "follow_redirects",
    "enable_http2",
]
# Prometheus' kubernetes_sd_config (prometheus.io/docs/prometheus/latest/configuration/
# configuration/#kubernetes_sd_config): its own keys plus the common HTTP client keys.
KUBERNETES_SD_SCHEMA = {
    "type": "object",
    "required": ["role"],
    "additionalProperties": False,
    "properties": {
        "role": {"enum": ["node", "service", "pod", "endpoints", "endpointslice", "ingress"]},
        "api_server": {"type": "string"},
        "kubeconfig_file": {"type": "string"},
        "namespaces": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "own_namespace": {"type": "boolean"},
                "names": {"type": "array", "items": {"type": "string"}},
            },
        },
        "selectors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["role"],
                "additionalProperties": False,
                "properties": {
                    "role": {"type": "string"},
                    "label": {"type": "string"},
                    "field": {"type": "string"},
                },
            },
        },
        "attach_metadata": {"type": "object"},
        **{key: {} for key in HTTP_CLIENT_KEYS},
    },
}
# Target labels of role "pod" (same page); `_label_`/`_annotation_` take a name suffix.
POD_META_LABELS = re.compile(
    r"^__meta_kubernetes_(namespace|pod_(name|ip|uid|ready|phase|node_name|host_ip"
    r"|controller_kind|controller_name|container_(init|name|id|image|port_name|port_number"
    r"|port_protocol)|(label|labelpresent|annotation|annotationpresent)_[a-zA-Z0-9_]+))$"
)
LABEL_SELECTOR = re.compile(r"^[a-z0-9./-]+=[A-Za-z0-9._-]+(,[a-z0-9./-]+=[A-Za-z0-9._-]+)*$")


@needs_promtool
def test_promtool_checks_the_scrape_config(tmp_path: Path) -> None:
    out = promtool("check", "config", str(PROM / "prometheus.yml"))
    if out.returncode == 0:
        return
    # Debian builds Prometheus without Kubernetes service discovery, so its promtool does not
    # know kubernetes_sd_configs. Check that block against the documented schema here, and let
    # promtool check everything else with the discovery swapped for a static target.
    assert "field kubernetes_sd_configs not found" in out.stdout + out.stderr, out.stdout
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        for sd in job.pop("kubernetes_sd_configs", []):
            jsonschema.validate(sd, KUBERNETES_SD_SCHEMA)
            assert sd["role"] == "pod"
            for selector in sd.get("selectors", []):
                assert selector["role"] == sd["role"]
                assert LABEL_SELECTOR.match(selector["label"]), selector
            job["static_configs"] = [{"targets": ["127.0.0.1:9090"]}]
        for relabel in job.get("relabel_configs", []):
            for label in relabel.get("source_labels", []):
                assert POD_META_LABELS.match(label), f"not a pod-role label: {label}"
    shutil.copy(PROM / "scaling-rules.yaml", tmp_path / "scaling-rules.yaml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    out = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheusrule_carries_the_scaling_rules_unchanged() -> None:
    rule = load_one(K8S / "monitoring" / "prometheusrule.yaml")
    assert rule["spec"] == yaml.safe_load((PROM / "scaling-rules.yaml").read_text())


def test_adapter_serves_what_the_hpas_ask_for_from_recorded_series() -> None:
    served = {r["name"]["as"] for r in adapter_rules()}
    assert hpa_metric_names() <= served
    for rule in adapter_rules():
        assert adapter_series(rule) in recorded_series()
        assert rule["seriesQuery"].startswith(adapter_series(rule) + "{")
        assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}


def test_each_scaling_query_is_unit_tested_with_promtool() -> None:
    tests = yaml.safe_load((PROM / "scaling-rules.test.yaml").read_text())
    tested = {t["expr"] for case in tests["tests"] for t in case.get("promql_expr_test", [])}
    queries = {keda_trigger()["metadata"]["query"]}
    queries |= {rendered_adapter_query(name) for name in hpa_metric_names()}
    assert queries <= tested, queries - tested


@needs_promtool
def test_every_promql_expression_in_config_parses(tmp_path: Path) -> None:
    exprs = [grafana_to_promql(e) for e in dashboard_exprs()]
    exprs += [keda_trigger()["metadata"]["query"]]
    exprs += [rendered_adapter_query(r["name"]["as"]) for r in adapter_rules()]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            # label_values(<selector>, label) is Grafana's; its selector must be PromQL.
            inner = re.fullmatch(r"label_values\((.+), \w+\)", var["query"]["query"])
            assert inner, var["query"]
            exprs.append(grafana_to_promql(inner.group(1)))
    rules = [{"record": f"kvgate_parse_check:expr{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "parse-check.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "parse-check", "rules": rules}]}))
    out = promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


# --- the dashboard ---------------------------------------------------------------------------


def test_dashboard_covers_what_operators_need() -> None:
    board = dashboard()
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in (
        "request rate",
        "time to first token",
        "inter-token latency",
        "end-to-end",
        "in flight and queued",
        "kv-cache usage per replica",
        "queue depth per replica",
        "routing decisions",
        "replicas by state",
    ):
        assert topic in titles, topic
    exprs = dashboard_exprs()
    quantiles = [e for e in exprs if "histogram_quantile" in e]
    for family in ("time_to_first_token", "inter_token_latency", "request_duration"):
        assert any(f"kvgate_{family}_seconds_bucket" in e for e in quantiles), family
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "namespace", "model"} <= variables
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])


def test_dashboard_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, panel["title"]
        taken |= cells


# --- the metric-name contract ----------------------------------------------------------------


DOC_ROW = re.compile(r"^\|\s*`(kvgate_[a-z0-9_]+)`\s*\|\s*(counter|gauge|histogram)\s*\|", re.M)
NAME = re.compile(r"(?<![A-Za-z0-9_:])kvgate_[A-Za-z0-9_]+")


def documented_metrics() -> dict[str, str]:
    """docs/metrics.md: metric name -> type."""
    rows = DOC_ROW.findall(METRICS_DOC.read_text())
    names = [name for name, _ in rows]
    assert len(names) == len(set(names)), "a metric is documented twice"
    return dict(rows)


def is_documented(name: str, documented: dict[str, str]) -> bool:
    if name in documented:
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and documented.get(base) == "histogram":
            return True
    return False


def rule_exprs(rules: dict[str, Any]) -> list[str]:
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def names_used_in_config() -> dict[str, set[str]]:
    """kvgate_* names per artifact, from the fields that are sent to Prometheus (not comments)."""
    variables = dashboard()["templating"]["list"]
    sources = {
        "adapter-rules": [
            r[key] for r in adapter_rules() for key in ("seriesQuery", "metricsQuery")
        ]
        + [r["name"]["matches"] for r in adapter_rules()],
        "scaling-rules": rule_exprs(yaml.safe_load((PROM / "scaling-rules.yaml").read_text())),
        "prometheusrule": rule_exprs(load_one(K8S / "monitoring" / "prometheusrule.yaml")["spec"]),
        "keda query": [keda_trigger()["metadata"]["query"]],
        "dashboard": dashboard_exprs() + [v["definition"] for v in variables if "definition" in v],
    }
    return {
        source: {n for text in texts for n in NAME.findall(text)}
        for source, texts in sources.items()
    }


def test_documented_metrics_table_is_complete() -> None:
    documented = documented_metrics()
    assert len(documented) >= 25
    for name, kind in documented.items():
        assert name.endswith("_total") == (kind == "counter"), name


def test_every_metric_name_used_in_config_is_in_the_contract() -> None:
    documented = documented_metrics()
    used = names_used_in_config()
    for source, names in used.items():
        unknown = {n for n in names if not is_documented(n, documented)}
        assert not unknown, f"{source} uses undocumented metrics: {sorted(unknown)}"
    # Every recorded series that the HPAs and KEDA read is recorded from contract metrics, and
    # the HPAs reach the gateway's metrics only through the adapter's names (checked above).
    assert used["scaling-rules"] and used["dashboard"]
    assert {"kvgate_requests_in_flight", "kvgate_requests_queued"} <= used["scaling-rules"]
    assert "kvgate_model_kv_cache_usage_ratio_mean" in used["scaling-rules"]
    query = keda_trigger()["metadata"]["query"]
    recorded_in_keda = set(re.findall(r"[a-z_]+:kvgate_[a-z_]+:[a-z]+", query))
    assert recorded_in_keda and recorded_in_keda <= recorded_series()
