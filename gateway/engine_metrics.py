"""Reading engine metrics: what a replica's /metrics page says about its load.

Pure functions over the Prometheus text exposition; no I/O. ``parse_engine_metrics`` turns one
page into an ``EngineSample`` (waiting, running, KV usage) using a ``MetricNames`` table per
engine flavour; ``detect_engine`` picks the flavour from what a page serves.

Invariants:

* A signal the page does not expose is ``None`` (unknown), never 0. So is a signal whose every
  series is NaN, ±Inf, negative, or (KV) above 1: a garbage value must not look like an idle
  replica.
* Only the needed lines are read. Each wanted metric name is located with ``str.find`` for
  ``"\\n" + name`` (a C-speed scan), and a match counts only when the name is followed by ``{``
  or a blank, so ``name_created`` series (prometheus_client emits them as separate gauge
  families), ``_sum``/``_bucket`` lines in any order, HELP/TYPE comments, blank lines and
  HELP-less families are all skipped without being parsed. Label order is irrelevant: labels
  are matched by name.
* Aggregation over series of one signal: queues (waiting, running) are SUMMED — vLLM >= 0.10
  with data parallelism exports one series per ``engine="N"``, each engine a separate scheduler
  behind the replica's one API server, so the replica's backlog is their sum. KV usage is the
  MAX — the replica cannot choose which engine serves a request, and one engine near 100% (about
  to preempt) is what a new request risks; a mean would hide it behind idle engines.
* SGLang repeats the same scheduler state on every tensor-parallel rank (``tp_rank`` label):
  summing would multiply the queue by the TP degree, so only the lowest rank present is read.
* Alternatives are tried in order and the first with a valid series wins: a vLLM 0.10.x page
  exposes both ``vllm:kv_cache_usage_perc`` and the deprecated ``vllm:gpu_cache_usage_perc``
  alias, and >= 0.11 only the new name, so reading the old name alone would show KV 0 / unknown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "ENGINE_NAMES",
    "EngineSample",
    "MetricNames",
    "Signal",
    "UnknownEngineError",
    "custom_names",
    "detect_engine",
    "names_for",
    "parse_engine_metrics",
    "parse_signal",
]


@dataclass(frozen=True, slots=True)
class EngineSample:
    """One scrape's worth of load signals. ``None`` = the replica does not expose it (unknown)."""

    engine: str  # detected or configured flavour, e.g. "vllm-v1", "sglang", "nim", "tgi"
    queue_depth: int | None  # requests waiting in the engine scheduler (summed over engines)
    running: int | None  # requests in the running batch (summed over engines)
    kv_usage: float | None  # KV-cache usage ratio 0..1


class UnknownEngineError(ValueError):
    """The page matches no known engine flavour (and none was configured)."""


@dataclass(frozen=True, slots=True)
class Signal:
    """One metric series selector: a sample name plus required label values."""

    name: str
    labels: tuple[tuple[str, str], ...] = ()  # every (label, value) must match
    scale: float = 1.0  # multiplies the value (e.g. 0.01 for a percent-valued KV gauge)

    def __str__(self) -> str:
        if not self.labels:
            return self.name
        inner = ",".join(f'{k}="{v}"' for k, v in self.labels)
        return f"{self.name}{{{inner}}}"


@dataclass(frozen=True, slots=True)
class MetricNames:
    """Where one engine flavour publishes each signal. Alternatives in order of preference."""

    engine: str
    waiting: tuple[Signal, ...]
    running: tuple[Signal, ...]
    kv_usage: tuple[Signal, ...]  # empty: the engine has no KV signal (TGI)
    rank_label: str | None = None  # read only the lowest value of this label (SGLang tp_rank)


def _s(name: str, **labels: str) -> Signal:
    return Signal(name, tuple(labels.items()))


def _vllm(engine: str, kv_first: str, kv_second: str) -> MetricNames:
    return MetricNames(
        engine=engine,
        waiting=(_s("vllm:num_requests_waiting"),),
        running=(_s("vllm:num_requests_running"),),
        kv_usage=(_s(kv_first), _s(kv_second)),
    )


def _sglang_names() -> MetricNames:
    # sglang renamed the ``sglang:`` prefix to ``sglang_`` (Prometheus-style); accept both.
    def both(suffix: str) -> tuple[Signal, ...]:
        return (_s(f"sglang:{suffix}"), _s(f"sglang_{suffix}"))

    return MetricNames(
        engine="sglang",
        waiting=both("num_queue_reqs"),
        running=both("num_running_reqs"),
        kv_usage=both("token_usage"),
        rank_label="tp_rank",
    )


