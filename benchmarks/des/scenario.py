"""A routing run described as plain data, and the bridge from workloads to engine requests.

``Scenario`` (with one ``GatewaySpec`` shared by its ``gateways``) is frozen and picklable, so
experiments can fan runs out over processes; ``runner.run_scenario`` executes one.

``arrivals`` turns a ``benchmarks.load.workloads`` stream and its ``Arrivals`` process into
``Arrival`` records: token counts, the engine's prefix-block hashes (``block_size`` tokens per
block) and, when the policy needs them, the gateway's prefix hashes (``block_chars`` characters
per block, at most ``max_blocks``) - the two granularities the live path uses
(``benchmarks.sim.openai_shapes`` and ``gateway.request_info``).

Hashes here are synthetic but exact in the one property routing and caching use: block *i* of
two prompts gets the same value if and only if their first *i + 1* blocks have the same text.
A block that lies wholly inside a shared system prompt is keyed by that system prompt; any
later block by (system prompt, user text). Prompts without a shared part (every workload but
``shared_prefix``) are unique by construction (each starts with its own index tag), so they get
no hashes at all: they could never hit another request's cache, and a request's own blocks are
re-hit after preemption without hashes (``benchmarks.sim.kv_cache``). Values are interned per
run (never the salted built-in ``hash()``), so runs are identical across processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from benchmarks.des.scaling import ScaledWorkload
from benchmarks.load.workloads import (
    CHARS_PER_TOKEN,
    Arrivals,
    RequestSpec,
    Workload,
    make_workload,
)
from policies.types import Saturation

Split = Literal["round_robin", "random"]
# What a scrape reads: "engine" - the gauges as the engine publishes them (vLLM: as of its last
# step, so a request handed over mid-step or still in the front end is not counted yet);
# "exact" - the true waiting count at the instant of reading, front end included. "exact" is
# a diagnostic no real engine offers: it isolates what the gauges' own lag costs routing.
GaugeMode = Literal["engine", "exact"]


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    """One gateway instance's configuration (every gateway of a scenario gets the same)."""

    policy: str = "p2c"
    policy_params: tuple[tuple[str, bool | int | float], ...] = ()
    scrape_interval_s: float = 0.25  # gateway default (gateway.config.ScraperConfig)
    max_metrics_age_s: float = 1.0  # gateway default
    scrape_latency_s: float = 0.002  # from reading the engine's gauges to the result landing
    scrape_jitter: float = 0.0  # each round starts interval * (1 + U(-j, j)) after the last
    saturation: Saturation | None = None  # None: never hold a request while a replica is ready
    # The live gateway's buffer defaults (buffer.max_queued_per_model, buffer.max_wait_s).
    max_buffered: int = 1000  # requests held at the gateway before it rejects
    buffer_deadline_s: float | None = 120.0  # a held request is rejected after this long
    # The oracle decides on the engines' exact state; False gives it the scraped view instead
    # (a full scan with live staleness: separates the cost of sampling two from staleness).
    exact_oracle: bool = True
    block_chars: int = 256  # gateway prefix hashing (gateway.config.PrefixAffinityPolicy)
    max_blocks: int = 128

    def __post_init__(self) -> None:
        if self.scrape_interval_s <= 0 or self.max_metrics_age_s <= 0:
            raise ValueError("scrape_interval_s and max_metrics_age_s must be > 0")
        if self.scrape_latency_s < 0 or self.scrape_latency_s >= self.scrape_interval_s:
            raise ValueError("scrape_latency_s must be in [0, scrape_interval_s)")
        if not 0.0 <= self.scrape_jitter < 1.0:
            raise ValueError("scrape_jitter must be in [0, 1)")
        if self.max_buffered < 0:
            raise ValueError("max_buffered must be >= 0")


