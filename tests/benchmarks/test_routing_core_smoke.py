"""Smoke test of benchmarks/routing_core.py: every measurement runs and yields sane figures.

No timing goal is asserted here (those are the benchmark's business, on a quiet machine): only
that each part runs, measures something positive and finite, and compares like with like.
The module's ``--quick`` run takes ~10-20 s on a loaded 2-core machine, so the default suite
drives its measuring functions with tiny workloads; the full CLI run, JSON file included, is
``test_cli_writes_every_result`` (``-m slow``).
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from benchmarks import routing_core
from gateway.engine_metrics import names_for, parse_engine_metrics
from policies.registry import SIMULATION_POLICY_NAMES

SCRAPER_KEYS = {
    "replicas",
    "interval_s",
    "wall_s",
    "rounds",
    "rounds_expected",
    "cpu_s",
    "core_fraction",
    "cpu_us_per_scrape",
    "cpu_per_replica_per_s",
    "errors",
    "page_bytes",
}
PARSE_KEYS = {"bytes", "kvgate_us", "kvgate_with_detection_us", "prometheus_client_us", "speedup"}


def positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_decision_time_of_every_policy_is_measured() -> None:
    rng = random.Random(0)
    requests = routing_core._requests(50, rng)
    view = routing_core._view(8, rng)
    for name in SIMULATION_POLICY_NAMES:
        assert positive(routing_core._time_choose(name, view, requests, 2)), name
    assert positive(routing_core._time_pool_path(8, requests, 2))


def test_both_parsers_read_the_same_signals_from_the_realistic_page() -> None:
    page = routing_core.realistic_page()
    assert 20_000 < len(page.encode()) < 100_000  # "a realistic vLLM page: tens of KB"
    ours = parse_engine_metrics(page, names=names_for("vllm-v1"))
    # The benchmark's comparison is fair only if prometheus_client finds the same three values.
    theirs = routing_core._prometheus_client_parse(page)
    assert (ours.queue_depth, ours.running, ours.kv_usage) == (12, 37, 0.6342)
    assert theirs == (12, 37, 0.6342)
    names = names_for("vllm-v1")
    assert positive(
        routing_core._per_call_us(partial(parse_engine_metrics, page, names=names), 0.01)
    )


def test_scraper_cpu_is_measured_against_stub_replicas_in_another_process() -> None:
    (result,) = routing_core.bench_scraper(replicas=2, intervals=[0.1], duration_s=0.3)
    assert set(result) == SCRAPER_KEYS
    assert result["replicas"] == 2 and result["interval_s"] == 0.1
    assert result["errors"] == 0 and result["rounds"] >= 1
    for key in ("wall_s", "cpu_s", "core_fraction", "cpu_us_per_scrape", "page_bytes"):
        assert positive(result[key]), (key, result)
    # The scraper task was cancelled when the run ended, not left to scrape on.
    assert result["rounds"] <= result["rounds_expected"] + 2


@pytest.mark.slow
def test_cli_writes_every_result(tmp_path: Path) -> None:
    out = tmp_path / "routing-core.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.routing_core", "--quick", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Decision time per request" in proc.stdout and "Scraper:" in proc.stdout
    results = json.loads(out.read_text())
    assert set(results) == {"machine", "decision_us", "parse", "scraper"}
    sizes = {str(n) for n in routing_core.SIZES}
    assert set(SIMULATION_POLICY_NAMES) <= set(results["decision_us"])
    for row in results["decision_us"].values():
        assert set(row) == sizes and all(positive(v) for v in row.values())
    assert len(results["parse"]) == 2
    for row in results["parse"].values():
        assert set(row) == PARSE_KEYS and all(positive(v) for v in row.values())
    for row in results["scraper"]:
        assert set(row) == SCRAPER_KEYS and positive(row["cpu_s"])