_TABLES: dict[str, MetricNames] = {
    # "vllm-v0" is V0 and early V1 (<= 0.9), both naming KV usage gpu_cache_usage_perc. The
    # new name is a fallback so that a replica upgraded under a pinned config still reads KV.
    "vllm-v0": _vllm("vllm-v0", "vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"),
    "vllm-v1": _vllm("vllm-v1", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    # NIM for LLMs 1.x: vLLM's V0 names without the prefix, served on /v1/metrics.
    "nim": MetricNames(
        engine="nim",
        waiting=(_s("num_requests_waiting"),),
        running=(_s("num_requests_running"),),
        kv_usage=(_s("gpu_cache_usage_perc"), _s("kv_cache_usage_perc")),
    ),
    "sglang": _sglang_names(),
    "tgi": MetricNames(
        engine="tgi",
        waiting=(_s("tgi_queue_size"),),
        running=(_s("tgi_batch_current_size"),),
        kv_usage=(),
    ),
    # Triton's TensorRT-LLM backend (nv_trt_llm_*) and trtllm-serve (trtllm_*). "scheduled"
    # is what GIE reads as running; "active" is the older backend's closest equivalent.
    "trtllm": MetricNames(
        engine="trtllm",
        waiting=(
            _s("nv_trt_llm_request_metrics", request_type="waiting"),
            _s("trtllm_num_requests_waiting"),
        ),
        running=(
            _s("nv_trt_llm_request_metrics", request_type="scheduled"),
            _s("nv_trt_llm_request_metrics", request_type="active"),
            _s("trtllm_num_requests_running"),
        ),
        kv_usage=(
            _s("nv_trt_llm_kv_cache_block_metrics", kv_cache_block_type="fraction"),
            _s("trtllm_kv_cache_utilization"),
        ),
    ),
}

ENGINE_NAMES: tuple[str, ...] = tuple(_TABLES)

# Detection order matters: the first marker present wins. vLLM >= 0.10 before the older
# vLLM names (a 0.10.x page has both KV names); NIM last, its unprefixed names being the
# least specific.
_DETECT: tuple[tuple[str, str], ...] = (
    ("vllm:kv_cache_usage_perc", "vllm-v1"),
    ("vllm:num_requests_waiting", "vllm-v0"),
    ("vllm:gpu_cache_usage_perc", "vllm-v0"),
    ("sglang:num_queue_reqs", "sglang"),
    ("sglang_num_queue_reqs", "sglang"),
    ("sglang:token_usage", "sglang"),
    ("sglang_token_usage", "sglang"),
    ("tgi_queue_size", "tgi"),
    ("nv_trt_llm_", "trtllm"),
    ("trtllm_", "trtllm"),
    ("num_requests_waiting", "nim"),
    ("gpu_cache_usage_perc", "nim"),
    # Prefix-only markers: a page of the engine's other families but none of the load gauges
    # (a trimmed or partial page) still gets the engine, whose gauges then read as unknown.
    ("vllm:", "vllm-v0"),
    ("sglang:", "sglang"),
    ("sglang_", "sglang"),
    ("tgi_", "tgi"),
)


def names_for(engine: str) -> MetricNames:
    """The built-in name table for ``engine``; ValueError naming it when unknown."""
    try:
        return _TABLES[engine]
    except KeyError:
        known = ", ".join(ENGINE_NAMES)
        raise ValueError(f"unknown engine {engine!r} (known: {known})") from None


def _has_line(text: str, prefix: str) -> bool:
    return text.startswith(prefix) or ("\n" + prefix) in text


def detect_engine(text: str) -> str | None:
    """The engine flavour whose metric names the page serves, or None."""
    for marker, engine in _DETECT:
        if _has_line(text, marker):
            return engine
    return None


def parse_engine_metrics(
    text: str, engine: str | None = None, names: MetricNames | None = None
) -> EngineSample:
    """Read waiting, running and KV usage from one exposition page.

    ``names`` (custom tables from config) wins over ``engine`` (a built-in flavour), which wins
    over detection. Raises ``UnknownEngineError`` when nothing is given and nothing is detected.
    """
    if names is None:
        if engine is None:
            engine = detect_engine(text)
            if engine is None:
                raise UnknownEngineError("no known engine metric names on the page")
        names = names_for(engine)
    waiting = _read(text, names.waiting, names.rank_label, is_ratio=False)
    running = _read(text, names.running, names.rank_label, is_ratio=False)
    kv = _read(text, names.kv_usage, names.rank_label, is_ratio=True)
    return EngineSample(
        engine=names.engine,
        queue_depth=None if waiting is None else round(waiting),
        running=None if running is None else round(running),
        kv_usage=kv,
    )


# A request count beyond this is a broken exporter, not a queue (and would overflow the sum).
_MAX_COUNT = 1e12


def _read(
    text: str, alternatives: tuple[Signal, ...], rank_label: str | None, *, is_ratio: bool
) -> float | None:
    for sig in alternatives:
        series = _series(text, sig)
        if not series:
            continue
        if rank_label is not None:
            series = _lowest_rank(series, rank_label)
        values = [v * sig.scale for _, v in series]
        # One garbage series makes the whole signal unknown: a partial sum or a max over the
        # remaining engines would understate the load.
        if not all(0.0 <= v <= (1.0 if is_ratio else _MAX_COUNT) for v in values):
            continue
        return max(values) if is_ratio else math.fsum(values)
    return None


def _lowest_rank(
    series: list[tuple[dict[str, str], float]], label: str
) -> list[tuple[dict[str, str], float]]:
    ranks = {labels[label] for labels, _ in series if label in labels}
    if len(ranks) <= 1:
        return series
    low = min(ranks, key=lambda r: (int(r) if r.isdigit() else math.inf, r))
    return [(lb, v) for lb, v in series if lb.get(label, low) == low]


def _series(text: str, sig: Signal) -> list[tuple[dict[str, str], float]]:
    """Every series of ``sig.name`` whose labels match, as (labels, value; NaN if unusable)."""
    out: list[tuple[dict[str, str], float]] = []
    name = sig.name
    needle = "\n" + name
    # ``start`` indexes the character right after the name; -1 ends the scan.
    if text.startswith(name):
        start = len(name)
    else:
        start = text.find(needle)
        if start != -1:
            start += len(needle)
    while start != -1:
        end = text.find("\n", start)
        if end == -1:
            end = len(text)
        parsed = _parse_rest(text, start, end)
        if parsed is not None:
            labels, value = parsed
            if all(labels.get(k) == v for k, v in sig.labels):
                out.append((labels, value))
        start = text.find(needle, end)
        if start != -1:
            start += len(needle)
    return out


def _parse_rest(text: str, start: int, end: int) -> tuple[dict[str, str], float] | None:
    """Parse ``{labels} value [timestamp]`` after a sample name.

    None when the name continues (``name_created``, ``name_by_reason``): not this metric. A line
    of this metric that is malformed, or whose value is not a finite non-negative number, gets
    the value NaN so that the caller treats the whole signal as unknown.
    """
    c = text[start] if start < end else "\n"
    labels: dict[str, str] = {}
    if c == "{":
        close = _parse_labels(text, start + 1, end, labels)
        if close < 0:
            return labels, math.nan
        rest = text[close + 1 : end]
    elif c == " " or c == "\t":
        rest = text[start:end]
    elif c == "\n" or c == "\r":
        return labels, math.nan  # a name with no value
    else:
        return None
    parts = rest.split()
    try:
        value = float(parts[0]) if parts else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0.0:
        value = math.nan
    return labels, value


def _parse_labels(text: str, i: int, end: int, out: dict[str, str]) -> int:
    """Parse ``k="v",...}`` from i; return the index of ``}`` or -1 when malformed."""
    while i < end:
        while i < end and text[i] in " \t,":
            i += 1
        if i < end and text[i] == "}":
            return i
        eq = text.find("=", i, end)
        if eq < 0 or eq + 1 >= end or text[eq + 1] != '"':
            return -1
        key = text[i:eq].strip()
        j = eq + 2
        chunks: list[str] = []
        while True:
            q = text.find('"', j, end)
            if q < 0:
                return -1
            bs = text.find("\\", j, q)
            if bs < 0:
                chunks.append(text[j:q])
                j = q + 1
                break
            # An escape (\\, \" or \n) before the next quote: decode it and continue.
            chunks.append(text[j:bs])
            esc = text[bs + 1 : bs + 2]
            chunks.append("\n" if esc == "n" else esc)
            j = bs + 2
        out[key] = "".join(chunks)
        i = j
    return -1


def parse_signal(text: str, *, scale: float = 1.0) -> Signal:
    """A ``Signal`` from config text: ``name`` or ``name{label="value",...}``."""
    text = text.strip()
    brace = text.find("{")
    labels: dict[str, str] = {}
    if brace < 0:
        name = text
    else:
        if _parse_labels(text, brace + 1, len(text), labels) != len(text) - 1:
            raise ValueError(f"malformed metric selector {text!r}")
        name = text[:brace]
    if not name or any(ch in name for ch in " \t\"'{}=,\n"):
        raise ValueError(f"malformed metric name in selector {text!r}")
    return Signal(name, tuple(labels.items()), scale)


def custom_names(
    base: MetricNames | None,
    *,
    waiting: str | None = None,
    running: str | None = None,
    kv_usage: str | None = None,
    engine: str = "custom",
) -> MetricNames:
    """Config selectors over ``base``: a selector given replaces that signal's alternatives, one
    omitted keeps ``base``'s (or, with no base, is never read and stays unknown)."""

    def pick(selector: str | None, inherited: tuple[Signal, ...]) -> tuple[Signal, ...]:
        return (parse_signal(selector),) if selector else inherited

    return MetricNames(
        engine=base.engine if base is not None else engine,
        waiting=pick(waiting, base.waiting if base else ()),
        running=pick(running, base.running if base else ()),
        kv_usage=pick(kv_usage, base.kv_usage if base else ()),
        rank_label=base.rank_label if base else None,
    )
