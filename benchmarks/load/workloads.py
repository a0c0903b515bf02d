"""Seeded request workloads and arrival processes shared by every load generator and experiment.

A ``Workload`` is an infinite, deterministic stream of ``RequestSpec`` (prompt and output lengths,
shared-prefix group); the same seed gives the same stream in every process and on every machine
(``random.Random`` only, never the salted built-in ``hash()``). Prompt text is materialised on
demand, so the discrete-event simulator can replay hours of traffic using the token counts alone.

Length distributions (token counts; ``make_workload`` names):

``openorca``  the KubeCon 2024 talk's llm-load-test OpenOrca subset: input 16–1600 tokens, mean
    ≈ 540; output 16–1600, mean ≈ 415. Its construction (stratified 64×64-token tiles) spreads
    requests broadly over that range, so each length is a *scaled Beta*:
    ``16 + 1584·Beta(1.5, β)`` with β solved from the mean (input β = 3.034, output β = 4.455);
    densities peak near 330 (input) and 215 (output) tokens and reach 1600. Independent.
``sharegpt``  ShareGPT as vLLM's ``benchmark_serving`` samples it (vLLM paper: mean input ≈ 161,
    output ≈ 338): lognormal input (μ 4.60, σ 1.2) and output (μ 5.50, σ 0.9), then vLLM's own
    filter (drop input or output < 4, input > 1024, input + output > 2048); μ were fitted so
    the *filtered* means hit 161 / 338.
``splitwise_conv``, ``splitwise_code``  the Azure 2023 (Splitwise) traces' length statistics
    (sim-fidelity.md §6). Each length is a *quantile-knot* distribution: its inverse CDF passes
    through (0, min), (0.5, median), (0.9, p90), (0.99, p99), (1, max), interpolated linearly
    (or log-linearly where noted) between knots, plus one extra knot whose value is solved so
    the mean matches. Median, p90 and p99 are therefore exact by construction and the mean
    exact up to integer rounding. Chosen ends and extra knots (min/max are ours, the trace
    gives none): conversation input 16..8192, extra knot at q 0.8; conversation output
    4..1202, q 0.75; coding input 16..8192, q 0.8; coding output 1..502, log-linear, q 0.75
    (coding output's mean of 28 is below what any linear interpolation through p90 55 and
    p99 251 can give). Arrival CVs of the traces (1.09 and 13.2) map to Gamma burstiness
    1/CV² ≈ 0.84 and ≈ 0.0057.
``shared_prefix``  inference-perf's ``shared_prefix``: ``num_groups`` system prompts of
    ``system_prompt_len`` tokens, ``prompts_per_group`` questions of ``question_len`` tokens each,
    ``output_len`` output tokens; every request is a uniformly chosen (group, question), so
    the whole prompt repeats too, as in inference-perf.
``fixed``  constant ``input_len`` / ``output_len`` (tests, calibration).

Prompt text. The replica simulator counts one token per 4 characters, so a prompt of *n* tokens
is exactly ``4·n`` ASCII characters: space-separated three-letter words (also about one token
each for real BPE tokenizers), sliced from one seeded corpus. A request's user text starts with
its own 8-character index tag, so no two requests of a run share a prefix block by accident;
shared-prefix requests share the literal system-prompt text of their group. Chat requests add
the template's role markers (a few tokens); clients send the simulator's ``sim_prompt_tokens``
field (see ``openloop.request_body``) so the engine sees exactly ``prompt_tokens``.

Arrivals: ``Arrivals(rate, burstiness)`` draws Gamma inter-arrival gaps with shape ``b`` and scale
``1/(rate·b)`` (vLLM's ``--burstiness``): ``b = 1`` is Poisson, CV = ``1/sqrt(b)``.
"""

from __future__ import annotations

import bisect
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import islice
from typing import Literal

CHARS_PER_TOKEN = 4
_CORPUS_TOKENS = 1 << 16  # prompts up to 65 536 tokens can be sliced without wrapping
_TAG_CHARS = 2 * CHARS_PER_TOKEN
# Three-letter words: with the trailing space each is 4 characters and about one BPE token.
_WORD_LIST = """
    act add age ago aid aim air all and any arm art ask bad bag bar bed big bit box boy bus
    but buy can car cat cup cut day did dog dry due ear eat egg end eye far few fit fix fly
    for fun gas get got gun guy had has hat her him his hit hot how ice its job key kid lab
    law lay leg let lie lot low man map may men mix mom net new nor not now odd off oil old
    one our out own pay per pen pet put ran raw red rid row run sad sat saw say sea see set
    she sit six sky son sun tax tea ten the tie too top toy try two use van via war was way
    web wet who why win yes yet you
"""
_WORDS = tuple(_WORD_LIST.split())


