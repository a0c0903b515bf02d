"""The autoscaling experiment: plan, run (in parallel), pick targets, write results and report.

Stages (README.md has the question and the method):

1. **Sweep.** Each signal, a few targets, on the step, ramp and bursts scenarios with the
   recommended HPA behavior (config/autoscaling). Per signal the target kept is the one with
   the most requests served under 1 s TTFT per GPU-hour, pooled over the three scenarios, among
   targets whose mean 1 s attainment is at least ``ATTAIN_FLOOR`` (so a cheap target that
   simply fails the SLO cannot win); if none qualifies, the target with the best attainment.
   The sweep's runs of the chosen targets are the grid's main rows.
2. **Grid.** The chosen targets with the default HPA behavior (step, ramp); from zero, HPA
   (minReplicas 1) on every signal and KEDA (min 0) on concurrency
   with kvgate's buffer against a plain Service scaled by KEDA on the request rate (what it
   loses); a cold node (240 s cold start) with the buffer's default and a raised ``max_wait_s``;
   and kvgate with a saturation bound.

Usage: ``python -m benchmarks.experiments.autoscale [--quick] [--jobs N] [--out DIR]``.
``--render-only`` redraws the report from an existing ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.autoscale.signals import SIGNALS, Signal
from benchmarks.experiments.autoscale.report import pooled, write_report
from benchmarks.experiments.autoscale.sim import RunSpec, simulate

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SWEEP: dict[Signal, tuple[float, ...]] = {
    "concurrency": (8.0, 16.0, 24.0, 32.0),
    "kv": (0.4, 0.5, 0.7),
    "waiting": (1.0, 16.0),
    "gpu_util": (60.0, 75.0, 90.0),
    "rate": (0.75, 1.0, 1.5),
}
QUICK_SWEEP: dict[Signal, tuple[float, ...]] = {"concurrency": (16.0, 24.0), "kv": (0.7,)}
ATTAIN_FLOOR = 0.90
COLD_NODE_S = 240.0

Result = dict[str, object]


def _run(spec: RunSpec) -> Result:
    return simulate(spec)


def run_all(specs: Sequence[RunSpec], jobs: int) -> list[Result]:
    if jobs <= 1:
        return [_run(s) for s in specs]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_run, specs, chunksize=1)


SWEEP_SCENARIOS = ("step", "ramp", "bursts")


def sweep_specs(quick: bool) -> list[RunSpec]:
    """Every signal x target on the three main scenarios (HPA, recommended behavior)."""
    if quick:
        return [
            RunSpec("step", sig, target, duration_s=900.0)
            for sig, targets in QUICK_SWEEP.items()
            for target in targets
        ]
    return [
        RunSpec(sc, sig, target)
        for sc in SWEEP_SCENARIOS
        for sig, targets in SWEEP.items()
        for target in targets
    ]


def choose_targets(sweep: Sequence[Result]) -> dict[str, float]:
    table = pooled(sweep)
    chosen: dict[str, float] = {}
    for sig in dict.fromkeys(k[0] for k in table):
        rows = {t: v for (s, t), v in table.items() if s == sig}
        ok = {t: v for t, v in rows.items() if v["attainment"] >= ATTAIN_FLOOR}
        if ok:
            chosen[sig] = max(ok, key=lambda t: ok[t]["good_per_gpu_hour"])
        else:
            chosen[sig] = max(rows, key=lambda t: rows[t]["attainment"])
    return chosen


def grid_specs(chosen: dict[str, float], quick: bool) -> list[RunSpec]:
    """Runs beyond the sweep (whose chosen-target runs join the grid as they are)."""
    sigs = [s for s in SIGNALS if s in chosen]
    conc = chosen.get("concurrency", 16.0)
    rate = chosen.get("rate", 1.5)
    if quick:
        return [
            RunSpec("from_zero", "concurrency", conc, controller="keda", duration_s=900.0),
            RunSpec("from_zero", "rate", rate, controller="keda", buffered=False, duration_s=900.0),
        ]
    specs = [
        RunSpec(sc, s, chosen[s], controller="hpa-default") for sc in ("step", "ramp") for s in sigs
    ]
    specs += [RunSpec("from_zero", s, chosen[s]) for s in sigs]  # HPA: minReplicas 1
    keda = RunSpec("from_zero", "concurrency", conc, controller="keda")
    service = RunSpec("from_zero", "rate", rate, controller="keda", buffered=False)
    specs += [keda, service, replace(keda, signal="rate", target=rate)]
    cold = replace(keda, cold_start_s=COLD_NODE_S)
    specs += [
        cold,
        replace(cold, max_wait_s=300.0),
        replace(cold, max_wait_s=300.0, max_queued=5000),
        replace(service, cold_start_s=COLD_NODE_S),
        RunSpec("step", "concurrency", conc, max_inflight=32),
        replace(keda, max_inflight=32),
    ]
    return specs


def chosen_runs(sweep: Sequence[Result], chosen: dict[str, float]) -> list[Result]:
    return [
        r
        for r in sweep
        if chosen.get(str(r["spec"]["signal"])) == float(r["spec"]["target"])  # type: ignore[index]
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.autoscale")
    p.add_argument("--quick", action="store_true", help="a shortened plan (well under a minute)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out: Path = args.out or (Path("benchmarks/results/autoscale-quick") if args.quick else HERE)
    out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        write_report(json.loads((out / "results.json").read_text()), out)
        return 0
    started = time.perf_counter()
    sweep = run_all(sweep_specs(args.quick), args.jobs)
    chosen = choose_targets(sweep)
    logger.info("targets chosen by the sweep: %s", chosen)
    grid = chosen_runs(sweep, chosen) + run_all(grid_specs(chosen, args.quick), args.jobs)
    data: dict[str, object] = {
        "quick": args.quick,
        "wall_s": time.perf_counter() - started,
        "attain_floor": ATTAIN_FLOOR,
        "chosen_targets": chosen,
        "sweep": [_summary(r) for r in sweep],
        "grid": grid,
    }
    data = _clean(data)
    (out / "results.json").write_text(json.dumps(data, allow_nan=False, separators=(",", ":")))
    write_report(data, out)
    logger.info("wrote %s (%.0f s)", out, data["wall_s"])
    return 0


def _summary(r: Result) -> Result:
    """A sweep run without its time series (only the grid's runs are plotted)."""
    return {k: v for k, v in r.items() if k not in ("series", "ttft_series")}


def _clean(o: Any) -> Any:
    """Strict JSON: tuples as lists, NaN and infinities (no sample, never served) as null."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_clean(v) for v in o]
    return o
