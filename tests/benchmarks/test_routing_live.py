"""The simulator against the live stack, short CI version (``validate_live.QUICK_PLAN``).

Real gateway and simulated replicas in their own processes, the open-loop client here, the
same scaled scenario in the DES: p2c's median and p90 TTFT must fall inside the DES's noise
band widened by the stated margin. (The full validation, five policies and the ranking, is
``make bench-routing-live``; its result is in the experiment report.)
"""

from __future__ import annotations

import pytest

from benchmarks.experiments.routing import validate_live


@pytest.mark.long
async def test_p2c_live_matches_the_des() -> None:
    result = await validate_live.validate(validate_live.QUICK_PLAN)
    live = result["live"]["p2c"]
    assert live["failed"] == 0 and live["requests"] > 200
    assert live["send_lateness_max_s"] < 0.5  # the client kept its schedule
    lag = live["replica_step_lag_mean_s"]
    assert validate_live.kept_real_time(live), f"replicas fell behind real time ({lag} s/step)"
    checks = {c["metric"]: c for c in result["agreement"] if c["policy"] == "p2c"}
    for metric in ("ttft_p50_s", "ttft_p90_s"):
        c = checks[metric]
        assert c["ok"], (
            f"{metric}: live {c['live']:.3f} s, DES {c['des_min']:.3f}-{c['des_max']:.3f} s"
        )
    assert "| p2c | ttft_p50_s |" in validate_live.render(result)