@cache
def _corpus() -> str:
    rng = random.Random(0x6B7667)  # fixed: the corpus is part of the workload definition
    text = "".join(w + " " for w in rng.choices(_WORDS, k=_CORPUS_TOKENS))
    return text + text  # doubled so any slice of up to _CORPUS_TOKENS tokens is contiguous


@dataclass(frozen=True, slots=True)
class TextRef:
    """``tokens`` tokens of prompt text: ``tag`` then corpus text from token ``offset``."""

    tag: str
    offset: int
    tokens: int

    def text(self) -> str:
        n_chars = self.tokens * CHARS_PER_TOKEN
        if self.tokens > _CORPUS_TOKENS:
            raise ValueError(f"prompt of {self.tokens} tokens exceeds the corpus")
        start = (self.offset % _CORPUS_TOKENS) * CHARS_PER_TOKEN
        head = self.tag[:_TAG_CHARS].ljust(_TAG_CHARS)
        return (head + _corpus()[start : start + n_chars])[:n_chars]


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of a workload: lengths in tokens and how to build its prompt."""

    index: int
    prompt_tokens: int  # system + user; exact under the simulator's 4-characters-per-token rule
    max_tokens: int
    user: TextRef
    system: TextRef | None = None  # the shared prefix, if any
    group: int | None = None  # shared-prefix group id

    @property
    def system_tokens(self) -> int:
        return self.system.tokens if self.system is not None else 0

    def prompt_text(self) -> str:
        """The completions prompt: the system text (if any) is its literal prefix."""
        head = self.system.text() if self.system is not None else ""
        return head + self.user.text()

    def messages(self) -> list[dict[str, str]]:
        """The chat messages: a system message (if any), then the user message."""
        msgs = [] if self.system is None else [{"role": "system", "content": self.system.text()}]
        msgs.append({"role": "user", "content": self.user.text()})
        return msgs


class LengthModel(ABC):
    """Draws one (prompt tokens, output tokens) pair."""

    @abstractmethod
    def sample(self, rng: random.Random) -> tuple[int, int]: ...


class Workload(ABC):
    """An infinite, deterministic stream of requests; iterate it or ``take(n)``."""

    name: str
    seed: int

    @abstractmethod
    def __iter__(self) -> Iterator[RequestSpec]: ...

    def take(self, n: int) -> list[RequestSpec]:
        return list(islice(iter(self), n))


@dataclass(frozen=True, slots=True)
class ScaledBeta:
    """``lo + (hi - lo)·Beta(alpha, beta)`` rounded, with beta solved from the mean."""

    lo: int
    hi: int
    mean: float
    alpha: float = 1.5

    @property
    def beta(self) -> float:
        m = (self.mean - self.lo) / (self.hi - self.lo)
        return self.alpha * (1.0 - m) / m

    def sample(self, rng: random.Random) -> int:
        return round(self.lo + (self.hi - self.lo) * rng.betavariate(self.alpha, self.beta))


@dataclass(frozen=True, slots=True)
class QuantileKnots:
    """A distribution given by its inverse CDF: piecewise between (quantile, value) knots."""

    knots: tuple[tuple[float, float], ...]
    interp: Literal["linear", "log"] = "linear"

    @classmethod
    def fit(
        cls,
        fixed: Sequence[tuple[float, float]],
        free_q: float,
        mean: float,
        interp: Literal["linear", "log"] = "linear",
    ) -> QuantileKnots:
        """Insert a knot at ``free_q`` whose value makes the distribution's mean ``mean``."""
        base = sorted(fixed)
        i = bisect.bisect(base, (free_q, -math.inf))
        lo_v, hi_v = base[i - 1][1], base[i][1]

        def with_x(x: float) -> QuantileKnots:
            return cls((*base[:i], (free_q, x), *base[i:]), interp)

        if not with_x(lo_v).mean() <= mean <= with_x(hi_v).mean():
            raise ValueError(f"no knot at q={free_q} between {lo_v} and {hi_v} gives mean {mean}")
        a, b = lo_v, hi_v
        for _ in range(60):  # the mean is monotone in the free knot's value
            mid = (a + b) / 2
            a, b = (mid, b) if with_x(mid).mean() < mean else (a, mid)
        return with_x((a + b) / 2)

    def _segment_mean(self, v0: float, v1: float) -> float:
        if self.interp == "linear" or v0 == v1:
            return (v0 + v1) / 2
        return (v1 - v0) / math.log(v1 / v0)  # mean of a log-uniform segment

    def mean(self) -> float:
        pairs = zip(self.knots, self.knots[1:], strict=False)
        return sum((q1 - q0) * self._segment_mean(v0, v1) for (q0, v0), (q1, v1) in pairs)

    def quantile(self, u: float) -> float:
        qs = [q for q, _ in self.knots]
        i = min(max(bisect.bisect_right(qs, u), 1), len(qs) - 1)
        (q0, v0), (q1, v1) = self.knots[i - 1], self.knots[i]
        f = (u - q0) / (q1 - q0)
        if self.interp == "linear":
            return v0 + f * (v1 - v0)
        return float(v0 * (v1 / v0) ** f)

    def sample(self, rng: random.Random) -> int:
        return max(1, round(self.quantile(rng.random())))


