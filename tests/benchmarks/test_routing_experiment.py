"""The routing experiment's --quick plan end to end: outputs, structure and a robust ranking.

Thresholds here are structural or wide on purpose: the committed report (full plan) carries
the real figures; this checks that the pipeline produces them and that the ordering the whole
experiment is about (round robin's tail far above p2c's near the knee) holds on fixed seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.experiments.routing import run
from benchmarks.experiments.routing.plan import HEADLINE_RATES, MAIN_ROWS, QUICK
from benchmarks.experiments.routing.schema import Cell, Results

FIGURES = (
    "ttft_p99_vs_load.png",
    "ttft_cdf.png",
    "replica_timeseries.png",
    "ttft_p99_vs_scrape.png",
    "gateways.png",
)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Results]:
    out = tmp_path_factory.mktemp("routing")
    results = run.run_experiment(QUICK, processes=2)
    run.write_outputs(results, out)
    return out, results


def _cell(results: Results, row: str, rate: float) -> Cell:
    return next(
        c
        for c in results["cells"]
        if c["section"] == "headline" and c["row"] == row and c["rate"] == rate
    )


@pytest.mark.long
def test_outputs_are_written_and_consistent(quick: tuple[Path, Results]) -> None:
    out, results = quick
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    report = (out / "report.md").read_text()
    assert "quick mode" in report
    for row in MAIN_ROWS:
        assert f"| {row} |" in report
    for name in FIGURES:
        assert f"({name})" in report
    # the report re-renders from the JSON alone
    assert run.main(["--quick", "--out", str(out), "--render-only"]) == 0
    assert (out / "report.md").read_text() == report


def test_structure_capacity_and_no_loss(quick: tuple[Path, Results]) -> None:
    _, results = quick
    assert 8.0 < results["capacity"]["cluster_rps"] < 20.0
    cells = results["cells"]
    assert {c["section"] for c in cells} == {"headline", "load", "scrape", "gateways", "prefix"}
    assert all(c["lost"] == 0 for c in cells)
    for rate in HEADLINE_RATES:
        for row in MAIN_ROWS:
            c = _cell(results, row, rate)
            assert c["requests"] > 1000
            assert c["ttft_p50_s"] <= c["ttft_p90_s"] <= c["ttft_p99_s"]
            assert len(c.get("ttft_cdf_s", [])) == run.CDF_POINTS + 1
    assert {g["rate"] for g in results["goals"]} == set(HEADLINE_RATES)
    assert results["late_binding"]["chosen"]
    assert results["speed"]["sim_s_per_cpu_s"] > 10


def test_round_robin_tail_is_far_above_p2c(quick: tuple[Path, Results]) -> None:
    _, results = quick
    for rate, factor in ((12.0, 1.0), (13.0, 2.0)):
        rr = _cell(results, "round_robin", rate)
        p2c = _cell(results, "p2c", rate)
        assert rr["ttft_p99_s"] > factor * p2c["ttft_p99_s"], rate
        assert rr["max_waiting"] >= p2c["max_waiting"], rate
        assert rr["kv_spread_mean"] > p2c["kv_spread_mean"], rate
