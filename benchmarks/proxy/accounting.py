"""Process accounting for the proxy benchmark: CPU from ``/proc/<pid>/stat`` (utime + stime,
all threads) and RSS from ``/proc/<pid>/statm``, over a process and its descendants.

A ``Window`` is one measurement interval: wall time and the CPU each watched process (and the
caller itself, as ``loadgen``) spent in it. CPU counters tick at ``SC_CLK_TCK`` (100 Hz), so
windows are kept at seconds, not milliseconds: 10 ms of resolution over >= 1 s of CPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CpuSnapshot = Mapping[str, tuple[float, float]]  # name -> (user, system) CPU seconds


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (nginx: master and workers), from /proc/<pid>/task/*/children."""
    out = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
            for child in f.read().split():
                out.extend(process_tree(int(child)))
    return out


def cpu_times(pids: Sequence[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pids`` (all threads), from /proc/<pid>/stat."""
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        user += int(fields[11])  # utime and stime: fields 14 and 15 of stat
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of ``pids`` (all threads)."""
    return sum(cpu_times(pids))


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/statm", "rb") as f:
            total += int(f.read().split()[1]) * PAGE_SIZE
    return total


@dataclass
class Watched:
    """Processes whose CPU (and RSS) a run reports, by name (``proxy``, ``upstream``)."""

    pids: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def parse(cls, items: Sequence[str]) -> Watched:
        watched = cls()
        for item in items:
            name, _, pid = item.partition("=")
            watched.pids[name] = process_tree(int(pid))
        return watched

    def cpu(self) -> dict[str, tuple[float, float]]:
        """(user, system) seconds per watched name, and the caller's own as ``loadgen``."""
        out = {name: cpu_times(pids) for name, pids in self.pids.items()}
        own = os.times()
        out["loadgen"] = (own.user, own.system)
        return out

    def rss(self) -> dict[str, int]:
        return {name: rss_bytes(pids) for name, pids in self.pids.items()}


def cpu_usage(before: CpuSnapshot, after: CpuSnapshot, wall_s: float) -> dict[str, object]:
    """The report of a window ``wall_s`` long between two (user, system) snapshots per name:
    CPU seconds, the kernel's part of them (syscalls, loopback TCP), and cores used."""
    cpu_s = {k: sum(after[k]) - sum(before[k]) for k in after}
    return {
        "window_s": wall_s,
        "cpu_s": cpu_s,
        "cpu_sys_s": {k: after[k][1] - before[k][1] for k in after},
        "cpu_util": {k: v / wall_s for k, v in cpu_s.items()},
    }


class Window:
    """The measurement window: wall time and CPU deltas of the watched processes."""

    def __init__(self, watched: Watched) -> None:
        self._watched = watched
        self.start = self.end = 0.0
        self._cpu0: dict[str, tuple[float, float]] = {}
        self._cpu1: dict[str, tuple[float, float]] = {}

    def open(self) -> None:
        self._cpu0 = self._watched.cpu()
        self.start = time.perf_counter()

    def close(self) -> None:
        self.end = time.perf_counter()
        self._cpu1 = self._watched.cpu()

    def contains(self, t: float) -> bool:
        return self.start <= t and (self.end == 0.0 or t < self.end)

    def report(self) -> dict[str, object]:
        return cpu_usage(self._cpu0, self._cpu1, self.end - self.start)