@dataclass(frozen=True, slots=True)
class Scenario:
    """N replicas of one profile behind ``gateways`` gateways, open-loop arrivals, one seed."""

    name: str
    rate: float  # offered requests per second (all gateways together)
    replicas: int = 8
    profile: str = "a10g-llama3-8b"
    profile_overrides: tuple[tuple[str, int | float], ...] = ()  # e.g. scaling.scaled_overrides
    workload: str = "openorca"
    length_divisor: int = 1  # every prompt and output this many times shorter (scaling)
    workload_params: tuple[tuple[str, int], ...] = ()
    burstiness: float = 1.0  # Gamma shape of the inter-arrival gaps; 1 = Poisson
    warmup_s: float = 120.0  # arrivals before this are not measured
    duration_s: float = 1800.0  # measured window of arrivals after the warm-up
    drain_limit_s: float = 3600.0  # after the last arrival, wait at most this for completions
    seed: int = 0  # arrivals and lengths, and (unless noise_seed is set) everything else
    noise_seed: int | None = None  # engines' step jitter, gateway rngs, scrape phases
    gateway: GatewaySpec = field(default_factory=GatewaySpec)
    gateways: int = 1
    split: Split = "round_robin"  # how arrivals are spread over the gateways
    gauges: GaugeMode = "engine"
    sample_interval_s: float = 1.0  # per-replica gauge samples (KV spread, figures)
    keep_series: bool = False  # return the per-replica samples of the measured window
    keep_records: bool = False  # return per-request records

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.gateways < 1:
            raise ValueError("replicas and gateways must be >= 1")
        if self.rate <= 0 or self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("rate and duration_s must be > 0, warmup_s >= 0")

    @property
    def end_s(self) -> float:
        """When arrivals stop."""
        return self.warmup_s + self.duration_s


@dataclass(frozen=True, slots=True)
class Arrival:
    """One client request as it reaches a gateway."""

    request_id: str
    at: float
    prompt_tokens: int
    output_tokens: int
    block_hashes: tuple[int, ...] = ()  # engine prefix blocks (prefix caching)
    prefix_hashes: tuple[int, ...] = ()  # gateway prefix blocks (prefix affinity)
    prompt_chars: int = 0


class _Chains:
    """Interned prefix-block hashes at one block granularity (see the module docstring)."""

    def __init__(self, block_tokens: int, max_blocks: int) -> None:
        self.block_tokens = block_tokens
        self.max_blocks = max_blocks
        self._keys: dict[object, int] = {}
        self._cache: dict[object, tuple[int, ...]] = {}

    def of(self, spec: RequestSpec) -> tuple[int, ...]:
        system = spec.system
        if system is None:
            return ()
        whole = (system, spec.user)
        cached = self._cache.get(whole)
        if cached is not None:
            return cached
        n = min(self.max_blocks, spec.prompt_tokens // self.block_tokens)
        in_system = system.tokens // self.block_tokens
        sys_key = self._keys.setdefault(system, len(self._keys))
        whole_key = self._keys.setdefault(whole, len(self._keys))
        out = tuple(((sys_key if i < in_system else whole_key) << 20) | i for i in range(n))
        self._cache[whole] = out
        return out


def arrivals(
    scenario: Scenario, *, block_size: int, max_model_len: int, gateway_hashes: bool
) -> Iterator[Arrival]:
    """The scenario's arrivals in time order, up to ``scenario.end_s`` (exclusive)."""
    params = dict(scenario.workload_params)
    if scenario.workload != "shared_prefix":
        params.setdefault("max_total_tokens", max_model_len * scenario.length_divisor)
    workload: Workload = make_workload(scenario.workload, scenario.seed, **params)
    if scenario.length_divisor != 1:
        workload = ScaledWorkload(workload, scenario.length_divisor)
    times = Arrivals(scenario.rate, scenario.burstiness).times(scenario.seed)
    engine_chains = _Chains(block_size, 1 << 20)
    spec_g = scenario.gateway
    if spec_g.block_chars % CHARS_PER_TOKEN:
        raise ValueError("block_chars must be a whole number of simulated tokens (4 chars)")
    gw_chains = _Chains(spec_g.block_chars // CHARS_PER_TOKEN, spec_g.max_blocks)
    end = scenario.end_s
    for spec, at in zip(workload, times, strict=False):
        if at >= end:
            return
        yield Arrival(
            request_id=f"req-{spec.index}",
            at=at,
            prompt_tokens=spec.prompt_tokens,
            output_tokens=spec.max_tokens,
            block_hashes=engine_chains.of(spec),
            prefix_hashes=gw_chains.of(spec) if gateway_hashes else (),
            prompt_chars=spec.prompt_tokens * CHARS_PER_TOKEN,
        )
