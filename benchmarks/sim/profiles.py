"""Hardware + model profiles for the replica simulator: capacity limits and step-time constants.

A profile is one GPU (or TP group) serving one model under vLLM V1 defaults. Every field can be
overridden by name (``get_profile("a10g-llama3-8b", num_gpu_blocks=1800)``); unknown names and
bad values are rejected with a ``ValueError`` that names the field.

Step time (sim-fidelity §4.1), for a step scheduling ``N`` new tokens, reading ``K`` context
tokens for its decodes and ``A`` attention pairs for its prefill chunks::

    T = step_overhead_s + max(weights_floor_s, linear_base_s + per_token_s * N)
        + per_context_token_s * K + per_attention_pair_s * A

The ``max`` is what makes decodes of a memory-bound batch nearly free until the compute knee
(calibration-a10g.md: an additive form puts the A10G cluster's knee near 10 req/s instead of
12-14). TP all-reduce cost is folded into ``step_overhead_s`` and ``per_token_s``.

Invariants: every numeric field is positive (jitter and the additive terms may be 0), and a
full ``max_model_len`` sequence fits in the KV cache (vLLM refuses to start otherwise).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
LLAMA_70B = "meta-llama/Llama-3.1-70B-Instruct"


@dataclass(frozen=True, slots=True)
class Profile:
    """One GPU + model: scheduler limits, KV capacity and the step-time model's constants."""

    name: str
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    num_gpu_blocks: int  # includes vLLM's one null block, as in cache_config_info
    max_model_len: int
    step_overhead_s: float  # scheduler, sampler, launch, detokenise
    weights_floor_s: float  # weight bytes / achievable HBM bandwidth
    linear_base_s: float  # a in max(T_w, a + b*N)
    per_token_s: float  # b: compute per scheduled token
    per_context_token_s: float  # t_kv: KV read per decode context token
    per_attention_pair_s: float  # t_att: prefill attention per (query, key) pair
    jitter_cv: float  # step-time noise, coefficient of variation
    frontend_latency_s: float  # HTTP + tokenizer before the engine sees the request
    load_time_s: float  # cold start until /health is 200 (§7)
    served_model: str = LLAMA_8B
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    kv_bytes_per_token: int = 131_072  # per GPU; Llama-3.1-8B bf16 = 128 KiB
    gpu_memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and isinstance(value, bool):
                raise ValueError(f"profile field {f.name!r} must be a number, got {value!r}")
            if f.type == "int" and not isinstance(value, int):
                raise ValueError(f"profile field {f.name!r} must be an int, got {value!r}")
            if f.type == "float" and not isinstance(value, int | float):
                raise ValueError(f"profile field {f.name!r} must be a number, got {value!r}")
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"profile field {f.name!r} must be a bool, got {value!r}")
            if f.type == "str" and not (isinstance(value, str) and value):
                raise ValueError(f"profile field {f.name!r} must be a non-empty string")
        _positive(self, "max_num_seqs", "max_num_batched_tokens", "block_size", "max_model_len")
        _positive(self, "weights_floor_s", "kv_bytes_per_token", "gpu_memory_utilization")
        _non_negative(
            self,
            "step_overhead_s",
            "linear_base_s",
            "per_token_s",
            "per_context_token_s",
            "per_attention_pair_s",
            "jitter_cv",
            "frontend_latency_s",
            "load_time_s",
        )
        if self.num_gpu_blocks < 2:
            raise ValueError("profile field 'num_gpu_blocks' must be >= 2 (one is the null block)")
        if self.jitter_cv >= 0.5:
            raise ValueError(f"profile field 'jitter_cv' must be < 0.5, got {self.jitter_cv}")
        if self.max_model_len > self.kv_capacity_tokens:
            raise ValueError(
                f"profile field 'max_model_len' ({self.max_model_len}) exceeds the KV capacity "
                f"({self.kv_capacity_tokens} tokens from num_gpu_blocks={self.num_gpu_blocks})"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "profile field 'max_num_batched_tokens' must be >= max_model_len when "
                "enable_chunked_prefill is false (a whole prompt must fit in one step)"
            )

    @property
    def kv_capacity_tokens(self) -> int:
        return (self.num_gpu_blocks - 1) * self.block_size

    def step_time(self, n_tokens: int, context_tokens: int, attention_pairs: float) -> float:
        """Noise-free duration of one step (seconds); see the module docstring."""
        linear = self.linear_base_s + self.per_token_s * n_tokens
        return (
            self.step_overhead_s
            + (linear if linear > self.weights_floor_s else self.weights_floor_s)
            + self.per_context_token_s * context_tokens
            + self.per_attention_pair_s * attention_pairs
        )


