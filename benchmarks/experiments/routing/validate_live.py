"""Validation of the discrete-event simulator against the real gateway over HTTP.

    python -m benchmarks.experiments.routing.validate_live [--quick] [--out DIR]

The same scenario twice, per policy: once through the live stack - 8 simulated replicas
(``benchmarks.sim`` HTTP servers, one child process), the real gateway (``GatewayServer`` with
the policy under test, its own scraper, one child process per policy) and the open-loop client
(``benchmarks.load.openloop``, this process), streaming ``/v1/completions`` - and once in the
DES with the very same profile, arrivals, lengths and gateway settings. Only the live
machinery differs: HTTP, real scrapes of real ``/metrics`` text, event-loop scheduling, CPU.

Scaled to be cheap on 2 cores (``benchmarks.des.scaling``): lengths 16 times shorter, clock 4
times faster, so the talk's ~5,000 tokens/s become ~1,500 and 4 policies fit in about two
minutes. Load: ``LOAD`` of the scaled cluster's measured capacity (12 req/s is 89% of the
full-size cluster's). Scrapes every 0.25 s, stale after 4 intervals (the gateway's defaults),
in both runs.

Agreement, stated before running: for TTFT p50, p90 and p99 of the requests sent in the window,
the live value must lie within the DES's *noise band* widened by ``MARGIN`` - the band is the
min-max over ``NOISE_SEEDS`` DES runs that share the arrivals and differ only in step jitter
and gateway randomness (the live run has its own, unreplayable, jitter). Ranking: every pair
of policies whose DES p99 bands do not overlap must be ordered the same way live. A policy's
live run is void (reported, not compared) when the replicas fell behind real time
(``REAL_TIME_LAG_S``): on a shared machine other load can starve them.

Writes ``live.json`` (and the quick mode into ``benchmarks/results/routing-live-quick/``); the
experiment report embeds the full run's table when ``live.json`` sits beside ``results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import uvloop

from benchmarks.des.capacity import replica_capacity
from benchmarks.des.runner import run_scenario
from benchmarks.des.scaling import ScaledWorkload, scaled_overrides
from benchmarks.des.scenario import GatewaySpec, Scenario
from benchmarks.experiments.routing.live_processes import Child, gateway_main, replicas_main
from benchmarks.experiments.routing.plan import BOUNDS, DEFAULT_BOUND, PROFILE, REPLICAS
from benchmarks.load.openloop import LoadConfig, run_load
from benchmarks.load.report import nearest_rank
from benchmarks.load.workloads import make_workload
from benchmarks.sim.profiles import get_profile

HERE = Path(__file__).resolve().parent
QUICK_OUT = HERE.parents[1] / "results" / "routing-live-quick"
LENGTHS = 16
SPEED = 4.0
LOAD = 0.9
# The live gateway's default scrape interval, not scaled: rendering a replica's 23 KB /metrics
# page costs ~2 ms, so 8 replicas scraped 16 times a second would eat a quarter of a core.
INTERVAL_S = 0.25
NOISE_SEEDS = 5
MARGIN = 0.15
# A live run is void when its replicas' steps start this late on average (CPU starvation: the
# simulated GPU then runs slower than its profile, so it is not the scenario the DES ran).
# Scaled steps last ~100 ms; 5 ms is a 5% slowdown.
REAL_TIME_LAG_S = 0.005
QUANTILES = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class LivePlan:
    policies: tuple[str, ...]
    warmup_s: float  # real seconds (x SPEED in the original scenario's time)
    window_s: float
    # Policies run at once, each on its own replicas and gateway. 1 for measurements: two at
    # once on 2 cores already put the client's event loop behind (p90 off by 30%).
    parallel: int = 1
    seed: int = 0
    quick: bool = False


FULL_PLAN = LivePlan(
    ("round_robin", "least_request", "p2c_kv", "p2c", "p2c_late_binding"),
    warmup_s=8,
    window_s=12,
)
QUICK_PLAN = LivePlan(("p2c",), warmup_s=4, window_s=6, quick=True)


def _overrides() -> dict[str, int | float]:
    return scaled_overrides(get_profile(PROFILE), lengths=LENGTHS, speed=SPEED)


def gateway_spec(policy: str) -> GatewaySpec:
    spec = GatewaySpec(
        scrape_interval_s=INTERVAL_S, max_metrics_age_s=4 * INTERVAL_S, scrape_latency_s=0.003
    )
    if policy == "p2c_late_binding":
        return replace(spec, policy="p2c", saturation=BOUNDS[DEFAULT_BOUND])
    return replace(spec, policy=policy)


def gateway_document(policy: str, urls: Sequence[str]) -> dict[str, Any]:
    """The live gateway's configuration for ``policy``, equal to ``gateway_spec``'s."""
    spec = gateway_spec(policy)
    doc: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "replicas": {"urls": list(urls)},
        "policy": {"name": spec.policy, **dict(spec.policy_params)},
        "scraper": {
            "interval_s": spec.scrape_interval_s,
            "timeout_s": spec.scrape_interval_s * 0.8,
            "max_metrics_age_s": spec.max_metrics_age_s,
        },
        "buffer": {"max_queued_per_model": spec.max_buffered, "max_wait_s": spec.buffer_deadline_s},
        "logging": {"level": "WARNING", "access_log": False},
        "shutdown": {"drain_s": 5.0},
    }
    sat = spec.saturation
    if sat is not None:
        doc["saturation"] = {
            "max_inflight_per_replica": sat.max_inflight,
            "max_queue_per_replica": sat.max_queue,
            "max_kv_usage": sat.max_kv_usage,
        }
    return doc


def scenario(plan: LivePlan, policy: str, rate: float, noise_seed: int | None = None) -> Scenario:
    return Scenario(
        name=f"live-check {policy}",
        rate=rate,
        replicas=REPLICAS,
        profile=PROFILE,
        profile_overrides=tuple(_overrides().items()),
        length_divisor=LENGTHS,
        warmup_s=plan.warmup_s,
        duration_s=plan.window_s,
        seed=plan.seed,
        noise_seed=noise_seed,
        gateway=gateway_spec(policy),
    )


# ------------------------------------------------------------------------ measuring
def _quantiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    out = {f"ttft_p{q}_s": nearest_rank(ordered, q) for q in QUANTILES}
    out["ttft_mean_s"] = statistics.fmean(ordered) if ordered else float("nan")
    return out


async def live_run(plan: LivePlan, policy: str, rate: float) -> dict[str, Any]:
    """One policy through fresh replicas and a fresh gateway, each in its own process."""
    loop = asyncio.get_running_loop()
    replicas = Child(replicas_main, REPLICAS, PROFILE, _overrides(), plan.seed)
    gateway: Child | None = None
    try:
        # Starting and stopping block on the pipe: off the loop, which may be measuring.
        urls = await loop.run_in_executor(None, replicas.start)
        gateway = Child(gateway_main, gateway_document(policy, urls), plan.seed)
        port = await loop.run_in_executor(None, gateway.start)
        workload = ScaledWorkload(
            make_workload("openorca", plan.seed, max_total_tokens=16_384), LENGTHS
        )
        cfg = LoadConfig(
            base_url=f"http://127.0.0.1:{port}",
            workload=workload,
            api="completions",
            stream=True,
            rate=rate,
            duration_s=plan.warmup_s + plan.window_s,
            seed=plan.seed,
            timeout_s=120.0,
        )
        result = await run_load(cfg)
    finally:
        if gateway is not None:
            await loop.run_in_executor(None, gateway.stop)
        await loop.run_in_executor(None, replicas.stop)
    lo, hi = plan.warmup_s, plan.warmup_s + plan.window_s
    window = [r for r in result.records if lo <= r.sent_s < hi]
    ttft = [r.ttft_s for r in window if r.ok and r.ttft_s is not None]
    lateness = [r.lateness_s for r in result.records if r.lateness_s is not None]
    wall = max((r.sent_s + (r.e2e_s or 0.0) for r in result.records), default=1.0)
    return {
        "requests": len(window),
        "failed": sum(not r.ok for r in window),
        **_quantiles(ttft),
        "send_lateness_max_s": max(lateness, default=0.0),
        "client_cpu_cores": result.summary.get("client", {}).get("cpu_util"),
        "gateway_cpu_cores": gateway.final.get("cpu_s", float("nan")) / wall if gateway else None,
        "replicas_cpu_cores": replicas.final.get("cpu_s", float("nan")) / wall,
        "replica_step_lag_mean_s": replicas.final.get("step_lag_mean_s"),
        "replica_step_lag_max_s": replicas.final.get("step_lag_max_s"),
        "preemptions": replicas.final.get("preemptions"),
    }


def des_runs(plan: LivePlan, policy: str, rate: float) -> list[dict[str, float]]:
    out = []
    for noise in range(NOISE_SEEDS):
        result = run_scenario(scenario(plan, policy, rate, noise_seed=noise))
        out.append({**_quantiles(result.ttft_s), "lost": float(result.summary.lost)})
    return out


def kept_real_time(live: dict[str, Any]) -> bool:
    """Whether the simulated replicas ran their steps on time (else the run is void)."""
    lag = live.get("replica_step_lag_mean_s")
    return isinstance(lag, int | float) and lag <= REAL_TIME_LAG_S


def compare(policies: Sequence[str], live: dict[str, Any], des: dict[str, Any]) -> dict[str, Any]:
    """Agreement per policy and quantile, and ranking, over the runs that kept real time."""
    void = [p for p in policies if not kept_real_time(live[p])]
    policies = [p for p in policies if p not in void]
    checks = []
    for policy in policies:
        for q in QUANTILES:
            key = f"ttft_p{q}_s"
            band = [d[key] for d in des[policy]]
            lo, hi = min(band) * (1 - MARGIN), max(band) * (1 + MARGIN)
            value = live[policy][key]
            checks.append(
                {
                    "policy": policy,
                    "metric": key,
                    "live": value,
                    "des_min": min(band),
                    "des_max": max(band),
                    "ok": lo <= value <= hi,
                }
            )
    pairs = []
    for i, a in enumerate(policies):
        for b in policies[i + 1 :]:
            da = [d["ttft_p99_s"] for d in des[a]]
            db = [d["ttft_p99_s"] for d in des[b]]
            if max(da) < min(db) or max(db) < min(da):
                des_says = max(da) < min(db)  # a better than b
                live_says = live[a]["ttft_p99_s"] < live[b]["ttft_p99_s"]
                pairs.append(
                    {
                        "better": a if des_says else b,
                        "worse": b if des_says else a,
                        "live_agrees": des_says == live_says,
                    }
                )
    return {
        "agreement": checks,
        "ranking": pairs,
        "void": void,
        "all_within_tolerance": all(c["ok"] for c in checks) and not void,
        "same_ranking": all(p["live_agrees"] for p in pairs),
    }


async def validate(plan: LivePlan) -> dict[str, Any]:
    started = time.perf_counter()
    overrides = _overrides()
    cap = replica_capacity(
        PROFILE,
        overrides=overrides,
        length_divisor=LENGTHS,
        warmup_s=600 / SPEED,
        duration_s=1800 / SPEED,
    )
    rate = round(LOAD * cap.requests_per_s * REPLICAS, 2)
    live: dict[str, Any] = {}
    slots = asyncio.Semaphore(plan.parallel)

    async def one(policy: str) -> None:
        async with slots:
            live[policy] = await live_run(plan, policy, rate)
        print(f"live {policy}: {live[policy]}", file=sys.stderr)

    async with asyncio.TaskGroup() as tg:
        for policy in plan.policies:
            tg.create_task(one(policy))
    live = {p: live[p] for p in plan.policies}
    live_s = time.perf_counter() - started
    des = {policy: des_runs(plan, policy, rate) for policy in plan.policies}
    return {
        "plan": asdict(plan),
        "scaling": {"lengths": LENGTHS, "speed": SPEED, "profile_overrides": overrides},
        "capacity_rps": round(cap.requests_per_s * REPLICAS, 2),
        "load": LOAD,
        "rate_rps": rate,
        "scrape_interval_s": INTERVAL_S,
        "tolerance": {"noise_seeds": NOISE_SEEDS, "margin": MARGIN},
        "late_binding_bound": DEFAULT_BOUND,
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "live": live,
        "des": des,
        **compare(plan.policies, live, des),
        "live_wall_s": round(live_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def _outcome(result: dict[str, Any]) -> dict[str, Any]:
    """One run's verdict in a line, by today's rules: for the history of earlier runs."""
    lags = [v.get("replica_step_lag_mean_s") or 0.0 for v in result["live"].values()]
    verdict = compare(tuple(result["live"]), result["live"], result["des"])
    return {
        "generated": result.get("generated"),
        "void": len(verdict["void"]),
        "within": sum(c["ok"] for c in verdict["agreement"]),
        "checks": len(verdict["agreement"]),
        "pairs_agreeing": sum(p["live_agrees"] for p in verdict["ranking"]),
        "pairs": len(verdict["ranking"]),
        "step_lag_mean_max_s": max(lags, default=0.0),
    }


def _fmt(x: object, scale: float, digits: int) -> str:
    return f"{scale * x:.{digits}f}" if isinstance(x, int | float) else "-"


def render(result: dict[str, Any]) -> str:
    """A markdown section for the experiment report."""
    lines = [
        f"Scaled scenario (lengths / {result['scaling']['lengths']}, clock x "
        f"{result['scaling']['speed']:g}): {REPLICAS} replicas at {result['rate_rps']} req/s = "
        f"{result['load']:.0%} of the scaled cluster's measured capacity "
        f"({result['capacity_rps']} req/s); {result['plan']['warmup_s']:g} s warm-up + "
        f"{result['plan']['window_s']:g} s window per policy, real gateway + simulated replicas "
        f"over HTTP ({result['live_wall_s']} s of live runs). Tolerance: live TTFT quantile "
        f"within the DES band (min-max over {result['tolerance']['noise_seeds']} noise seeds, "
        f"same arrivals) widened by {result['tolerance']['margin']:.0%}.",
        "",
        "| policy | metric | live s | DES band s | within |",
        "|---|---|---|---|---|",
    ]
    for c in result["agreement"]:
        lines.append(
            f"| {c['policy']} | {c['metric']} | {c['live']:.3f} | {c['des_min']:.3f}-"
            f"{c['des_max']:.3f} | {'yes' if c['ok'] else '**no**'} |"
        )
    pairs = result["ranking"]
    agree = sum(p["live_agrees"] for p in pairs)
    lines += [
        "",
        f"Ranking: {agree}/{len(pairs)} pairs that the DES separates are ordered the same live"
        + (": " + ", ".join(f"{p['better']} < {p['worse']}" for p in pairs) if pairs else "")
        + ".",
        f"Requests failed live: {sum(v['failed'] for v in result['live'].values())}."
        + (
            f" Void (replicas behind real time, not compared): {', '.join(result['void'])}."
            if result.get("void")
            else ""
        ),
        "",
        "| policy | client CPU cores | gateway | replicas | step lag, worst mean / max ms |",
        "|---|---|---|---|---|",
    ]
    for policy, v in result["live"].items():
        cells = [
            _fmt(v.get("client_cpu_cores"), 1, 2),
            _fmt(v.get("gateway_cpu_cores"), 1, 2),
            _fmt(v.get("replicas_cpu_cores"), 1, 2),
            _fmt(v.get("replica_step_lag_mean_s"), 1000, 1)
            + " / "
            + _fmt(v.get("replica_step_lag_max_s"), 1000, 0),
        ]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    history = [*result.get("history", []), _outcome(result)]
    if len(history) > 1:
        lines += [
            "",
            "Every run of this plan so far (live timing depends on the machine's load):",
            "",
        ]
        lines += [
            "| run | within tolerance | ranking pairs agreeing | void runs "
            "| worst mean step lag ms |",
            "|---|---|---|---|---|",
        ]
        for h in history:
            lines.append(
                f"| {h['generated']} | {h['within']}/{h['checks']} | "
                f"{h['pairs_agreeing']}/{h['pairs']} | {h.get('void', 0)} "
                f"| {1000 * h['step_lag_mean_max_s']:.1f} |"
            )
    lines += [
        "",
        f"Run with `make bench-routing-live` ({result.get('generated', '?')}); "
        f"`p2c_late_binding` uses the bound `{result.get('late_binding_bound', DEFAULT_BOUND)}`. "
        f"A policy's run counts only if its replicas kept real time (mean step lag at most "
        f"{1000 * REAL_TIME_LAG_S:.0f} ms against steps of ~100 ms).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.experiments.routing.validate_live")
    parser.add_argument("--quick", action="store_true", help="CI version (~20 s)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    out = args.out or (QUICK_OUT if args.quick else HERE)
    result = uvloop.run(validate(plan))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "live.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    # Earlier runs of the same plan stay on record: live timing depends on the machine.
    if previous.get("plan") == json.loads(json.dumps(result["plan"])):
        result["history"] = [*previous.get("history", []), _outcome(previous)]
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))
    return 0 if result["all_within_tolerance"] and result["same_ranking"] else 1


if __name__ == "__main__":
    sys.exit(main())
