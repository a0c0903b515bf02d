"""Saturation throughput of one replica: the measured capacity that load levels are relative to.

Method: one engine of the profile, a closed loop of ``concurrency`` clients (each sends its next
request the moment its previous one finishes) drawing lengths from the workload, so the engine
always has a backlog; completions per second over ``duration_s`` after ``warmup_s``. Deep
enough backlogs (past the point where KV-cache pressure starts preempting) all give the same
figure: the engine's service rate for that length mix. Cluster capacity is that times the
number of replicas (perfect balancing cannot do better; any imbalance does worse).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from benchmarks.des.scaling import ScaledWorkload
from benchmarks.load.workloads import make_workload
from benchmarks.sim.engine import Engine, SimRequest
from benchmarks.sim.profiles import get_profile
from benchmarks.sim.virtual import RequestRecord, VirtualCluster


@dataclass(frozen=True, slots=True)
class Capacity:
    profile: str
    workload: str
    concurrency: int
    requests_per_s: float  # per replica, completions in the measured window
    output_tokens_per_s: float
    preemptions: int
    duration_s: float


def replica_capacity(
    profile_name: str,
    workload: str = "openorca",
    *,
    concurrency: int = 64,
    warmup_s: float = 600.0,
    duration_s: float = 1800.0,
    seed: int = 0,
    overrides: Mapping[str, int | float] | None = None,
    length_divisor: int = 1,
) -> Capacity:
    """``overrides`` and ``length_divisor`` describe a scaled copy (``benchmarks.des.scaling``)."""
    profile = get_profile(profile_name, **dict(overrides or {}))
    # Length workloads only: prompts are unique, so prefix caching plays no part here.
    max_total = profile.max_model_len * length_divisor
    specs = iter(
        ScaledWorkload(make_workload(workload, seed, max_total_tokens=max_total), length_divisor)
    )
    engine = Engine(profile, random.Random(f"{seed}/capacity"))
    end = warmup_s + duration_s
    counted = [0, 0]  # requests, output tokens finished inside the window

    def send() -> None:
        spec = next(specs)
        cluster.submit(
            SimRequest(f"c-{spec.index}", spec.prompt_tokens, spec.max_tokens, cluster.now)
        )

    def finish(rec: RequestRecord) -> None:
        if rec.finish_s is not None and warmup_s <= rec.finish_s < end:
            counted[0] += 1
            counted[1] += rec.output_tokens
        send()

    cluster = VirtualCluster([engine], lambda req, now: 0, on_finish=finish, sample_interval_s=None)
    for _ in range(concurrency):
        cluster.call_at(0.0, send)
    cluster.run(warmup_s)
    preempted = engine.stats.num_preemptions
    cluster.run(end)
    return Capacity(
        profile=profile_name,
        workload=workload,
        concurrency=concurrency,
        requests_per_s=counted[0] / duration_s,
        output_tokens_per_s=counted[1] / duration_s,
        preemptions=engine.stats.num_preemptions - preempted,
        duration_s=duration_s,
    )
