"""The routing-quality experiment: run the plan, pool the seeds, write JSON, report and plots.

``python -m benchmarks.experiments.routing`` (``make bench-routing``) regenerates
``report.md``, ``results.json`` and the PNG figures beside this file; ``--quick`` runs a
shortened plan (under a minute) into ``benchmarks/results/routing-quick/`` unless ``--out`` is
given. Runs fan out over ``--jobs`` processes; every run is seeded, so the output depends only
on the plan, never on the process count or the machine (apart from the timing figures).

Pooling: runs of one cell that differ only by seed are pooled request by request for TTFT and
E2E quantiles (each seed is an independent replicate of the same window length); the other
figures are means over seeds, except ``max_waiting`` (the maximum) and ``lost`` (the sum).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from heapq import merge
from pathlib import Path
from statistics import fmean

from benchmarks.des.capacity import replica_capacity
from benchmarks.des.runner import RunResult, run_scenario
from benchmarks.des.summary import cdf_points
from benchmarks.experiments.routing import goals, plots, report, validate_live
from benchmarks.experiments.routing.plan import (
    BOUNDS,
    DEFAULT_BOUND,
    FULL,
    HEADLINE_RATES,
    PROFILE,
    QUICK,
    REPLICAS,
    Job,
    Settings,
    bound_jobs,
    main_jobs,
)
from benchmarks.experiments.routing.schema import (
    Capacity,
    Cell,
    LateBinding,
    Meta,
    Results,
    Series,
    Speed,
)
from benchmarks.load.report import nearest_rank

HERE = Path(__file__).resolve().parent
QUICK_OUT = HERE.parents[1] / "results" / "routing-quick"
CDF_POINTS = 1000


def _run(item: tuple[int, Job]) -> tuple[int, RunResult]:
    index, job = item
    return index, run_scenario(job.scenario)


def execute(jobs: Sequence[Job], processes: int, label: str) -> list[tuple[Job, RunResult]]:
    """Run every job (longest first, so the pool ends together); results in plan order."""
    order = sorted(enumerate(jobs), key=lambda item: -_cost(item[1]))
    started = time.perf_counter()
    if processes <= 1 or len(order) <= 1:
        done = _progress(map(_run, order), len(order), label, started)
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            done = _progress(pool.imap_unordered(_run, order), len(order), label, started)
    by_index = dict(done)
    return [(job, by_index[i]) for i, job in enumerate(jobs)]


def _cost(job: Job) -> float:
    sc = job.scenario
    return sc.rate * (sc.warmup_s + sc.duration_s) * (2.0 if sc.rate > 13.5 else 1.0)


def _progress(
    results: Iterable[tuple[int, RunResult]], total: int, label: str, started: float
) -> list[tuple[int, RunResult]]:
    out = []
    for n, pair in enumerate(results, 1):
        out.append(pair)
        print(
            f"\r{label}: {n}/{total} runs, {time.perf_counter() - started:.0f} s",
            end="" if n < total else "\n",
            file=sys.stderr,
            flush=True,
        )
    return out


def pool_cells(pairs: Sequence[tuple[Job, RunResult]], *, cdf: bool = False) -> list[Cell]:
    """One cell per ``Job.group``, seeds pooled (see the module docstring)."""
    groups: dict[tuple[str, str, float, float], list[tuple[Job, RunResult]]] = {}
    for job, result in pairs:
        groups.setdefault(job.group, []).append((job, result))
    return [_cell(members, cdf=cdf) for members in groups.values()]


def _cell(members: list[tuple[Job, RunResult]], *, cdf: bool) -> Cell:
    job = members[0][0]
    sc = job.scenario
    runs = [r.summary for _, r in members]
    ttft = list(merge(*(r.ttft_s for _, r in members)))
    e2e = list(merge(*(r.e2e_s for _, r in members)))
    reasons: dict[str, int] = {}
    for s in runs:
        for k, v in s.reasons.items():
            reasons[k] = reasons.get(k, 0) + v
    cell = Cell(
        section=job.section,
        row=job.row,
        rate=sc.rate,
        axis=job.axis,
        gateways=sc.gateways,
        scrape_interval_s=sc.gateway.scrape_interval_s,
        seeds=[r.scenario.seed for _, r in members],
        duration_s=sc.duration_s,
        requests=sum(s.requests for s in runs),
        ttft_p50_s=nearest_rank(ttft, 50),
        ttft_p90_s=nearest_rank(ttft, 90),
        ttft_p99_s=nearest_rank(ttft, 99),
        ttft_p99_per_seed_s=[s.ttft_p99_s for s in runs],
        e2e_p99_s=nearest_rank(e2e, 99),
        itl_p50_s=fmean(s.itl_p50_s for s in runs),
        itl_p99_s=fmean(s.itl_p99_s for s in runs),
        output_tokens_per_s=fmean(s.output_tokens_per_s for s in runs),
        max_waiting=max(s.max_waiting for s in runs),
        kv_spread_mean=fmean(s.kv_spread_mean for s in runs),
        kv_mean=fmean(s.kv_mean for s in runs),
        preemptions_per_run=fmean(s.preemptions for s in runs),
        lost=sum(s.lost for s in runs),
        held_per_run=fmean(s.held for s in runs),
        buffer_wait_p99_s=max(s.buffer_wait_p99_s for s in runs),
        reasons=reasons,
        sim_s_per_cpu_s=sum(r.simulated_s for _, r in members) / sum(r.cpu_s for _, r in members),
    )
    if cdf:
        cell["ttft_cdf_s"] = [round(x, 5) for x in cdf_points(ttft, CDF_POINTS)]
    return cell


def _series(pairs: Sequence[tuple[Job, RunResult]], window_s: float) -> dict[str, Series]:
    out: dict[str, Series] = {}
    for job, result in pairs:
        if result.series is None:
            continue
        t0 = job.scenario.warmup_s
        per_replica = [[s for s in rep if s[0] < t0 + window_s] for rep in result.series]
        out[job.row] = Series(
            rate=job.scenario.rate,
            seed=job.scenario.seed,
            t_s=[round(s[0] - t0, 3) for s in per_replica[0]],
            waiting=[[s[1] for s in rep] for rep in per_replica],
            kv_usage=[[round(s[3], 4) for s in rep] for rep in per_replica],
        )
    return out


def choose_bound(cells: Sequence[Cell]) -> str:
    """The bound with the lowest pooled TTFT p99 at the highest headline rate (ties: the lower)."""
    if not cells:
        return DEFAULT_BOUND
    top, low = HEADLINE_RATES[-1], HEADLINE_RATES[0]

    def p99(label: str, rate: float) -> float:
        return next(c["ttft_p99_s"] for c in cells if c["row"] == label and c["rate"] == rate)

    labels = sorted({c["row"] for c in cells})
    return min(labels, key=lambda lb: (p99(lb, top), p99(lb, low)))


def run_experiment(settings: Settings, processes: int) -> Results:
    started = time.perf_counter()
    cap_warm = 120.0 if settings.quick else 600.0
    cap = replica_capacity(PROFILE, warmup_s=cap_warm, duration_s=settings.capacity_s)
    capacity = round(cap.requests_per_s * REPLICAS, 2)
    bound_pairs = execute(bound_jobs(settings), processes, "late-binding bounds")
    bound_cells = pool_cells(bound_pairs)
    chosen = choose_bound(bound_cells)
    pairs = execute(main_jobs(settings, capacity, BOUNDS[chosen]), processes, "experiment")
    headline = [(j, r) for j, r in pairs if j.section == "headline"]
    cells = pool_cells(headline, cdf=True) + pool_cells(
        [(j, r) for j, r in pairs if j.section != "headline"]
    )
    speed = [r for j, r in headline if j.row == "p2c" and j.scenario.rate == HEADLINE_RATES[0]]
    every = [r for _, r in bound_pairs + pairs]
    command = "python -m benchmarks.experiments.routing" + (" --quick" if settings.quick else "")
    results = Results(
        meta=Meta(
            generated=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            command=command,
            python=platform.python_version(),
            processes=processes,
            wall_s=round(time.perf_counter() - started, 1),
            cpu_s=round(sum(r.cpu_s for r in every), 1),
            runs=len(every),
            profile=PROFILE,
            replicas=REPLICAS,
            settings=dataclasses.asdict(settings),
        ),
        capacity=Capacity(
            per_replica_rps=round(cap.requests_per_s, 4),
            cluster_rps=capacity,
            method=f"one replica, closed loop of {cap.concurrency} clients, OpenOrca-like "
            f"lengths, {cap.duration_s:.0f} s after {cap_warm:.0f} s warm-up",
            preemptions=cap.preemptions,
        ),
        late_binding=LateBinding(chosen=chosen, sweep=bound_cells),
        cells=cells,
        series=_series(headline, settings.series_window_s),
        speed=Speed(
            scenario=f"{REPLICAS} replicas, {HEADLINE_RATES[0]:g} req/s, p2c, 1 gateway",
            sim_s_per_cpu_s=round(
                sum(r.simulated_s for r in speed) / sum(r.cpu_s for r in speed), 1
            ),
            sim_s_per_wall_s=round(
                sum(r.simulated_s for r in speed) / sum(r.wall_s for r in speed), 1
            ),
        ),
        goals=goals.evaluate(cells),
    )
    return results


def write_outputs(results: Results, out: Path) -> None:
    """results.json, the figures and report.md (with the live validation, if ``live.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    live = out / "live.json"
    if live.exists():
        results["live"] = validate_live.render(json.loads(live.read_text()))
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plots.write_all(results, out)
    (out / "report.md").write_text(report.render(results))
    print(report.headline_table(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.experiments.routing")
    parser.add_argument("--quick", action="store_true", help="short plan for CI (< 1 minute)")
    parser.add_argument("--jobs", type=int, default=min(2, multiprocessing.cpu_count()))
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    parser.add_argument(
        "--render-only", action="store_true", help="redraw report and figures from results.json"
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    out = args.out or (QUICK_OUT if args.quick else HERE)
    if args.render_only:
        results: Results = json.loads((out / "results.json").read_text())
    else:
        results = run_experiment(settings, max(1, args.jobs))
    write_outputs(results, out)
    print(f"wrote {out}/report.md, results.json and figures", file=sys.stderr)
    return 0
