"""A scenario shrunk so that real time can afford it: fewer tokens per request, faster clock.

Live runs (real gateway, simulated replicas over HTTP, a real client) cost CPU per streamed
token, and the talk's scenario streams ~5,000 tokens/s. ``scale`` shrinks it by two factors:

* ``lengths`` L: every prompt and output is L times shorter (``ScaledWorkload``), and so are
  the engine's token-denominated limits (KV capacity, block size, token budget, model length).
  Each request needs L times fewer steps; each step is made L times longer so that a request
  takes about as long as before: the fixed terms (overhead, weights floor, ``a``) and the
  per-decode-token term x L, the per-context-token term x L**2 (a decode reads L times fewer
  context tokens), the per-attention-pair term x L**3.
* ``speed`` c: every time constant (and the front-end latency) is divided by c; the caller
  offers c times the request rate and scrapes c times as often.

A request then lasts about ``1 / c`` of the original and the stream carries ``c / L`` times
the tokens per second. Not exact: one decode is one token whatever L, so the per-token term
cannot be right for both decodes and prefill chunks; it is kept right for decodes, which makes
prefill L times cheaper than in proportion, and lengths are rounded to whole tokens. The scaled
cluster's capacity is therefore *measured* (``capacity.replica_capacity`` on the scaled
profile) and loads are set as the same fraction of it. The DES and the live run use the very
same scaled profile and arrivals, so comparing them is exact about everything but the live
machinery - which is what a validation of the simulator needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from benchmarks.load.workloads import RequestSpec, Workload
from benchmarks.sim.profiles import Profile

Overrides = dict[str, int | float]


def scaled_overrides(profile: Profile, *, lengths: int, speed: float) -> Overrides:
    """Profile field overrides for a scaled copy of ``profile`` (see the module docstring)."""
    if lengths < 1 or speed <= 0:
        raise ValueError("lengths must be >= 1 and speed > 0")
    if lengths == 1 and speed == 1.0:
        return {}
    step = lengths / speed
    block = max(1, profile.block_size // lengths)
    kv_tokens = profile.kv_capacity_tokens // lengths
    return {
        "block_size": block,
        "num_gpu_blocks": kv_tokens // block + 1,
        "max_num_batched_tokens": max(1, profile.max_num_batched_tokens // lengths),
        "max_model_len": max(1, profile.max_model_len // lengths),
        "step_overhead_s": profile.step_overhead_s * step,
        "weights_floor_s": profile.weights_floor_s * step,
        "linear_base_s": profile.linear_base_s * step,
        "per_token_s": profile.per_token_s * step,
        "per_context_token_s": profile.per_context_token_s * lengths * step,
        "per_attention_pair_s": profile.per_attention_pair_s * lengths * lengths * step,
        "frontend_latency_s": profile.frontend_latency_s / speed,
    }


def _shrink(n: int, divisor: int) -> int:
    return max(1, round(n / divisor))


class ScaledWorkload(Workload):
    """``inner`` with every prompt and output ``divisor`` times shorter (at least one token)."""

    def __init__(self, inner: Workload, divisor: int) -> None:
        if divisor < 1:
            raise ValueError(f"divisor must be >= 1, got {divisor}")
        self.inner = inner
        self.divisor = divisor
        self.name = inner.name if divisor == 1 else f"{inner.name}/{divisor}"
        self.seed = inner.seed

    def __iter__(self) -> Iterator[RequestSpec]:
        d = self.divisor
        for spec in self.inner:
            if d == 1:
                yield spec
                continue
            system = spec.system
            if system is not None:
                system = replace(system, tokens=_shrink(system.tokens, d))
            user = replace(spec.user, tokens=_shrink(spec.user.tokens, d))
            prompt = user.tokens + (system.tokens if system is not None else 0)
            yield replace(
                spec,
                prompt_tokens=prompt,
                max_tokens=_shrink(spec.max_tokens, d),
                user=user,
                system=system,
            )
