"""What the routing experiment runs: policy rows, sections, run lengths (full and --quick).

Rows are gateway configurations named as in the report. ``p2c_late_binding`` is ``p2c`` with a
saturation bound, so requests wait at the gateway (FIFO) when every replica is past it and each
is bound to the first replica that frees; its bound is chosen by the ``late_binding`` section
(on seeds disjoint from the other sections', so the choice is not fitted to the runs it is
judged on).

Scrape staleness follows the live gateway's defaults: interval 0.25 s, a scrape is stale after
``max_metrics_age_s`` = 4 intervals (the default 1.0 s at 0.25 s), scaled with the interval in
the scrape sweep so that a slow scrape means old data, not no data.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from benchmarks.des.scenario import GatewaySpec, GaugeMode, Scenario
from policies.types import Saturation

PROFILE = "a10g-llama3-8b"
REPLICAS = 8
HEADLINE_RATES = (12.0, 13.0)  # the talk's two operating points, req/s
DEFAULT_INTERVAL_S = 0.25
AGE_INTERVALS = 4.0  # max_metrics_age_s / scrape_interval_s (live default 1.0 / 0.25)

MAIN_ROWS = (
    "round_robin",
    "least_request",
    "p2c_kv",
    "p2c",
    "p2c_no_correction",
    "p2c_late_binding",
    "oracle",
)
P2C_FAMILY = ("p2c", "p2c_no_correction", "p2c_kv", "p2c_late_binding")
# Diagnostic row: the oracle's full scan on the scraped view (live staleness). Between p2c and
# the oracle, it separates what sampling two costs from what stale, late data costs.
DIAGNOSTIC_ROWS = ("oracle_scraped",)
# Diagnostic row of the scrape sweep: p2c reading gauges that are exact at the instant of the
# scrape (``Scenario.gauges="exact"``), to isolate what the engine gauges' own lag costs.
EXACT_GAUGES_ROW = "p2c_exact_gauges"

# Candidate saturation bounds for late binding (label -> bound). max_queue counts the effective
# queue (scraped waiting + own dispatches since), max_kv_usage the scraped KV ratio.
BOUNDS: dict[str, Saturation] = {
    "queue>=1": Saturation(max_queue=1),
    "queue>=2": Saturation(max_queue=2),
    "kv>=0.97": Saturation(max_kv_usage=0.97),
    "queue>=1|kv>=0.95": Saturation(max_queue=1, max_kv_usage=0.95),
    "queue>=1|kv>=0.97": Saturation(max_queue=1, max_kv_usage=0.97),
}
DEFAULT_BOUND = "queue>=1"  # the full plan's sweep picked it; quick mode and live use it

# The shared-prefix workload for prefix_affinity: 16 system prompts of 2048 tokens (32K tokens
# of prefixes, about one replica's whole KV cache) in front of 64 questions each.
PREFIX_WORKLOAD = (
    ("num_groups", 16),
    ("prompts_per_group", 64),
    ("system_prompt_len", 2048),
    ("question_len", 128),
    ("output_len", 256),
)
# The gateway's prefix index, sized like one replica's KV cache in 64-token (256-char) blocks.
PREFIX_CAPACITY_BLOCKS = 34_000 // 64


@dataclass(frozen=True, slots=True)
class Settings:
    """Run lengths and grids; ``FULL`` for the committed report, ``QUICK`` for CI."""

    warmup_s: float
    headline_s: float
    headline_seeds: tuple[int, ...]
    load_fractions: tuple[float, ...]
    load_rows: tuple[str, ...]
    load_s: float
    intervals_s: tuple[float, ...]
    scrape_rows: tuple[str, ...]
    scrape_s: float
    scrape_seeds: tuple[int, ...]
    gateway_counts: tuple[int, ...]
    gateway_rows: tuple[str, ...]
    gateway_s: float
    gateway_seeds: tuple[int, ...]
    bounds: tuple[str, ...]
    bound_s: float
    bound_seeds: tuple[int, ...]
    prefix_rates: tuple[float, ...]
    prefix_rows: tuple[str, ...]
    prefix_s: float
    capacity_s: float
    series_window_s: float  # length of the per-replica time-series figure
    headline_rows: tuple[str, ...] = MAIN_ROWS
    quick: bool = False


FULL = Settings(
    warmup_s=120.0,
    headline_s=1200.0,
    headline_seeds=(0, 1, 2, 3, 4),
    load_fractions=(0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1),
    load_rows=MAIN_ROWS,
    load_s=600.0,
    intervals_s=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0),
    scrape_rows=(*P2C_FAMILY, EXACT_GAUGES_ROW),
    scrape_s=600.0,
    scrape_seeds=(0,),
    gateway_counts=(1, 2, 4),
    gateway_rows=("round_robin", "least_request", "p2c", "p2c_late_binding"),
    gateway_s=600.0,
    gateway_seeds=(0, 1),
    bounds=tuple(BOUNDS),
    bound_s=900.0,
    bound_seeds=(100, 101),
    prefix_rates=(6.0, 9.0, 12.0),
    prefix_rows=("round_robin", "p2c", "prefix_affinity"),
    prefix_s=900.0,
    capacity_s=3600.0,
    series_window_s=600.0,
    headline_rows=MAIN_ROWS + DIAGNOSTIC_ROWS,
)

QUICK = Settings(
    warmup_s=60.0,
    headline_s=120.0,
    headline_seeds=(0,),
    load_fractions=(0.6, 0.9),
    load_rows=("round_robin", "p2c"),
    load_s=60.0,
    intervals_s=(0.25, 2.0),
    scrape_rows=("p2c",),
    scrape_s=60.0,
    scrape_seeds=(0,),
    gateway_counts=(1, 2),
    gateway_rows=("p2c",),
    gateway_s=60.0,
    gateway_seeds=(0,),
    bounds=(),  # no sweep: DEFAULT_BOUND
    bound_s=0.0,
    bound_seeds=(),
    prefix_rates=(9.0,),
    prefix_rows=("p2c", "prefix_affinity"),
    prefix_s=60.0,
    capacity_s=300.0,
    series_window_s=60.0,
    quick=True,
)


@dataclass(frozen=True, slots=True)
class Job:
    """One run and where its result goes: ``section`` plus the key within the section."""

    section: str
    row: str
    scenario: Scenario
    axis: float = 0.0  # the section's x value: load fraction, interval, gateway count, rate
    extra: tuple[tuple[str, str], ...] = field(default=())

    @property
    def group(self) -> tuple[str, str, float, float]:
        """Runs sharing a group differ only by seed and are pooled."""
        return (self.section, self.row, self.scenario.rate, self.axis)


def gateway_spec(
    row: str, *, interval_s: float = DEFAULT_INTERVAL_S, bound: Saturation | None = None
) -> GatewaySpec:
    base = GatewaySpec(scrape_interval_s=interval_s, max_metrics_age_s=AGE_INTERVALS * interval_s)
    if row == "p2c_no_correction":
        return replace(base, policy="p2c", policy_params=(("staleness_correction", False),))
    if row == EXACT_GAUGES_ROW:
        return replace(base, policy="p2c")
    if row == "oracle_scraped":
        return replace(base, policy="oracle", exact_oracle=False)
    if row == "p2c_late_binding":
        return replace(base, policy="p2c", saturation=bound or BOUNDS[DEFAULT_BOUND])
    if row == "prefix_affinity":
        return replace(
            base, policy=row, policy_params=(("capacity_blocks", PREFIX_CAPACITY_BLOCKS),)
        )
    return replace(base, policy=row)


def scenario(
    name: str,
    rate: float,
    seed: int,
    duration_s: float,
    s: Settings,
    spec: GatewaySpec,
    *,
    gateways: int = 1,
    keep_series: bool = False,
    gauges: GaugeMode = "engine",
    workload: str = "openorca",
    workload_params: tuple[tuple[str, int], ...] = (),
) -> Scenario:
    return Scenario(
        name=name,
        rate=rate,
        replicas=REPLICAS,
        profile=PROFILE,
        workload=workload,
        workload_params=workload_params,
        warmup_s=s.warmup_s,
        duration_s=duration_s,
        seed=seed,
        gateway=spec,
        gateways=gateways,
        keep_series=keep_series,
        gauges=gauges,
    )


def bound_jobs(s: Settings) -> list[Job]:
    return [
        Job(
            "late_binding",
            label,
            scenario(
                f"bound {label} @{rate}",
                rate,
                seed,
                s.bound_s,
                s,
                gateway_spec("p2c_late_binding", bound=BOUNDS[label]),
            ),
            axis=rate,
        )
        for label in s.bounds
        for rate in HEADLINE_RATES
        for seed in s.bound_seeds
    ]


def main_jobs(s: Settings, capacity_rps: float, bound: Saturation) -> list[Job]:
    """Every section except the late-binding sweep, given the cluster capacity and the bound."""
    jobs: list[Job] = []
    for rate in HEADLINE_RATES:
        for row in s.headline_rows:
            for seed in s.headline_seeds:
                keep = seed == s.headline_seeds[0] and row in ("round_robin", "p2c") and rate == 12
                sc = scenario(
                    f"{row} @{rate}",
                    rate,
                    seed,
                    s.headline_s,
                    s,
                    gateway_spec(row, bound=bound),
                    keep_series=keep,
                )
                jobs.append(Job("headline", row, sc, axis=rate))
    for frac in s.load_fractions:
        rate = round(frac * capacity_rps, 3)
        for row in s.load_rows:
            sc = scenario(
                f"{row} @{frac:.0%}", rate, 0, s.load_s, s, gateway_spec(row, bound=bound)
            )
            jobs.append(Job("load", row, sc, axis=frac))
    for rate in HEADLINE_RATES:
        for interval in s.intervals_s:
            for row in s.scrape_rows:
                for seed in s.scrape_seeds:
                    spec = gateway_spec(row, interval_s=interval, bound=bound)
                    gauges: GaugeMode = "exact" if row == EXACT_GAUGES_ROW else "engine"
                    name = f"{row} scrape {interval}s @{rate}"
                    sc = scenario(name, rate, seed, s.scrape_s, s, spec, gauges=gauges)
                    jobs.append(Job("scrape", row, sc, axis=interval))
    for rate in HEADLINE_RATES:
        for k in s.gateway_counts:
            for row in s.gateway_rows:
                if row == "round_robin" and k > 1:
                    continue  # load-blind: the baseline needs only one gateway count
                for seed in s.gateway_seeds:
                    sc = scenario(
                        f"{row} x{k} @{rate}",
                        rate,
                        seed,
                        s.gateway_s,
                        s,
                        gateway_spec(row, bound=bound),
                        gateways=k,
                    )
                    jobs.append(Job("gateways", row, sc, axis=float(k)))
    for rate in s.prefix_rates:
        for row in s.prefix_rows:
            sc = scenario(
                f"{row} shared-prefix @{rate}",
                rate,
                0,
                s.prefix_s,
                s,
                gateway_spec(row),
                workload="shared_prefix",
                workload_params=PREFIX_WORKLOAD,
            )
            jobs.append(Job("prefix", row, sc, axis=rate))
    return jobs


def settings_from(raw: dict[str, object]) -> Settings:
    """``Settings`` back from its JSON form (``dataclasses.asdict``: tuples became lists)."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return Settings(**fields)  # type: ignore[arg-type]
