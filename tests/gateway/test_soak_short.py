"""The soak benchmark (``benchmarks/soak/run.py``) in its CI size: 60 s of load at 80% of the
simulated cluster's capacity through a real ``python -m gateway serve`` process, streaming and
non-streaming, client disconnects, one replica restarting twice. The suite's one long test.

It proves: every error is explained (only streams cut by a replica restart), nothing is left
in flight on either side once traffic stops (gateway and replicas agree on zero), the gateway
closed every client connection and opened no file it kept, and its memory did not run away.
The 15-minute run (``make bench-soak``) reports the same figures over time."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.soak.run import SoakConfig, print_table, run_soak

# Over the second half of the run (after the allocator's warm-up): a leak of ~1 KB per request
# at ~39 req/s is 2.3 MB/min. Short runs measure up to +0.6 (warm-up still settling); the
# 15-minute runs measured +0.004 (aiohttp server) and +0.057 MB/min over their second half.
MAX_RSS_SLOPE_MB_PER_MIN = 2.0


@pytest.mark.long
async def test_short_soak_has_no_unexplained_errors_leaks_or_growth(tmp_path: Path) -> None:
    # The 60 s; the suite still fits its 5-minute budget (this test runs on one worker
    # while the other takes the rest).
    cfg = SoakConfig(duration_s=60.0, warmup_s=15.0, restarts=2, seed=1)
    result = await run_soak(cfg, tmp_path)
    print_table(result)
    s = result.summary()
    assert s["errors_unexplained"] == {}, s["errors_unexplained"]
    assert s["outcomes"]["ok"] > 0.9 * s["requests"]
    assert s["outcomes"].get("client_disconnect", 0) > 0  # the disconnect path was exercised
    assert len(result.restarts_at_s) == 2
    assert s["inflight_leaks"] == {}, s["end_inflight"]
    assert result.fds_before is not None and result.fds_after is not None
    assert result.fds_after.clients == 0
    assert result.fds_after.non_sockets == result.fds_before.non_sockets
    assert result.passed()
    assert s["rss_slope_second_half_mb_per_min"] < MAX_RSS_SLOPE_MB_PER_MIN
