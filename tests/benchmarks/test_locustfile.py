"""The locustfile, run headless by the real ``locust`` command against the replica simulator."""

from __future__ import annotations

import asyncio
import csv
import importlib.util
import sys
from pathlib import Path

import pytest

from benchmarks.sim.server import ReplicaSettings, SimReplica

LOCUSTFILE = Path(__file__).resolve().parents[2] / "benchmarks" / "load" / "locustfile.py"
USERS, USER_RATE, RUN_S = 4, 2.0, 3


# Never import locust here: importing it monkey-patches the process with gevent, which would
# break this test's event loop. The locustfile runs in its own ``locust`` process.
@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="needs the bench extra")
async def test_locust_streams_and_reports_ttft(tmp_path: Path) -> None:
    async with SimReplica(ReplicaSettings.fast(step_s=0.004)) as replica:
        await replica.wait_ready()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "-u", str(USERS), "-r", str(USERS), "-t", f"{RUN_S}s", "--host", replica.url,
            "--csv", str(tmp_path / "run"), "--only-summary", "--exit-code-on-error", "1",
            "--user-rate", str(USER_RATE), "--workload", "fixed",
            "--workload-params", "input_len=64,output_len=16",
            stdin=asyncio.subprocess.DEVNULL,  # locust polls a terminal stdin for key commands
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=RUN_S + 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        seen = replica.requests_seen
    assert proc.returncode == 0, out.decode()[-3000:]
    with (tmp_path / "run_stats.csv").open() as fh:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(fh)}
    post = rows[("POST", "/v1/chat/completions")]
    ttft = rows[("TTFT", "/v1/chat/completions")]
    n = int(post["Request Count"])
    # constant_throughput caps each user at USER_RATE requests per second (plus the first one);
    # a loaded machine can only make fewer, so only the cap is asserted, and that all worked.
    assert USERS <= n <= min(seen, USERS * (USER_RATE * RUN_S + 1))
    assert int(post["Failure Count"]) == 0
    assert int(ttft["Request Count"]) == n and int(ttft["Failure Count"]) == 0
    assert 0 < float(ttft["Average Response Time"]) < float(post["Average Response Time"])
    assert float(post["Average Content Size"]) == 16.0  # response length = output tokens
    assert ("TPOT", "/v1/chat/completions") in rows
