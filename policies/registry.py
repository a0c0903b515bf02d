"""Policy names → constructors: the one place config names meet policy classes.

One canonical snake_case name per policy, no aliases. ``make_policy`` validates parameters
strictly (an unknown name, unknown parameter or wrongly typed value is a ``ValueError`` naming
it) so that config errors surface at startup, never as a silently ignored key.

``POLICY_NAMES`` are the policies the gateway may be configured with. ``oracle`` reads exact,
zero-staleness state that only a simulator has; it is in ``SIMULATION_POLICY_NAMES`` and
``make_policy`` builds it only with ``simulation=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from policies.base import Policy
from policies.least_request import LeastRequest
from policies.oracle import Oracle
from policies.p2c import P2C, P2CKv
from policies.prefix_affinity import PrefixAffinity
from policies.random_choice import RandomChoice
from policies.round_robin import RoundRobin

ParamType = type[bool] | type[int] | type[float]


@dataclass(frozen=True, slots=True)
class _Spec:
    build: Callable[..., Policy]
    params: Mapping[str, ParamType] = field(default_factory=dict)
    simulation_only: bool = False


_SPECS: dict[str, _Spec] = {
    RoundRobin.name: _Spec(RoundRobin),
    RandomChoice.name: _Spec(RandomChoice),
    LeastRequest.name: _Spec(LeastRequest),
    P2CKv.name: _Spec(P2CKv),
    P2C.name: _Spec(P2C, {"staleness_correction": bool}),
    PrefixAffinity.name: _Spec(
        PrefixAffinity,
        {
            "capacity_blocks": int,
            "balance_abs_threshold": int,
            "balance_rel_threshold": float,
            "min_match_blocks": int,
            "staleness_correction": bool,
        },
    ),
    Oracle.name: _Spec(Oracle, simulation_only=True),
}

POLICY_NAMES: tuple[str, ...] = tuple(n for n, s in _SPECS.items() if not s.simulation_only)
SIMULATION_POLICY_NAMES: tuple[str, ...] = tuple(_SPECS)
DEFAULT_POLICY = P2C.name


def policy_params(name: str) -> Mapping[str, ParamType]:
    """The parameters ``name`` accepts and their types (for config validation and docs)."""
    return dict(_spec(name, simulation=True).params)


def make_policy(
    name: str, params: Mapping[str, object] | None = None, *, simulation: bool = False
) -> Policy:
    """Build policy ``name`` with ``params``; ValueError naming the bad name or parameter."""
    spec = _spec(name, simulation=simulation)
    kwargs: dict[str, object] = {}
    for key, value in (params or {}).items():
        expected = spec.params.get(key)
        if expected is None:
            accepted = ", ".join(sorted(spec.params)) or "none"
            raise ValueError(
                f"unknown parameter {key!r} for policy {name!r} (accepted: {accepted})"
            )
        kwargs[key] = _check_type(name, key, value, expected)
    return spec.build(**kwargs)


def _spec(name: str, *, simulation: bool) -> _Spec:
    spec = _SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(POLICY_NAMES)})")
    if spec.simulation_only and not simulation:
        raise ValueError(f"policy {name!r} is for simulation only (it reads exact engine state)")
    return spec


def _check_type(policy: str, key: str, value: object, expected: ParamType) -> object:
    # bool is an int subclass: reject True for an int parameter and 1 for a bool one.
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok:
        raise ValueError(
            f"parameter {key!r} of policy {policy!r} must be {expected.__name__}, "
            f"got {type(value).__name__} {value!r}"
        )
    if expected is float:
        assert isinstance(value, int | float)
        return float(value)
    return value
