"""A MembershipSink that records every snapshot and lets tests await a condition on it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from gateway.discovery import DiscoveredReplica

Snapshot = tuple[DiscoveredReplica, ...]


class RecordingSink:
    def __init__(self) -> None:
        self.snapshots: list[tuple[str, Snapshot]] = []
        self._changed = asyncio.Event()

    def set_members(self, source: str, members: Sequence[DiscoveredReplica]) -> None:
        self.snapshots.append((source, tuple(members)))
        self._changed.set()

    @property
    def latest(self) -> Snapshot | None:
        return self.snapshots[-1][1] if self.snapshots else None

    async def wait_for(
        self, predicate: Callable[[Snapshot], bool], limit_s: float = 2.0
    ) -> Snapshot:
        """The first snapshot (already recorded or future) that satisfies ``predicate``."""
        async with asyncio.timeout(limit_s):
            while True:
                if self.latest is not None and predicate(self.latest):
                    return self.latest
                self._changed.clear()
                await self._changed.wait()

    async def wait_count(self, count: int, limit_s: float = 2.0) -> Snapshot:
        async with asyncio.timeout(limit_s):
            while len(self.snapshots) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.snapshots[count - 1][1]


def names(snapshot: Snapshot | None) -> set[str]:
    return {r.name for r in snapshot or ()}


def states(snapshot: Snapshot | None) -> dict[str, str]:
    """name -> "ready" | "starting" | "terminating", the mapping the pool applies."""
    out = {}
    for r in snapshot or ():
        out[r.name] = "terminating" if r.terminating else "ready" if r.ready else "starting"
    return out


async def eventually(condition: Callable[[], bool], limit_s: float = 2.0) -> None:
    """Bounded wait for state that has no event of its own (error counters)."""
    async with asyncio.timeout(limit_s):
        while not condition():  # noqa: ASYNC110 - counters have no event to wait on
            await asyncio.sleep(0.005)
