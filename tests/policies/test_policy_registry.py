"""The registry: names, parameters, and the simulation-only oracle."""

from __future__ import annotations

import pytest

from policies.p2c import P2C
from policies.prefix_affinity import PrefixAffinity
from policies.registry import (
    DEFAULT_POLICY,
    POLICY_NAMES,
    SIMULATION_POLICY_NAMES,
    make_policy,
    policy_params,
)


def test_names_are_canonical_and_unique() -> None:
    assert POLICY_NAMES == (
        "round_robin",
        "random",
        "least_request",
        "p2c_kv",
        "p2c",
        "prefix_affinity",
    )
    assert (*POLICY_NAMES, "oracle") == SIMULATION_POLICY_NAMES
    assert DEFAULT_POLICY == "p2c"


@pytest.mark.parametrize("name", SIMULATION_POLICY_NAMES)
def test_every_policy_builds_with_defaults_and_reports_its_name(name: str) -> None:
    policy = make_policy(name, simulation=True)
    assert policy.name == name
    assert policy.needs_prefix == (name == "prefix_affinity")


def test_parameters_reach_the_policy() -> None:
    p2c = make_policy("p2c", {"staleness_correction": False})
    assert isinstance(p2c, P2C) and p2c.staleness_correction is False
    pa = make_policy("prefix_affinity", {"capacity_blocks": 64, "balance_rel_threshold": 2})
    assert isinstance(pa, PrefixAffinity)
    assert pa.index.capacity_blocks == 64 and pa.balance_rel_threshold == 2.0
    assert set(policy_params("prefix_affinity")) == {
        "capacity_blocks",
        "balance_abs_threshold",
        "balance_rel_threshold",
        "min_match_blocks",
        "staleness_correction",
    }


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("nope", None, "unknown policy 'nope'"),
        ("p2c", {"stalenes_correction": True}, "unknown parameter 'stalenes_correction'"),
        ("round_robin", {"x": 1}, "unknown parameter 'x'.*accepted: none"),
        ("p2c", {"staleness_correction": 1}, "must be bool"),
        ("prefix_affinity", {"capacity_blocks": True}, "must be int"),
        ("prefix_affinity", {"capacity_blocks": 1.5}, "must be int"),
        ("prefix_affinity", {"balance_rel_threshold": "2"}, "must be float"),
        ("prefix_affinity", {"capacity_blocks": 0}, "capacity_blocks must be >= 1"),
        ("oracle", None, "simulation only"),
    ],
    ids=[
        "name",
        "param",
        "no_params",
        "bool",
        "int_not_bool",
        "int_not_float",
        "float",
        "range",
        "oracle",
    ],
)
def test_rejects_with_the_offending_name(
    name: str, params: dict[str, object] | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        make_policy(name, params)
