"""A step-level model of one vLLM V1 engine: continuous batching, paged KV, preemption.

Pure and clock-driven: no asyncio, no clock reads; the caller passes ``now``. The same object
runs behind the real-time HTTP server and inside the virtual-time driver. One step is
``schedule(now)`` (builds the batch, allocates KV, returns a ``Step`` with its duration) then
``complete(step, now)`` at ``now = start + duration`` (samples tokens, frees finished requests).

Scheduling follows ``vllm/v1/core/sched/scheduler.py`` (sim-fidelity §3.2):
running requests first in admission order under one token budget (1 token per decode, a chunk
per unfinished prefill); on KV allocation failure the *newest* running request is preempted
(recompute: its KV is freed, ``num_computed_tokens = 0``, pushed to the *front* of waiting) and
no waiting request is admitted in that step; then waiting requests FCFS while budget and
``max_num_seqs`` allow, reserving KV only for the scheduled chunk (optimistic admission) and
stopping at the first that does not fit (head-of-line; without chunked prefill a prompt longer
than the remaining budget is set aside for the next step instead, as V1 does). KV blocks hold
``block_size`` tokens; a decode needs a new block every ``block_size`` tokens.

Prefix caching of whole blocks: a block's content is cached when it is full; freed blocks stay
cached in an LRU free queue (so they count as *free* in KV usage) until allocation evicts them.
Shared prefixes come from ``SimRequest.block_hashes``; a request's own blocks can be re-hit by
itself after preemption, which makes recompute cheaper than a cold prefill, as in vLLM.

Speed (why the code looks the way it does): a plain decode step must be O(1), not O(running).
Decoding requests are not touched per step: each stores ``(t0, c0, g0)`` = (tick, computed
tokens, generated tokens) when it started decoding, and every completed step advances the
global ``_tick``; its progress is derived. Aggregates (count, sum of context) give the step
time. Per-request events - the step at which a decode needs its next KV block and the step at
which it finishes - sit in dicts keyed by tick, invalidated lazily by a generation number. A
step that cannot give every decode its token (budget exhausted, KV exhausted -> preemption)
takes an exact O(running) path instead; it is rare.

Token events: with ``every_token=True`` (the HTTP server) ``complete`` returns one event per
request that got a token - O(running), inherent. With ``every_token=False`` (virtual time) it
returns only first-token and finish events; the generated count of the others is implied, and
per-token ITL is available as ``(step.itl_s, step.decode_tokens)``. ITL is the time since the
previous step completed; a decode left out of a step for budget (rare) is not charged the gap.

Invariant (``check_invariants``): free blocks + blocks held by live requests (shared prefix
blocks counted once) == num_gpu_blocks - 1, and free >= 0: KV never exceeds capacity.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

from benchmarks.sim.kv_cache import BlockPool
from benchmarks.sim.profiles import Profile
from benchmarks.sim.stats import EngineStats

__all__ = ["Engine", "EngineStats", "SimRequest", "Step", "TokenEvent"]

_WAITING, _PREFILL, _DECODE, _DONE = 0, 1, 2, 3
_SMOOTHING_S = 5.0  # vLLM V0 logs throughput averaged over its 5 s logging interval


@dataclass(slots=True)
class SimRequest:
    """What the engine needs to know about a request; lengths are exact token counts."""

    request_id: str
    prompt_tokens: int
    output_tokens: int  # exactly this many tokens are generated
    arrival_s: float  # TTFT and e2e are measured from here (front end included)
    block_hashes: tuple[int, ...] = ()  # chained hash per full prompt block (prefix caching)
    finish_reason: str = "length"  # reported when output_tokens are reached: "length" | "stop"


@dataclass(frozen=True, slots=True)
class TokenEvent:
    request_id: str
    generated: int  # tokens generated so far for that request (1 = first token)
    finished: bool


class _Req:
    """Engine-side request state. For decodes, computed/generated are derived from the tick."""

    __slots__ = (
        "c0", "chain_ok", "computed", "first_token_s", "g0", "gen", "generated", "held",
        "last_token_s", "queued_s", "scheduled_s", "shared", "sim", "skipped", "state",
        "t0", "target", "uid",
    )  # fmt: skip

    def __init__(self, sim: SimRequest, uid: int, now: float) -> None:
        self.sim = sim
        self.uid = uid
        self.state = _WAITING
        self.gen = 0  # bumped whenever queued tick events become invalid
        self.queued_s = now
        self.scheduled_s: float | None = None
        self.first_token_s: float | None = None
        self.last_token_s = now
        self.target = sim.prompt_tokens  # tokens to compute before sampling the next one
        self.computed = 0
        self.generated = 0
        self.held = 0  # KV blocks allocated, shared ones included
        self.shared: list[int] = []  # prefix hashes whose cached blocks this request holds
        self.chain_ok = True  # own full blocks may be re-hit by this request after preemption
        self.t0 = self.c0 = self.g0 = 0
        self.skipped = -1  # id of the step in which this decode was left out (budget)


@dataclass(slots=True, eq=False)
class Step:
    """One scheduled forward pass; opaque to callers except for the read-only figures."""

    step_id: int
    start_s: float
    duration_s: float
    num_tokens: int  # N: decode tokens + prefill-chunk tokens
    decode_tokens: int  # decodes that get a token at completion (aborts subtracted)
    context_tokens: int  # K
    num_preempted: int
    itl_s: float = 0.0  # set by complete(): inter-token latency of this step's decodes
    chunks: list[tuple[_Req, int, int]] = field(default_factory=list)  # (req, gen, tokens)


class Engine:
    def __init__(
        self,
        profile: Profile,
        rng: random.Random,
        *,
        every_token: bool = True,
        exact_steps: bool = False,
    ) -> None:
        self.profile = profile
        self.rng = rng
        self.every_token = every_token
        self.exact_steps = exact_steps  # reference mode for tests: always the O(running) path
        self.slow_factor = 1.0  # fault injection: multiplies step time
        self.stats = EngineStats(profile)
        self._bs = profile.block_size
        self._caching = profile.enable_prefix_caching
        self.kv = BlockPool(profile.num_gpu_blocks - 1, self._bs, self._caching)  # minus null
        self._reqs: dict[str, _Req] = {}
        self._waiting: deque[_Req] = deque()
        self._running: dict[str, _Req] = {}  # admission order (preemption pops the last)
        self._prefilling: dict[str, _Req] = {}
        self._decoding: dict[str, _Req] = {}
        self._tick = 0
        self._k_base = 0  # sum of (c0 - t0) over decodes: context = _k_base + D * tick
        self._boundary: dict[int, list[tuple[_Req, int]]] = {}
        self._finish: dict[int, list[tuple[_Req, int]]] = {}
        self._next_id = 1
        self._pending: Step | None = None
        self._last_complete_s: float | None = None

    # ----------------------------------------------------------------- public API
    def add_request(self, req: SimRequest, now: float) -> None:
        """Queue a request (vLLM never rejects for load). Raises ValueError if it cannot fit."""
        p = self.profile
        if req.request_id in self._reqs:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if req.prompt_tokens < 1 or req.output_tokens < 1:
            raise ValueError("prompt_tokens and output_tokens must be >= 1")
        if req.prompt_tokens + req.output_tokens > p.max_model_len:
            raise ValueError(
                f"prompt_tokens + output_tokens = {req.prompt_tokens + req.output_tokens} "
                f"exceeds max_model_len {p.max_model_len}"
            )
        if len(req.block_hashes) > req.prompt_tokens // self._bs:
            raise ValueError("more block_hashes than full prompt blocks")
        r = _Req(req, self._new_id(), now)
        self._reqs[req.request_id] = r
        self._waiting.append(r)

    def abort_request(self, request_id: str, now: float) -> bool:
        """Drop a request wherever it is and free its KV; False if unknown or already done."""
        r = self._reqs.pop(request_id, None)
        if r is None:
            return False
        if r.state == _WAITING:
            self._waiting.remove(r)
        else:
            pending = self._pending
            if pending is not None and r.state == _DECODE and r.skipped != pending.step_id:
                pending.decode_tokens -= 1
            self._materialize(r)
            self._leave_running(r)
            self._free_blocks(r, gone=True)
        r.state = _DONE
        r.gen += 1
        self._count_finish("abort")
        self._refresh_gauges()
        return True

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def schedule(self, now: float) -> Step | None:
        """Build the next step (vLLM V1 order); None when there is nothing to run."""
        if self._pending is not None:
            raise RuntimeError("schedule() called with a step still in flight")
        if not self._running and not self._waiting:
            return None
        budget = self.profile.max_num_batched_tokens
        step = Step(self._new_id(), now, 0.0, 0, 0, 0, 0)
        pairs = self._schedule_running(step, budget)
        budget -= step.num_tokens
        if step.num_preempted == 0:
            pairs += self._schedule_waiting(step, budget, now)
        p = self.profile
        t = p.step_time(step.num_tokens, step.context_tokens, pairs)
        if p.jitter_cv > 0.0:
            t *= max(0.5, self.rng.gauss(1.0, p.jitter_cv))
        step.duration_s = max(t, 1e-4) * self.slow_factor
        self.stats.iteration_tokens.observe(step.num_tokens)
        self._refresh_gauges()
        self._pending = step
        return step

    def complete(self, step: Step, now: float) -> list[TokenEvent]:
        """Apply the step's outcome at ``now``; returns the token events (see module doc)."""
        if step is not self._pending:
            raise RuntimeError("complete() called with a step that is not in flight")
        self._pending = None
        self._tick += 1
        tick = self._tick
        last = self._last_complete_s
        step.itl_s = now - last if last is not None else step.duration_s
        stats = self.stats
        events: list[TokenEvent] = []
        if step.decode_tokens:
            stats.itl.observe(step.itl_s, step.decode_tokens)
            stats.generation_tokens += step.decode_tokens
            if self.every_token:
                self._decode_events(step, tick, events)
        done = self._finish.pop(tick, None)
        if done:
            for r, gen in done:
                if r.gen == gen:
                    if not self.every_token:
                        events.append(TokenEvent(r.sim.request_id, r.sim.output_tokens, True))
                    self._finish_request(r, now)
        prefilled = 0
        sampled = -len(events)
        for r, gen, n in step.chunks:
            if r.gen == gen and r.state == _PREFILL:
                prefilled += n
                self._advance_prefill(r, n, now, events)
        sampled += len(events)
        dt = max(step.duration_s, 1e-9)
        alpha = 1.0 - math.exp(-dt / _SMOOTHING_S)
        stats.prompt_throughput += alpha * (prefilled / dt - stats.prompt_throughput)
        gen_rate = (step.decode_tokens + sampled) / dt
        stats.generation_throughput += alpha * (gen_rate - stats.generation_throughput)
        self._last_complete_s = now
        self._refresh_gauges()
        return events

    # ------------------------------------------------------------ introspection
    @property
    def num_free_blocks(self) -> int:
        return self.kv.free

    def waiting_ids(self) -> list[str]:
        return [r.sim.request_id for r in self._waiting]

    def running_ids(self) -> list[str]:
        return list(self._running)

    def generated(self, request_id: str) -> int:
        """Tokens generated so far for a live request (0 if unknown)."""
        r = self._reqs.get(request_id)
        if r is None:
            return 0
        return r.g0 + self._tick - r.t0 if r.state == _DECODE else r.generated

    def check_invariants(self) -> None:
        """O(requests) consistency check for tests; raises AssertionError on violation."""
        live = list(self._running.values())
        own = sum(r.held - len(r.shared) for r in live)
        shared = {h for r in live for h in r.shared}
        kv = self.kv
        assert kv.queued() == kv.free, (kv.queued(), kv.free)
        assert 0 <= kv.free <= kv.usable, kv.free
        assert own + len(shared) + kv.free == kv.usable, (own, len(shared), kv.free)
        assert len(self._running) <= self.profile.max_num_seqs
        assert set(shared) == set(kv.shared_refs), "shared ref table out of sync"
        for r in live:
            computed = r.c0 + self._tick - r.t0 if r.state == _DECODE else r.computed
            assert r.held * self._bs >= computed, (r.sim.request_id, r.held, computed)
        for r in self._waiting:
            assert r.state == _WAITING and r.held == 0 and r.computed == 0

    # ---------------------------------------------------------------- scheduling
    def _schedule_running(self, step: Step, budget: int) -> float:
        tick = self._tick
        due = self._boundary.pop(tick, None)
        crossing = [r for r, gen in due if r.gen == gen] if due else []
        n_dec = len(self._decoding)
        tokens = n_dec
        blocks = len(crossing)
        for r in self._prefilling.values():
            rest = r.target - r.computed
            tokens += rest
            blocks += -(-(r.computed + rest) // self._bs) - r.held
        if tokens > budget or blocks > self.kv.free or self.exact_steps:
            return self._schedule_running_exact(step, budget)
        # Fast path: every running request gets all it asks for; nothing is preempted.
        self.kv.take(blocks)
        bs = self._bs
        for r in crossing:
            r.held += 1
            self._push(self._boundary, tick + bs, r)
        pairs = 0.0
        for r in self._prefilling.values():
            rest = r.target - r.computed
            r.held = -(-(r.computed + rest) // bs)
            pairs += rest * (r.computed + rest / 2)
            step.chunks.append((r, r.gen, rest))
        step.num_tokens = tokens
        step.decode_tokens = n_dec
        step.context_tokens = self._k_base + n_dec * (tick + 1)
        return pairs

    def _schedule_running_exact(self, step: Step, budget: int) -> float:
        tick, bs = self._tick, self._bs
        order = list(self._running.values())
        end = len(order)
        i = 0
        pairs = 0.0
        while i < end and budget > 0:
            r = order[i]
            if r.state == _DECODE:
                computed = r.c0 + tick - r.t0
                n = 1
            else:
                computed = r.computed
                n = min(r.target - computed, budget)
            need = -(-(computed + n) // bs) - r.held
            while need > self.kv.free:
                victim = order[end - 1]
                end -= 1
                self._preempt(victim)
                step.num_preempted += 1
                if victim is r:
                    break
            if r.state == _WAITING:
                break
            if need > 0:
                self.kv.take(need)
                r.held += need
            if r.state == _DECODE:
                step.decode_tokens += 1
                step.context_tokens += computed + 1
                if need > 0:
                    self._push(self._boundary, tick + bs, r)
            else:
                pairs += n * (computed + n / 2)
                step.chunks.append((r, r.gen, n))
            step.num_tokens += n
            budget -= n
            i += 1
        for r in order[i:end]:
            if r.state == _DECODE:
                self._shift(r, step.step_id)
        return pairs

    def _schedule_waiting(self, step: Step, budget: int, now: float) -> float:
        p, bs = self.profile, self._bs
        pairs = 0.0
        skipped: list[_Req] = []
        while self._waiting and budget > 0 and len(self._running) < p.max_num_seqs:
            r = self._waiting[0]
            max_hit = (r.target - 1) // bs  # the last token is always recomputed
            hashes = r.sim.block_hashes
            n_shared, n_own, from_free = self.kv.lookup(hashes, max_hit, r.uid, r.generated > 0)
            computed = (n_shared + n_own) * bs
            n = r.target - computed
            if not p.enable_chunked_prefill and n > budget:
                # vLLM V1 sets a whole prompt that does not fit aside and tries the next one
                skipped.append(self._waiting.popleft())
                continue
            n = min(n, budget)
            need = -(-(computed + n) // bs) - n_shared - n_own
            if need > self.kv.free - from_free:
                break
            self._waiting.popleft()
            r.shared = self.kv.commit(hashes, n_shared, n_own, r.uid)
            self.kv.take(need)
            r.held = n_shared + n_own + need
            r.computed = computed
            if self._caching:
                self.stats.prefix_cache_queries += r.target
                self.stats.prefix_cache_hits += computed
            if r.scheduled_s is None:
                r.scheduled_s = now
                self.stats.queue_time.observe(now - r.queued_s)
            r.state = _PREFILL
            r.chain_ok = True
            rid = r.sim.request_id
            self._running[rid] = r
            self._prefilling[rid] = r
            pairs += n * (computed + n / 2)
            step.chunks.append((r, r.gen, n))
            step.num_tokens += n
            budget -= n
        self._waiting.extendleft(reversed(skipped))
        return pairs

    # ------------------------------------------------------------------- updates
    def _decode_events(self, step: Step, tick: int, events: list[TokenEvent]) -> None:
        sid = step.step_id
        for r in self._decoding.values():
            if r.skipped != sid:
                g = r.g0 + tick - r.t0
                events.append(TokenEvent(r.sim.request_id, g, g >= r.sim.output_tokens))

    def _advance_prefill(self, r: _Req, n: int, now: float, events: list[TokenEvent]) -> None:
        r.computed += n
        if self._caching and r.chain_ok and len(r.shared) < len(r.sim.block_hashes):
            r.chain_ok = self.kv.register(r.sim.block_hashes, r.shared, r.computed // self._bs)
        if r.computed < r.target:
            return
        stats = self.stats
        r.generated += 1
        stats.generation_tokens += 1
        if r.first_token_s is None:
            r.first_token_s = now
            stats.ttft.observe(now - r.sim.arrival_s)
            stats.prompt_tokens += r.sim.prompt_tokens
        else:  # resumed after preemption: this token's gap spans the preemption
            stats.itl.observe(now - r.last_token_s)
        finished = r.generated >= r.sim.output_tokens
        events.append(TokenEvent(r.sim.request_id, r.generated, finished))
        if finished:
            self._finish_request(r, now)
            return
        rid = r.sim.request_id
        del self._prefilling[rid]
        r.state = _DECODE
        r.t0, r.c0, r.g0 = self._tick, r.computed, r.generated
        self._k_base += r.c0 - r.t0
        self._decoding[rid] = r
        self._push_decode_events(r)

    def _finish_request(self, r: _Req, now: float) -> None:
        self._materialize(r)
        self._leave_running(r)
        self._free_blocks(r, gone=True)
        r.state = _DONE
        r.gen += 1
        del self._reqs[r.sim.request_id]
        s = self.stats
        self._count_finish(r.sim.finish_reason)
        s.e2e.observe(now - r.sim.arrival_s)
        s.request_prompt_tokens.observe(r.sim.prompt_tokens)
        s.request_generation_tokens.observe(r.sim.output_tokens)
        if r.scheduled_s is not None and r.first_token_s is not None:
            s.inference_time.observe(now - r.scheduled_s)
            s.prefill_time.observe(r.first_token_s - r.scheduled_s)
            s.decode_time.observe(now - r.first_token_s)

    def _preempt(self, r: _Req) -> None:
        self._materialize(r)
        r.last_token_s = self._last_complete_s if self._last_complete_s is not None else 0.0
        self._leave_running(r)
        self._free_blocks(r, gone=False)
        r.state = _WAITING
        r.gen += 1
        r.computed = 0
        r.target = r.sim.prompt_tokens + r.generated
        self._waiting.appendleft(r)
        self.stats.num_preemptions += 1

    def _materialize(self, r: _Req) -> None:
        """Write a decode's derived progress into its fields before it leaves decoding."""
        if r.state == _DECODE:
            r.generated = r.g0 + self._tick - r.t0
            r.computed = r.c0 + self._tick - r.t0

    def _shift(self, r: _Req, step_id: int) -> None:
        """A decode left out of this step keeps its progress while the tick advances."""
        r.gen += 1
        r.t0 += 1
        self._k_base -= 1
        r.skipped = step_id
        self._push_decode_events(r)

    def _leave_running(self, r: _Req) -> None:
        rid = r.sim.request_id
        del self._running[rid]
        if r.state == _DECODE:
            del self._decoding[rid]
            self._k_base -= r.c0 - r.t0
        else:
            del self._prefilling[rid]

    def _push_decode_events(self, r: _Req) -> None:
        self._push(self._boundary, r.t0 + r.held * self._bs - r.c0, r)
        self._push(self._finish, r.t0 + r.sim.output_tokens - r.g0, r)

    @staticmethod
    def _push(table: dict[int, list[tuple[_Req, int]]], tick: int, r: _Req) -> None:
        entry = (r, r.gen)
        bucket = table.get(tick)
        if bucket is None:
            table[tick] = [entry]
        else:
            bucket.append(entry)

    def _count_finish(self, reason: str) -> None:
        s = self.stats.request_success
        s[reason] = s.get(reason, 0) + 1

    def _refresh_gauges(self) -> None:
        s = self.stats
        s.num_running = len(self._running)
        s.num_waiting = len(self._waiting)
        s.kv_usage = self.kv.usage

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _free_blocks(self, r: _Req, gone: bool) -> None:
        """``gone``: the request finished or was aborted, so its own blocks can never be re-hit
        (only a preempted request looks its own run up) and are freed as plain blocks."""
        if r.held == 0:
            return
        own_cached = 0
        if self._caching and r.chain_ok and not gone:
            own_cached = max(0, min(r.held, r.computed // self._bs) - len(r.shared))
        self.kv.release(r.held, r.shared, own_cached, r.uid)
        r.held = 0
        r.shared = []
