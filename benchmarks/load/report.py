"""Per-request records, percentiles and the summary every load experiment prints and saves.

``RequestRecord`` is one request as a client saw it (live runs fill it from the wire, the
discrete-event simulator from virtual time); ``summarize`` turns a list of them into the
summary dict written as JSON; ``format_table`` renders that dict for a terminal.

Conventions: times in seconds; percentiles by linear interpolation between order statistics
(numpy's default), over successful requests only; inter-token latency (ITL) percentiles pool
every gap between consecutive content chunks of every successful request (as vLLM's
``benchmark_serving`` does), while TPOT is per request, ``(e2e - ttft) / (output_tokens - 1)``.
An empty sample gives ``None``, never 0. ``nearest_rank`` and ``weighted_quantiles`` are the
other convention, nearest rank (rank ``round(q/100 * n + 0.5)``), which the simulators' and the
routing experiments' figures use; ``format_rows`` aligns a benchmark's label/value table.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# Why a request failed, from the client's side. ``http_<status>`` covers every non-200 answer.
ERROR_KINDS = (
    "connect",  # no response: refused, reset or closed before the status line
    "timeout",  # the client's own deadline
    "disconnect",  # the connection broke after the response started
    "stream_error",  # an SSE event carried an ``error`` object
    "missing_done",  # the stream ended cleanly but without ``data: [DONE]``
    "bad_response",  # a 200 whose body is not the expected JSON
)


@dataclass(slots=True)
class RequestRecord:
    """One request's outcome; ``None`` means not measured (not applicable or failed first)."""

    index: int
    prompt_tokens: int
    max_tokens: int
    group: int | None = None
    scheduled_s: float | None = None  # planned send time from the run start (open loop)
    sent_s: float = 0.0  # actual send time from the run start
    ok: bool = False
    error: str | None = None  # one of ERROR_KINDS or ``http_<status>``
    status: int | None = None
    output_tokens: int = 0
    ttft_s: float | None = None  # send -> first content chunk (streaming only)
    e2e_s: float | None = None  # send -> last byte
    itl_s: list[float] = field(default_factory=list)  # gaps between content chunks

    @property
    def lateness_s(self) -> float | None:
        return None if self.scheduled_s is None else self.sent_s - self.scheduled_s

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["lateness_s"] = self.lateness_s
        return out


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of already sorted values, linear interpolation."""
    n = len(sorted_values)
    if n == 0:
        return None
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def nearest_rank(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile (q in [0, 100]) of an already sorted sequence; NaN when empty."""
    if not ordered:
        return math.nan
    k = max(0, min(len(ordered) - 1, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[k]


def weighted_quantiles(pairs: Sequence[tuple[float, int]], qs: Sequence[float]) -> list[float]:
    """Nearest-rank percentiles of values given as (value, count) pairs, e.g. per-step ITL, one
    sort for all of ``qs``; NaN each when the counts sum to 0."""
    total = sum(n for _, n in pairs)
    if total == 0:
        return [math.nan] * len(qs)
    ordered = sorted(pairs)
    out: list[float] = []
    for q in qs:
        rank = max(1, round(q / 100.0 * total + 0.5))
        acc = 0
        value = ordered[-1][0]
        for v, n in ordered:
            acc += n
            if acc >= rank:
                value = v
                break
        out.append(value)
    return out


def distribution(values: Iterable[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, Any]:
    """``{"n", "mean", "p50", ..., "max"}`` of the values; statistics ``None`` when empty."""
    xs = sorted(values)
    out: dict[str, Any] = {"n": len(xs), "mean": math.fsum(xs) / len(xs) if xs else None}
    for q in qs:
        out[f"p{q:g}"] = percentile(xs, q)
    out["max"] = xs[-1] if xs else None
    return out


def summarize(
    records: Sequence[RequestRecord],
    *,
    duration_s: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's summary; ``duration_s`` is the wall (or virtual) time the throughput is over."""
    ok = [r for r in records if r.ok]
    errors = Counter(r.error or "unknown" for r in records if not r.ok)
    out_tokens = sum(r.output_tokens for r in ok)
    late = [x for r in records if (x := r.lateness_s) is not None]
    last_send = max((r.sent_s for r in records), default=0.0)
    summary: dict[str, Any] = {
        "requests": {"total": len(records), "ok": len(ok), "errors": dict(sorted(errors.items()))},
        "duration_s": duration_s,
        "throughput": {
            # Offered: how fast requests left (open loop: should match the target rate).
            "sent_per_s": len(records) / last_send if last_send > 0 else None,
            "requests_per_s": len(ok) / duration_s if duration_s > 0 else None,
            "output_tokens_per_s": out_tokens / duration_s if duration_s > 0 else None,
        },
        "ttft_s": distribution(r.ttft_s for r in ok if r.ttft_s is not None),
        "itl_s": distribution(gap for r in ok for gap in r.itl_s),
        "tpot_s": distribution(x for r in ok if (x := r.tpot_s) is not None),
        "e2e_s": distribution(r.e2e_s for r in ok if r.e2e_s is not None),
        "output_tokens": distribution(r.output_tokens for r in ok),
        "send_lateness_s": distribution(late, qs=(50, 99)),
    }
    if extra:
        summary.update(extra)
    return summary


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def format_table(summary: Mapping[str, Any], title: str = "") -> str:
    """A fixed-width table of the latency distributions (ms) plus the headline counters."""
    lines = [title] if title else []
    req = summary["requests"]
    thr = summary["throughput"]
    rate = thr["requests_per_s"]
    tok = thr["output_tokens_per_s"]
    lines.append(
        f"requests {req['ok']}/{req['total']} ok"
        + (f", errors {req['errors']}" if req["errors"] else "")
        + f"  |  {summary['duration_s']:.1f} s"
        + (f", {rate:.2f} req/s done, {tok:.0f} output tok/s" if rate is not None else "")
        + (f", sent at {sent:.2f} req/s" if (sent := thr["sent_per_s"]) is not None else "")
    )
    header = f"{'metric (ms)':<16}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}{'max':>10}{'n':>9}"
    lines += [header, "-" * len(header)]
    for key, label in (
        ("ttft_s", "TTFT"),
        ("itl_s", "ITL"),
        ("tpot_s", "TPOT"),
        ("e2e_s", "E2E"),
        ("send_lateness_s", "send lateness"),
    ):
        d = summary[key]
        lines.append(
            f"{label:<16}{_ms(d['p50']):>10}{_ms(d.get('p90')):>10}{_ms(d['p99']):>10}"
            f"{_ms(d['mean']):>10}{_ms(d['max']):>10}{d['n']:>9}"
        )
    client = summary.get("client")
    if client:
        lag = client["loop_lag_s"]
        lines.append(
            f"client: cpu {client['cpu_s']:.2f} s ({client['cpu_util'] * 100:.0f}% of one core), "
            f"loop lag p50/p99 {_ms(lag['p50'])}/{_ms(lag['p99'])} ms, "
            f"preempted {client['involuntary_context_switches']}x, "
            f"in flight max {client['inflight_max']}, mean {client['inflight_mean']:.1f}"
        )
    return "\n".join(lines)


def format_rows(rows: Sequence[tuple[str, object]]) -> str:
    """``label  value`` lines, the labels padded to the longest."""
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
