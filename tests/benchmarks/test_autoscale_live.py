"""The live autoscaling demonstration, short CI version: real gateway, real /metrics.

A gateway with no replica, a burst of requests, the KEDA model reading the gateway's own
``kvgate_requests_in_flight + kvgate_requests_queued`` from its admin port: replicas start
with a cold start, every request is served, and once the load is gone the replicas are
drained and stopped, down to zero. Short cold start, polling interval and cooldown.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.autoscale.live import LiveSpec, concurrency_from_metrics, demonstrate
from benchmarks.sim.server import ReplicaSettings

MODEL = "llama-3.1-8b-instruct"


def test_concurrency_is_read_per_model_and_missing_is_none() -> None:
    page = "\n".join(
        [
            "# HELP kvgate_requests_in_flight x",
            'kvgate_requests_in_flight{model="m"} 3.0',
            'kvgate_requests_queued{model="m"} 2.0',
            'kvgate_requests_queued{model="other"} 7.0',
            'kvgate_requests_in_flight_total{model="m"} 99.0',
        ]
    )
    assert concurrency_from_metrics(page, "m") == 5.0
    assert concurrency_from_metrics(page, "absent") is None


async def test_scale_from_zero_serve_everything_and_back_to_zero(tmp_path: Path) -> None:
    spec = LiveSpec(
        model=MODEL,
        target=4.0,
        max_replicas=3,
        cold_start_s=0.5,
        scrape_interval_s=0.1,
        polling_interval_s=0.2,
        cooldown_s=1.0,
        sync_period_s=0.2,
        downscale_window_s=1,
        replica=ReplicaSettings.fast(0.01),
    )
    out = await demonstrate(spec, tmp_path, requests=12, max_tokens=60)
    assert out["statuses"] == [200] * 12
    assert out["served_s"] >= spec.cold_start_s  # nothing could be served before a replica
    assert out["max_ready"] >= 2  # 12 concurrent at a target of 4: more than one replica
    history = out["history"]
    assert max(s.concurrency or 0.0 for s in history) >= 4.0  # read from the gateway
    assert max(s.spec_replicas for s in history) >= 2
    assert history[-1].spec_replicas == 0 and history[-1].ready == 0