def _splitwise(
    ends: tuple[int, int],
    stats: tuple[float, float, float, float],
    free_q: float,
    interp: Literal["linear", "log"] = "linear",
) -> QuantileKnots:
    mean, med, p90, p99 = stats
    knots = [(0.0, float(ends[0])), (0.5, med), (0.9, p90), (0.99, p99), (1.0, float(ends[1]))]
    return QuantileKnots.fit(knots, free_q, mean, interp)


# (min, max) we chose; (mean, median, p90, p99) as published; the free knot's quantile.
SPLITWISE_CONV_INPUT = _splitwise((16, 8192), (1155, 1020, 2734, 4142), 0.8)
SPLITWISE_CONV_OUTPUT = _splitwise((4, 1202), (211, 129, 424, 601), 0.75)
SPLITWISE_CODE_INPUT = _splitwise((16, 8192), (2048, 1469, 5188, 7436), 0.8)
SPLITWISE_CODE_OUTPUT = _splitwise((1, 502), (28, 13, 55, 251), 0.75, "log")


@dataclass(frozen=True, slots=True)
class IndependentLengths(LengthModel):
    prompt: ScaledBeta | QuantileKnots
    output: ScaledBeta | QuantileKnots

    def sample(self, rng: random.Random) -> tuple[int, int]:
        return self.prompt.sample(rng), self.output.sample(rng)


@dataclass(frozen=True, slots=True)
class ShareGPTLengths(LengthModel):
    """Lognormal lengths through vLLM's ``sample_sharegpt_requests`` filter."""

    input_mu: float = 4.60
    input_sigma: float = 1.2
    output_mu: float = 5.50
    output_sigma: float = 0.9

    def sample(self, rng: random.Random) -> tuple[int, int]:
        while True:
            p = round(rng.lognormvariate(self.input_mu, self.input_sigma))
            o = round(rng.lognormvariate(self.output_mu, self.output_sigma))
            if 4 <= p <= 1024 and o >= 4 and p + o <= 2048:
                return p, o


@dataclass(frozen=True, slots=True)
class FixedLengths(LengthModel):
    input_len: int
    output_len: int

    def sample(self, rng: random.Random) -> tuple[int, int]:
        return self.input_len, self.output_len


class LengthWorkload(Workload):
    """Independent requests whose lengths come from a ``LengthModel``.

    ``max_total_tokens`` redraws any pair whose prompt + output exceeds it (a replica's
    ``max_model_len``), as vLLM's dataset samplers filter; ``None`` keeps every draw.
    """

    def __init__(
        self, name: str, lengths: LengthModel, seed: int, max_total_tokens: int | None = None
    ) -> None:
        self.name, self.lengths, self.seed = name, lengths, seed
        self.max_total_tokens = max_total_tokens

    def __iter__(self) -> Iterator[RequestSpec]:
        rng = random.Random(self.seed)
        index = 0
        while True:
            prompt, output = self.lengths.sample(rng)
            if self.max_total_tokens is not None and prompt + output > self.max_total_tokens:
                continue
            user = TextRef(f"{index:07d}", rng.randrange(_CORPUS_TOKENS), prompt)
            yield RequestSpec(index, prompt, output, user)
            index += 1


