"""Which replica probably holds which prompt prefix: a bounded LRU of block hashes per replica.

The gateway cannot see an engine's prefix cache, so it remembers what it sent where: every
dispatched request's chained prefix-block hashes (``policies.hashing``) are recorded for the
replica that got it. The index is an approximation of each engine's cache — same granularity,
same eviction order, bounded size — not a copy of it.

Invariants:

* Per replica at most ``capacity_blocks`` hashes; the least recently used are evicted first.
  ``insert`` touches a request's blocks from the deepest to the first, so the *first* blocks of
  a prompt are the most recently used and a chain is evicted from its tail, as an engine's
  prefix cache evicts leaves before their parents.
* ``_holders`` (hash → replicas) is the exact reverse of ``_lru``; both change together.
* Lookups (``match_lengths``) never change recency: only ``insert`` (from ``observe``) learns.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from policies.types import ReplicaId


class PrefixIndex:
    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._lru: dict[ReplicaId, OrderedDict[int, None]] = {}
        self._holders: dict[int, set[ReplicaId]] = {}

    def insert(self, replica: ReplicaId, hashes: tuple[int, ...]) -> None:
        """Record that ``replica`` now caches the prefix described by ``hashes``."""
        if not hashes:
            return
        lru = self._lru.get(replica)
        if lru is None:
            lru = self._lru[replica] = OrderedDict()
        # Only the first capacity_blocks can be held at once; deeper blocks would evict them.
        for h in reversed(hashes[: self.capacity_blocks]):
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                self._holders.setdefault(h, set()).add(replica)
        while len(lru) > self.capacity_blocks:
            old, _ = lru.popitem(last=False)
            self._forget(old, replica)

    def match_lengths(self, hashes: tuple[int, ...]) -> dict[ReplicaId, int]:
        """For each replica holding at least the first block, how many leading blocks it holds."""
        lengths: dict[ReplicaId, int] = {}
        for i, h in enumerate(hashes):
            holders = self._holders.get(h)
            if not holders:
                break
            extended = False
            for replica in holders:
                if lengths.get(replica, 0) == i:
                    lengths[replica] = i + 1
                    extended = True
            if not extended:
                break
        return lengths

    def retain(self, replicas: Iterable[ReplicaId]) -> None:
        """Forget every replica not in ``replicas`` (membership changed)."""
        keep = set(replicas)
        for replica in [r for r in self._lru if r not in keep]:
            self.remove(replica)

    def remove(self, replica: ReplicaId) -> None:
        lru = self._lru.pop(replica, None)
        if lru is None:
            return
        for h in lru:
            self._forget(h, replica)

    def size(self, replica: ReplicaId) -> int:
        lru = self._lru.get(replica)
        return 0 if lru is None else len(lru)

    def replicas(self) -> frozenset[ReplicaId]:
        return frozenset(self._lru)

    def _forget(self, h: int, replica: ReplicaId) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.discard(replica)
            if not holders:
                del self._holders[h]
