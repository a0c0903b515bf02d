"""EndpointSlice decoding and mapping (pure), and the validity of the recorded fixtures."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from gateway.discovery import DiscoveredReplica
from gateway.discovery.endpointslice import (
    EndpointSlice,
    EndpointSliceList,
    PortSpec,
    merge_members,
    slice_members,
)
from tests.gateway.discovery.conftest import FIXTURES, load_events, load_json


def make_slice(
    endpoints: list[dict[str, Any]] | None,
    ports: list[dict[str, Any]] | None = None,
    address_type: str = "IPv4",
) -> EndpointSlice:
    raw = {
        "metadata": {"name": "s", "resourceVersion": "1"},
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}] if ports is None else ports,
    }
    return msgspec.convert(raw, type=EndpointSlice)


def one(conditions: dict[str, Any] | None, address: str = "10.0.0.1") -> DiscoveredReplica:
    endpoint: dict[str, Any] = {"addresses": [address], "targetRef": {"kind": "Pod", "name": "p"}}
    if conditions is not None:
        endpoint["conditions"] = conditions
    (replica,) = slice_members(make_slice([endpoint]), "http", "http").replicas
    return replica


@pytest.mark.parametrize(
    ("conditions", "ready", "terminating"),
    [
        (None, True, False),
        ({}, True, False),
        ({"ready": True, "serving": True, "terminating": False}, True, False),
        ({"ready": False, "serving": False, "terminating": False}, False, False),
        ({"ready": False, "serving": True, "terminating": True}, False, True),
        ({"ready": False, "serving": False, "terminating": True}, False, True),
    ],
    ids=["no-conditions", "nil-values", "ready", "starting", "terminating-serving", "terminating"],
)
def test_condition_mapping(
    conditions: dict[str, Any] | None, ready: bool, terminating: bool
) -> None:
    replica = one(conditions)
    assert (replica.ready, replica.terminating) == (ready, terminating)


def test_names_and_urls() -> None:
    assert one(None).name == "p"
    assert one(None, "fd00::7").url == "http://[fd00::7]:8000"
    s = make_slice([{"addresses": ["10.0.0.1", "10.0.0.2"]}])
    assert [(r.name, r.url) for r in slice_members(s, "http", "https").replicas] == [
        ("10.0.0.1:8000", "https://10.0.0.1:8000")  # first address only; no targetRef
    ]
    fqdn = make_slice([{"addresses": ["vllm-0.example"]}], address_type="FQDN")
    assert slice_members(fqdn, 8000, "http").replicas[0].url == "http://vllm-0.example:8000"


TWO_PORTS = [
    {"name": "http", "port": 8000, "protocol": "TCP"},
    {"name": "metrics", "port": 9090, "protocol": "TCP"},
    {"name": "dns", "port": 53, "protocol": "UDP"},
]


@pytest.mark.parametrize(
    ("ports", "want", "url"),
    [
        (TWO_PORTS, "metrics", "http://10.0.0.1:9090"),
        (TWO_PORTS, 7000, "http://10.0.0.1:7000"),
        ([{"name": "", "port": 8000, "protocol": "TCP"}], None, "http://10.0.0.1:8000"),
        ([{"port": 8000}], None, "http://10.0.0.1:8000"),
        (TWO_PORTS[:1] + TWO_PORTS[2:], None, "http://10.0.0.1:8000"),
    ],
    ids=["by-name", "by-number", "only-port", "protocol-defaults-to-tcp", "udp-ignored"],
)
def test_port_selection(ports: list[dict[str, Any]], want: PortSpec, url: str) -> None:
    members = slice_members(make_slice([{"addresses": ["10.0.0.1"]}], ports), want, "http")
    assert [r.url for r in members.replicas] == [url] and members.problem is None


@pytest.mark.parametrize(("want", "problem"), [(None, "only TCP port"), ("grpc", "'grpc'")])
def test_unresolvable_port_contributes_nothing(want: PortSpec, problem: str) -> None:
    members = slice_members(make_slice([{"addresses": ["10.0.0.1"]}], TWO_PORTS), want, "http")
    assert members.replicas == ()
    assert members.problem is not None and problem in members.problem


def test_null_endpoints_are_an_empty_slice() -> None:
    assert slice_members(make_slice(None), "http", "http").replicas == ()


def test_merge_prefers_the_most_available_copy_and_sorts() -> None:
    def r(name: str, ready: bool = True, terminating: bool = False) -> DiscoveredReplica:
        return DiscoveredReplica(name, f"http://{name}:1", ready, terminating)

    merged = merge_members(
        [
            (r("b", ready=False), r("a", ready=False, terminating=True)),
            (r("b"), r("a", ready=False)),
        ]
    )
    assert merged == (r("a", ready=False), r("b"))


# -- the fixtures are what a real API server sends ------------------------------------------


def _validate(obj: dict[str, Any], schema: str) -> None:
    """Strict OpenAPI validation with the schemas kubernetes-validate ships (offline)."""
    jsonschema = pytest.importorskip("jsonschema")
    kv_utils = pytest.importorskip("kubernetes_validate.utils")
    from referencing import Registry, Resource

    version = "1.29.0"
    base = f"kubernetes-json-schema/v{version}-local-strict"
    contents = kv_utils.schema_contents(f"{base}/{schema}.json", version)
    definitions = kv_utils.schema_contents(f"{base}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(contents) @ Registry())
    jsonschema.validators.Draft202012Validator(contents, registry=registry).validate(obj)


V1_EVENTS = load_events("endpointslices-v1-watch.jsonl")


def test_v1_list_fixture_is_schema_valid() -> None:
    body = load_json("endpointslices-v1-list.json")
    _validate(body, "endpointslicelist-discovery-v1")
    assert len(msgspec.convert(body, type=EndpointSliceList).items or ()) == 2


@pytest.mark.parametrize("index", range(len(V1_EVENTS)), ids=[e["type"] for e in V1_EVENTS])
def test_v1_watch_events_are_schema_valid(index: int) -> None:
    event = V1_EVENTS[index]
    _validate(event, "watchevent-meta-v1")
    if event["type"] == "ERROR":
        _validate(event["object"], "status-meta-v1")
    elif event["type"] != "BOOKMARK":  # a bookmark carries only metadata.resourceVersion
        _validate(event["object"], "endpointslice-discovery-v1")


def test_fixtures_are_json_lines_with_no_blank_lines() -> None:
    for path in FIXTURES.glob("*.jsonl"):
        lines = path.read_text().split("\n")
        assert lines[-1] == "" and all(json.loads(line) for line in lines[:-1]), path.name
