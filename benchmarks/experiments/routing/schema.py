"""The shape of ``results.json``: what ``run`` writes and ``report``/``plots``/``goals`` read.

Plain JSON types only, so a file written by one version can be re-rendered (``--render-only``)
without the runs. Times are seconds, rates requests per second. ``cells_of`` and ``find`` are
the lookups every reader uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NotRequired, TypedDict


class Cell(TypedDict):
    """One plan cell: runs differing only by seed, pooled (see ``run``)."""

    section: str  # headline | load | scrape | gateways | prefix | late_binding
    row: str  # policy row, or the saturation bound's label in the late-binding sweep
    rate: float
    axis: float  # the section's x value: rate, load fraction, scrape interval, gateway count
    gateways: int
    scrape_interval_s: float
    seeds: list[int]
    duration_s: float
    requests: int
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float  # pooled over seeds
    ttft_p99_per_seed_s: list[float]
    e2e_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    output_tokens_per_s: float
    max_waiting: int
    kv_spread_mean: float
    kv_mean: float
    preemptions_per_run: float
    lost: int
    held_per_run: float
    buffer_wait_p99_s: float
    reasons: dict[str, int]
    sim_s_per_cpu_s: float
    ttft_cdf_s: NotRequired[list[float]]  # headline cells: TTFT at 0, 0.1%, ..., 100%


class Capacity(TypedDict):
    per_replica_rps: float
    cluster_rps: float
    method: str
    preemptions: int


class LateBinding(TypedDict):
    chosen: str
    sweep: list[Cell]


class Series(TypedDict):
    rate: float
    seed: int
    t_s: list[float]
    waiting: list[list[int]]  # per replica
    kv_usage: list[list[float]]  # per replica


class Speed(TypedDict):
    scenario: str
    sim_s_per_cpu_s: float
    sim_s_per_wall_s: float


class Goal(TypedDict):
    goal: str
    rate: float
    target: str
    measured: str
    met: bool
    factor: float | None


class Meta(TypedDict):
    generated: str
    command: str
    python: str
    processes: int
    wall_s: float
    cpu_s: float
    runs: int
    profile: str
    replicas: int
    settings: dict[str, object]


class Results(TypedDict):
    meta: Meta
    capacity: Capacity
    late_binding: LateBinding
    cells: list[Cell]
    series: dict[str, Series]
    speed: Speed
    goals: list[Goal]
    live: NotRequired[str]  # rendered live-validation section, when live.json exists


def cells_of(results: Results, section: str) -> list[Cell]:
    """The cells of one section, in plan order."""
    return [c for c in results["cells"] if c["section"] == section]


def find(
    cells: Sequence[Cell],
    row: str | None = None,
    rate: float | None = None,
    axis: float | None = None,
) -> Cell | None:
    """The first cell matching every given key (row, rate, axis), or None."""
    for c in cells:
        if row is not None and c["row"] != row:
            continue
        if rate is not None and c["rate"] != rate:
            continue
        if axis is not None and c["axis"] != axis:
            continue
        return c
    return None