class SharedPrefixWorkload(Workload):
    """inference-perf's ``shared_prefix``: groups of questions behind a long system prompt."""

    def __init__(
        self,
        seed: int,
        num_groups: int = 10,
        prompts_per_group: int = 10,
        system_prompt_len: int = 1024,
        question_len: int = 64,
        output_len: int = 128,
    ) -> None:
        if min(num_groups, prompts_per_group, system_prompt_len, question_len, output_len) < 1:
            raise ValueError("shared_prefix parameters must all be >= 1")
        if num_groups * prompts_per_group > 10**6:
            raise ValueError("at most 10**6 distinct shared-prefix prompts")
        self.name, self.seed = "shared_prefix", seed
        self.num_groups, self.prompts_per_group = num_groups, prompts_per_group
        self.system_prompt_len, self.question_len = system_prompt_len, question_len
        self.output_len = output_len
        layout = random.Random(f"{seed}/layout")
        self._systems = [
            TextRef(f"s{g:06d}", layout.randrange(_CORPUS_TOKENS), system_prompt_len)
            for g in range(num_groups)
        ]
        self._questions = [
            [
                TextRef(
                    f"q{g * prompts_per_group + p:06d}",
                    layout.randrange(_CORPUS_TOKENS),
                    question_len,
                )
                for p in range(prompts_per_group)
            ]
            for g in range(num_groups)
        ]

    def __iter__(self) -> Iterator[RequestSpec]:
        rng = random.Random(self.seed)
        index = 0
        total = self.system_prompt_len + self.question_len
        while True:
            g = rng.randrange(self.num_groups)
            question = self._questions[g][rng.randrange(self.prompts_per_group)]
            yield RequestSpec(index, total, self.output_len, question, self._systems[g], g)
            index += 1


def _openorca(seed: int, max_total_tokens: int | None = None) -> Workload:
    lengths = IndependentLengths(ScaledBeta(16, 1600, 540.0), ScaledBeta(16, 1600, 415.0))
    return LengthWorkload("openorca", lengths, seed, max_total_tokens)


def _sharegpt(seed: int, max_total_tokens: int | None = None) -> Workload:
    return LengthWorkload("sharegpt", ShareGPTLengths(), seed, max_total_tokens)


def _splitwise_conv(seed: int, max_total_tokens: int | None = None) -> Workload:
    lengths = IndependentLengths(SPLITWISE_CONV_INPUT, SPLITWISE_CONV_OUTPUT)
    return LengthWorkload("splitwise_conv", lengths, seed, max_total_tokens)


def _splitwise_code(seed: int, max_total_tokens: int | None = None) -> Workload:
    lengths = IndependentLengths(SPLITWISE_CODE_INPUT, SPLITWISE_CODE_OUTPUT)
    return LengthWorkload("splitwise_code", lengths, seed, max_total_tokens)


def _fixed(
    seed: int, input_len: int = 128, output_len: int = 32, max_total_tokens: int | None = None
) -> Workload:
    return LengthWorkload("fixed", FixedLengths(input_len, output_len), seed, max_total_tokens)


def _shared_prefix(seed: int, **params: int) -> Workload:
    return SharedPrefixWorkload(seed, **params)


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "openorca": _openorca,
    "sharegpt": _sharegpt,
    "splitwise_conv": _splitwise_conv,
    "splitwise_code": _splitwise_code,
    "shared_prefix": _shared_prefix,
    "fixed": _fixed,
}


def make_workload(name: str, seed: int = 0, **params: int) -> Workload:
    """Build a workload by name; ``params`` are its integer options (see the module docstring)."""
    try:
        factory = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}") from None
    try:
        return factory(seed, **params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for workload {name!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Arrivals:
    """Open-loop arrival process: Gamma gaps, shape ``burstiness``, mean ``1/rate`` seconds."""

    rate: float  # requests per second
    burstiness: float = 1.0  # Gamma shape b; 1 is Poisson, < 1 burstier; CV = 1/sqrt(b)

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive finite number, got {self.rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be a positive finite number, got {self.burstiness}")

    @property
    def cv(self) -> float:
        return 1.0 / math.sqrt(self.burstiness)

    def gaps(self, seed: int) -> Iterator[float]:
        rng = random.Random(f"{seed}/arrivals")
        if self.burstiness == 1.0:
            while True:
                yield rng.expovariate(self.rate)
        scale = 1.0 / (self.rate * self.burstiness)
        while True:
            yield rng.gammavariate(self.burstiness, scale)

    def times(self, seed: int) -> Iterator[float]:
        """Send offsets in seconds from the start of the run (the first request at its gap)."""
        t = 0.0
        for gap in self.gaps(seed):
            t += gap
            yield t