def _positive(p: Profile, *names: str) -> None:
    for name in names:
        if getattr(p, name) <= 0:
            raise ValueError(f"profile field {name!r} must be > 0, got {getattr(p, name)!r}")


def _non_negative(p: Profile, *names: str) -> None:
    for name in names:
        if getattr(p, name) < 0:
            raise ValueError(f"profile field {name!r} must be >= 0, got {getattr(p, name)!r}")


# Constants and their provenance: sim-fidelity §4.3 (H100 fit), §5.1 (table), §5.2 (Vidur), and
# the A10G fit recorded in benchmarks/results/sim-calibration.md (calibration-a10g.md).
PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            # A10G 24 GB, Llama-3.1-8B bf16. KV capacity and the compute slope are the free
            # parameters fitted so the talk's 8-replica cluster has its knee at 12-14 req/s.
            name="a10g-llama3-8b",
            max_num_seqs=256,
            max_num_batched_tokens=2048,
            block_size=16,
            num_gpu_blocks=2126,  # 34,000 tokens: §5.1 estimate 31-37K
            max_model_len=16_384,
            step_overhead_s=0.003,
            weights_floor_s=0.028,  # 16 GB / ~570 GB/s
            linear_base_s=0.002,
            per_token_s=0.00025,  # §5.1 estimate 0.25-0.45 ms
            per_context_token_s=0.26e-6,
            per_attention_pair_s=1.3e-8,
            jitter_cv=0.03,
            frontend_latency_s=0.015,
            load_time_s=75.0,
        ),
        Profile(
            # H100 80 GB SXM, Llama-3.1-8B bf16; fitted to inference-perf's KubeCon NA 2025 runs.
            name="h100-llama3-8b",
            max_num_seqs=1024,
            max_num_batched_tokens=8192,
            block_size=16,
            num_gpu_blocks=27_501,  # 440K tokens
            max_model_len=131_072,
            step_overhead_s=0.002,
            weights_floor_s=0.005,
            linear_base_s=0.0035,
            per_token_s=22.5e-6,
            per_context_token_s=0.056e-6,
            per_attention_pair_s=1.0e-9,
            jitter_cv=0.03,
            frontend_latency_s=0.018,
            load_time_s=60.0,
        ),
        Profile(
            # 4x H100 TP4, Llama-3.1-70B bf16 (80 KiB KV per token per GPU); Vidur-derived.
            name="h100x4-llama3-70b",
            max_num_seqs=1024,
            max_num_batched_tokens=8192,
            block_size=16,
            num_gpu_blocks=28_751,  # 460K tokens
            max_model_len=131_072,
            step_overhead_s=0.004,
            weights_floor_s=0.0148,
            linear_base_s=0.010,
            per_token_s=58e-6,
            per_context_token_s=0.034e-6,
            per_attention_pair_s=1.3e-9,
            jitter_cv=0.03,
            frontend_latency_s=0.02,
            load_time_s=210.0,
            served_model=LLAMA_70B,
            kv_bytes_per_token=81_920,
        ),
    )
}


def get_profile(name: str, **overrides: object) -> Profile:
    """The named profile with ``overrides`` applied field by field (validated)."""
    try:
        base = PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown profile {name!r}; known: {', '.join(sorted(PROFILES))}"
        ) from None
    known = {f.name for f in dataclasses.fields(Profile)}
    for field in overrides:
        if field not in known:
            raise ValueError(f"unknown profile field {field!r}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]
