"""Paged KV-cache accounting with prefix caching, as vLLM V1's BlockPool does it, in O(1) runs.

Blocks are counted, not materialised. The free queue is an LRU of *runs* (front evicted
first): ``("p", id)`` a run of plain free blocks, ``("r", uid)`` the still-cached leading full
blocks of one request's own (unshared) content, ``("h", hash)`` one cached block of a shared
prefix. Cached blocks sit in the free queue, so they count as free (vLLM's KV usage excludes
idle cached blocks) until an allocation evicts them.

vLLM frees a request's blocks in reverse order, so its last blocks are evicted first; a request
run therefore shrinks from its end, and what is left is still a valid prefix for that request
to re-hit after preemption. Shared prefix blocks are reference counted while in use.

Only a preempted request can re-hit its own run, so a request that is gone (finished, aborted)
frees its own blocks as plain ones; plain blocks freed next to a plain run at the tail join it,
and adjacent plain runs left when a hit takes cached blocks from between them are joined in an
occasional compaction (amortised O(1)). Eviction only counts blocks along the queue, so none of
this changes what any allocation or lookup sees; it keeps the queue as short as the content
worth telling apart (shared prefix blocks, runs of preempted requests, the plain runs between
them) instead of growing towards one entry per free block.

Invariant: ``free == sum(free queue)``; free + blocks held by live requests (shared ones counted
once) == usable blocks; every run in the queue holds at least one block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

_Key = tuple[str, int]
_COMPACT_SLACK = 32  # entries the queue may grow past twice its last compacted length


class BlockPool:
    def __init__(self, usable_blocks: int, block_size: int, caching: bool) -> None:
        self.usable = usable_blocks
        self.block_size = block_size
        self.caching = caching
        self.free = usable_blocks
        self.shared_refs: dict[int, int] = {}  # shared prefix hash -> requests holding it
        self._queue: OrderedDict[_Key, int] = OrderedDict({("p", 0): usable_blocks})
        self._next_run = 0
        self._compact_at = _COMPACT_SLACK

    @property
    def usage(self) -> float:
        """vLLM V1 ``get_usage``: 1 - free / (num_gpu_blocks - 1)."""
        return 1.0 - self.free / self.usable

    def queued(self) -> int:
        return sum(self._queue.values())

    def runs(self) -> int:
        """Entries in the free queue (a memory bound: not a count of blocks)."""
        return len(self._queue)

    def take(self, n: int) -> None:
        """Allocate ``n`` blocks from the front of the LRU free queue, evicting cached content."""
        if n <= 0:
            return
        assert n <= self.free, (n, self.free)
        self.free -= n
        q = self._queue
        while n:
            key, count = next(iter(q.items()))
            if count > n:
                q[key] = count - n
                return
            del q[key]
            n -= count

    def release(self, held: int, shared: Sequence[int], own_cached: int, uid: int) -> None:
        """Free a request's ``held`` blocks: the first ``len(shared)`` are shared prefix blocks,
        the next ``own_cached`` its own full blocks worth keeping cached (0 when the request is
        gone: nothing else can hit them), the rest plain."""
        own = held - len(shared)
        q = self._queue
        if own > own_cached:
            tail = next(reversed(q), None)
            if tail is not None and tail[0] == "p":
                q[tail] += own - own_cached  # keeps its place: plain blocks are interchangeable
            else:
                q[self._plain_key()] = own - own_cached
        if own_cached:
            q[("r", uid)] = own_cached
        freed = own
        refs = self.shared_refs
        for h in reversed(shared):
            left = refs[h] - 1
            if left:
                refs[h] = left
            else:
                del refs[h]
                q[("h", h)] = 1
                freed += 1
        self.free += freed
        if len(q) > self._compact_at:
            self._compact()

    def lookup(
        self, hashes: Sequence[int], max_hit: int, uid: int, own: bool
    ) -> tuple[int, int, int]:
        """Longest cached prefix: (shared hit blocks, own hit blocks, how many are now free).

        ``own`` allows the request's own run to extend the hit once every shared block hit.
        """
        if not self.caching:
            return 0, 0, 0
        n_shared = from_free = 0
        for h in hashes[:max_hit]:
            if h in self.shared_refs:
                n_shared += 1
            elif ("h", h) in self._queue:
                n_shared += 1
                from_free += 1
            else:
                break
        n_own = 0
        if own and n_shared == len(hashes):
            n_own = min(self._queue.get(("r", uid), 0), max_hit - n_shared)
            from_free += n_own
        return n_shared, n_own, from_free

    def commit(self, hashes: Sequence[int], n_shared: int, n_own: int, uid: int) -> list[int]:
        """Take the hits found by ``lookup``; returns the shared hashes now held."""
        if not self.caching:
            return []
        q = self._queue
        held: list[int] = []
        for h in hashes[:n_shared]:
            if h in self.shared_refs:
                self.shared_refs[h] += 1
            else:
                del q[("h", h)]
                self.shared_refs[h] = 1
                self.free -= 1
            held.append(h)
        run = q.pop(("r", uid), 0)
        if run:
            self.free -= n_own
            if run > n_own:  # not needed again: left at the front, evicted first
                key = self._plain_key()
                q[key] = run - n_own
                q.move_to_end(key, last=False)
        return held

    def register(self, hashes: Sequence[int], held: list[int], full_blocks: int) -> bool:
        """Cache a request's newly full shared-prefix blocks (appending to ``held``).

        False when a block was already cached by another request computing it concurrently:
        that copy stays uncached (as in vLLM) and the request's chain stops being shareable.
        """
        full = min(len(hashes), full_blocks)
        while len(held) < full:
            h = hashes[len(held)]
            if h in self.shared_refs or ("h", h) in self._queue:
                return False
            self.shared_refs[h] = 1
            held.append(h)
        return True

    def _compact(self) -> None:
        """Join adjacent plain runs, keeping the order of the queue."""
        merged: OrderedDict[_Key, int] = OrderedDict()
        plain: _Key | None = None  # the last entry, when it is a plain run
        for key, count in self._queue.items():
            if plain is not None and key[0] == "p":
                merged[plain] += count
                continue
            merged[key] = count
            plain = key if key[0] == "p" else None
        self._queue = merged
        self._compact_at = 2 * len(merged) + _COMPACT_SLACK

    def _plain_key(self) -> _Key:
        self._next_run += 1
        return ("p", self._next_run)
