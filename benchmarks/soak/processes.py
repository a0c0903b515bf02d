"""The processes a soak runs, each as a real subprocess: simulated replicas (``python -m
benchmarks.sim``) and the gateway (``python -m gateway serve``), plus sampling of a process's
resident memory and open file descriptors from /proc.

Each process is started with its file-descriptor soft limit raised to the hard limit (a long
soak and 10,000 streams need more than a default 1024), its stderr kept in a log file, and is
stopped by its owner (``stop``: SIGTERM, then SIGKILL after a grace period) — never by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from benchmarks.sim.server import FAST_STEP_OVERRIDES

ROOT = Path(__file__).resolve().parents[2]


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit, in this process (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Proc:
    name: str
    proc: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self, grace_s: float = 30.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(grace_s):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        code = self.proc.returncode
        assert code is not None
        return code


async def _spawn(name: str, args: Sequence[str], log_dir: Path, stdout: int) -> Proc:
    """``log_dir`` must exist."""
    log_path = log_dir / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("KVGATE_CONFIG", None)
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, stdin=asyncio.subprocess.DEVNULL, stdout=stdout,
            stderr=log, env=env, cwd=ROOT,
        )  # fmt: skip
    return Proc(name, proc, log_path)


async def start_replicas(
    n: int,
    *,
    step_s: float,
    max_num_seqs: int,
    log_dir: Path,
    num_gpu_blocks: int | None = None,
    seed: int = 0,
    extra: dict[str, object] | None = None,
) -> tuple[Proc, list[str]]:
    """``n`` simulated replicas in one process, ready at once; returns it and their URLs.
    ``extra``: more profile overrides."""
    # Flat steps (as ReplicaSettings.fast): the step is the weights floor alone, so capacity is
    # exact: max_num_seqs / ((tokens + 1) * step_s).
    overrides = {**FAST_STEP_OVERRIDES, "weights_floor_s": step_s, "max_num_seqs": max_num_seqs}
    overrides.update(extra or {})
    if num_gpu_blocks is not None:
        overrides["num_gpu_blocks"] = num_gpu_blocks
    args = ["-m", "benchmarks.sim", "--replicas", str(n), "--port", "0", "--load-time-s", "0",
            "--seed", str(seed), "--log-level", "WARNING"]  # fmt: skip
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    proc = await _spawn("replicas", args, log_dir, asyncio.subprocess.PIPE)
    assert proc.proc.stdout is not None
    urls: list[str] = []
    async with asyncio.timeout(30):
        while len(urls) < n:
            line = await proc.proc.stdout.readline()
            if not line:
                raise RuntimeError("the replicas exited:\n" + proc.log_text()[-2000:])
            urls.append(line.decode().strip())
    return proc, urls


@dataclass
class GatewayProc(Proc):
    api: str = ""
    admin: str = ""


async def start_gateway(
    urls: list[str],
    *,
    log_dir: Path,
    port: int | None = None,
    wait_ready: bool = True,
    **sections: object,
) -> GatewayProc:
    """``python -m gateway serve`` on 127.0.0.1 (``port`` or a free one); returns once it
    listens and, with ``wait_ready``, every replica is ready."""
    doc: dict[str, object] = {
        "listen": {"host": "127.0.0.1", "port": port or free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "replicas": {"urls": urls},
        "logging": {"level": "INFO", "access_log": False},
    }
    doc.update(sections)
    config = log_dir / "gateway.yaml"
    config.write_text(yaml.safe_dump(doc))
    base = await _spawn("gateway", ["-m", "gateway", "serve", "--config", str(config)], log_dir,
                        asyncio.subprocess.DEVNULL)  # fmt: skip
    gw = GatewayProc(base.name, base.proc, base.log_path)
    pattern = re.compile(r"on port (\d+), admin on port (\d+)")
    async with asyncio.timeout(30):
        while (m := pattern.search(gw.log_text())) is None:
            if gw.proc.returncode is not None:
                raise RuntimeError("the gateway exited:\n" + gw.log_text()[-3000:])
            await asyncio.sleep(0.05)
        gw.api, gw.admin = (f"http://127.0.0.1:{p}" for p in m.groups())
        if not wait_ready:
            return gw
        async with aiohttp.ClientSession() as http:
            # Another process's state: polled.
            while len(await ready_replicas(http, gw.admin)) < len(urls):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    return gw


async def debug_replicas(http: aiohttp.ClientSession, admin: str) -> list[dict[str, Any]]:
    async with http.get(admin + "/debug/replicas") as resp:
        resp.raise_for_status()
        replicas: list[dict[str, Any]] = (await resp.json())["replicas"]
        return replicas


async def ready_replicas(http: aiohttp.ClientSession, admin: str) -> list[str]:
    return [r["id"] for r in await debug_replicas(http, admin) if r["phase"] == "ready"]


@dataclass(frozen=True)
class ProcSample:
    t_s: float
    rss_bytes: int
    fds: int


def sample_process(pid: int, t_s: float) -> ProcSample:
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
                break
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return ProcSample(t_s, rss, fds)


@dataclass(frozen=True)
class FdCensus:
    """A process's open descriptors by kind: TCP connections accepted on ``listen_port``
    (clients), other TCP sockets (listeners, replicas), and everything else (files, pipes,
    epoll, eventfd) — which must stay constant."""

    clients: int
    other_sockets: int
    non_sockets: int


def fd_census(pid: int, listen_port: int) -> FdCensus:
    inodes: list[str] = []
    non_sockets = 0
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except FileNotFoundError:  # closed while listing
            continue
        if target.startswith("socket:["):
            inodes.append(target[8:-1])
        else:
            non_sockets += 1
    accepted: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                local_port = int(cols[1].rsplit(":", 1)[1], 16)
                if local_port == listen_port and cols[3] != "0A":  # 0A = LISTEN
                    accepted.add(cols[9])
    clients = sum(1 for i in inodes if i in accepted)
    return FdCensus(clients, len(inodes) - clients, non_sockets)


def slope_per_min(samples: Sequence[ProcSample], attr: str) -> float:
    """Least-squares slope of ``attr`` against time, per minute (0 with < 2 samples)."""
    if len(samples) < 2:
        return 0.0
    xs = [s.t_s for s in samples]
    ys = [float(getattr(s, attr)) for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return 60.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


async def stop_all(*procs: Proc | None) -> None:
    for p in procs:
        if p is not None:
            with contextlib.suppress(ProcessLookupError):
                await p.stop()
