"""From repetitions to the proxy benchmark's summary, goal verdicts and markdown table.

Every derived figure is computed within one repetition first (a proxy's added latency is its
percentile minus direct's percentile from the same repetition; a ratio divides by direct's
figure from the same repetition), then the median over repetitions is reported, with the
per-repetition values kept alongside. CPU per request/chunk is the proxy's CPU over the window
divided by what the client received in it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Result = Mapping[str, Any]
Extract = Callable[[Result, Result], float | None]  # (target's rep result, direct's) -> value


def _cpu_per(result: Result, count_key: str, who: str = "proxy") -> float | None:
    cpu = result.get("cpu_s", {}).get(who)
    count = result.get(count_key)
    if cpu is None or not count:
        return None
    return float(cpu) / float(count) * 1e6


def _get(*path: str) -> Callable[[Result], float | None]:
    def get(result: Result) -> float | None:
        value: Any = result
        for key in path:
            if not isinstance(value, Mapping) or key not in value:
                return None
            value = value[key]
        return float(value) if isinstance(value, int | float) else None

    return get


def _added(*path: str) -> Extract:
    get = _get(*path)

    def added(r: Result, d: Result) -> float | None:
        a, b = get(r), get(d)
        return None if a is None or b is None else a - b

    return added


def _ratio(*path: str) -> Extract:
    get = _get(*path)

    def ratio(r: Result, d: Result) -> float | None:
        a, b = get(r), get(d)
        return None if a is None or not b else a / b

    return ratio


def _own(get: Callable[[Result], float | None]) -> Extract:
    return lambda r, d: get(r)


_UTIL = ("proxy", "upstream", "loadgen")


def _kernel_share(result: Result) -> float | None:
    """The part of the proxy's CPU spent in the kernel (syscalls, loopback TCP)."""
    total, system = _get("cpu_s", "proxy")(result), _get("cpu_sys_s", "proxy")(result)
    return None if total is None or system is None or not total else system / total


def _metrics(open_rates: list[str]) -> dict[str, tuple[str, Extract]]:
    """metric name -> (test, extractor)."""
    m: dict[str, tuple[str, Extract]] = {
        "max_rps": ("max_rps", _own(_get("rps"))),
        "max_rps_x_direct": ("max_rps", _ratio("rps")),
        "max_rps_errors": ("max_rps", _own(_get("errors"))),
        "cpu_us_per_request": ("max_rps", lambda r, d: _cpu_per(r, "requests")),
        "upstream_cpu_us_per_request": (
            "max_rps",
            lambda r, d: _cpu_per(r, "requests", "upstream"),
        ),
        "unpaced_events_per_s": ("unpaced", _own(_get("events_per_s"))),
        "unpaced_x_direct": ("unpaced", _ratio("events_per_s")),
        "unpaced_cpu_us_per_event": ("unpaced", lambda r, d: _cpu_per(r, "events")),
        "unpaced_errors": ("unpaced", _own(_get("errors"))),
        "paced_cpu_us_per_chunk": ("paced", lambda r, d: _cpu_per(r, "events")),
        "paced_events_per_s": ("paced", _own(_get("events_per_s"))),
        "paced_errors": ("paced", _own(_get("errors"))),
        "idle_kib_per_stream": (
            "idle",
            lambda r, d: (
                None
                if _get("bytes_per_stream", "proxy")(r) is None
                else float(r["bytes_per_stream"]["proxy"]) / 1024.0
            ),
        ),
    }
    for q in ("p50", "p99"):
        m[f"ttft_{q}_ms"] = ("paced", _own(_get("ttft_ms", q)))
        m[f"ttft_added_{q}_ms"] = ("paced", _added("ttft_ms", q))
    for q in ("p50", "p99", "p999"):
        m[f"gap_{q}_ms"] = ("paced", _own(_get("gap_ms", q)))
    m["gap_added_p99_ms"] = ("paced", _added("gap_ms", "p99"))
    for test in ("max_rps", "unpaced", "paced"):
        for who in _UTIL:
            m[f"{test}_{who}_cpu_util"] = (test, _own(_get("cpu_util", who)))
        m[f"{test}_proxy_kernel_share"] = (test, _own(_kernel_share))
    for rate in open_rates:
        key = f"open:{rate}"
        for q in ("p50", "p99"):
            m[f"open{rate}_{q}_ms"] = (key, _own(_get("latency_ms", q)))
            m[f"open{rate}_added_{q}_ms"] = (key, _added("latency_ms", q))
        m[f"open{rate}_cpu_us_per_request"] = (key, lambda r, d: _cpu_per(r, "requests"))
        m[f"open{rate}_errors"] = (key, _own(_get("errors")))
        m[f"open{rate}_lateness_p99_ms"] = (key, _own(_get("send_lateness_ms", "p99")))
    return m


def _test_result(rep: Mapping[str, Any], target: str, test: str) -> Result | None:
    runs = rep.get(target, {})
    found = runs.get("open", {}).get(test[5:]) if test.startswith("open:") else runs.get(test)
    return found if isinstance(found, Mapping) else None


# Figures compared with a reference proxy's in the same repetition: machine speed cancels out.
RELATIVE = {"cpu_us_per_request": "request_cpu", "paced_cpu_us_per_chunk": "chunk_cpu"}
REFERENCES = ("nginx", "aiohttp-baseline", "sglang-router", "vllm-router")


def summarize(raw: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """target -> metric -> {"median", "values"} over the repetitions."""
    reps: list[Mapping[str, Any]] = raw["reps"]
    rates = sorted({r for rep in reps for t in rep.values() for r in t.get("open", {})}, key=float)
    metrics = _metrics(rates)
    per_rep: dict[str, dict[str, list[float | None]]] = {}
    for target in raw["targets"]:
        per_rep[target] = {}
        for name, (test, extract) in metrics.items():
            row: list[float | None] = []
            for rep in reps:
                r, d = _test_result(rep, target, test), _test_result(rep, "direct", test)
                row.append(None if r is None else extract(r, d or {}))
            per_rep[target][name] = row
    for target in raw["targets"]:
        for metric, short in RELATIVE.items():
            for ref in REFERENCES:
                if ref not in per_rep or ref == target:
                    continue
                mine, theirs = per_rep[target][metric], per_rep[ref][metric]
                per_rep[target][f"{short}_x_{ref}"] = [
                    None if a is None or not b else a / b for a, b in zip(mine, theirs, strict=True)
                ]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for target, rows in per_rep.items():
        out[target] = {}
        for name, row in rows.items():
            values = [v for v in row if v is not None]
            if values:
                out[target][name] = {"median": statistics.median(values), "values": values}
    return out


@dataclass(frozen=True)
class Goal:
    key: str
    text: str
    metric: str
    limit: float
    below: bool = False  # strictly below the limit ("below X's"), not at most

    def met(self, value: float) -> bool:
        return value < self.limit if self.below else value <= self.limit


GOALS = (
    Goal("chunk_cpu", "CPU per relayed SSE chunk (paced) ≤ 14 µs", "paced_cpu_us_per_chunk", 14),
    Goal("chunk_cpu_nginx", "… relative: ≤ 1.5 × nginx's, same run", "chunk_cpu_x_nginx", 1.5),
    Goal(
        "chunk_cpu_baseline",
        "… relative: ≤ 0.52 × aiohttp-baseline's (14/27 µs), same run",
        "chunk_cpu_x_aiohttp-baseline",
        14 / 27,
    ),
    Goal(
        "chunk_cpu_sglang",
        "… relative: below sglang-router's, same run",
        "chunk_cpu_x_sglang-router",
        1.0,
        below=True,
    ),
    Goal(
        "chunk_cpu_vllm",
        "… relative: below vllm-router's, same run",
        "chunk_cpu_x_vllm-router",
        1.0,
        below=True,
    ),
    Goal("ttft_p50", "added TTFT p50 ≤ 0.5 ms (256 streams)", "ttft_added_p50_ms", 0.5),
    Goal("ttft_p99", "added TTFT p99 ≤ 3 ms (256 streams)", "ttft_added_p99_ms", 3.0),
    Goal("request_cpu", "CPU per non-streaming request ≤ 80 µs", "cpu_us_per_request", 80),
    Goal(
        "request_cpu_baseline",
        "… relative: ≤ 0.51 × aiohttp-baseline's (80/158 µs), same run",
        "request_cpu_x_aiohttp-baseline",
        80 / 158,
    ),
    Goal("request_cpu_stretch", "stretch: ≤ 63 µs (vllm-router)", "cpu_us_per_request", 63),
    Goal(
        "request_cpu_stretch_vllm",
        "… relative: below vllm-router's, same run",
        "request_cpu_x_vllm-router",
        1.0,
        below=True,
    ),
    Goal("open_p50", "open loop 1,500 req/s: added p50 ≤ 0.3 ms", "open1500_added_p50_ms", 0.3),
    Goal("open_p99", "open loop 1,500 req/s: added p99 ≤ 1 ms", "open1500_added_p99_ms", 1.0),
    Goal("idle_memory", "memory per open idle stream ≤ 64 KiB", "idle_kib_per_stream", 64),
)


def goals(summary: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for goal in GOALS:
        values = {t: m[goal.metric]["median"] for t, m in summary.items() if goal.metric in m}
        values.pop("direct", None)
        out.append(
            {
                "goal": goal.key,
                "text": goal.text,
                "metric": goal.metric,
                "limit": goal.limit,
                "values": values,
                "met": {t: goal.met(v) for t, v in values.items()},
            }
        )
    return out


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _conditions(plan: Mapping[str, Any]) -> str:
    rt = ", ".join(plan.get("realtime_tests", ())) or "none"
    return (
        f"Proxy alone on CPU 0; upstream, load generator and orchestrator on CPU 1. Tests under "
        f"SCHED_RR: {rt}; the others under CFS at nice {plan['nice']}, so on a shared machine "
        "their req/s and events/s are indicative only. CPU per request/chunk is the proxy's own "
        "accounting (utime + stime) over the window, divided by what the client received; "
        f"paced streams: {plan['streams']} × {plan['paced_events']} events, one per "
        f"{plan['paced_interval_ms']:g} ms; unpaced: {plan['streams']} × "
        f"{plan['unpaced_events']} events written at once."
    )


def markdown(result: Mapping[str, Any]) -> str:
    summary: Mapping[str, Mapping[str, Mapping[str, Any]]] = result["summary"]
    plan = result["plan"]

    def v(target: str, metric: str) -> float | None:
        entry = summary.get(target, {}).get(metric)
        return None if entry is None else float(entry["median"])

    rate = str(int(max(plan["open_rates"])))
    lines = [
        f"## Proxy overhead ({plan['name']}: {plan['reps']} repetition(s), medians)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(result['machine']['before']['time']))}"
        f" UTC; {result['machine']['before']['cpus']} CPUs, pinned: {result['pinned']}; load"
        f" average before/after: {result['machine']['before']['loadavg'][0]:.1f} / "
        f"{result['machine']['after']['loadavg'][0]:.1f}. Added = proxy minus direct, same "
        "repetition.",
        "",
        _conditions(plan),
        "",
        f"| proxy | max req/s (c={plan['concurrency']}) | × direct | CPU µs/request "
        f"| open {rate}/s added p50 / p99 ms | unpaced SSE events/s | × direct "
        "| paced CPU µs/chunk | paced added TTFT p50 / p99 ms | gap p99 ms | KiB/idle stream |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in summary:
        lines.append(
            f"| {t} | {_fmt(v(t, 'max_rps'))} | {_fmt(v(t, 'max_rps_x_direct'), 2)} "
            f"| {_fmt(v(t, 'cpu_us_per_request'))} "
            f"| {_fmt(v(t, f'open{rate}_added_p50_ms'), 2)} / "
            f"{_fmt(v(t, f'open{rate}_added_p99_ms'), 2)} "
            f"| {_fmt(v(t, 'unpaced_events_per_s'))} | {_fmt(v(t, 'unpaced_x_direct'), 2)} "
            f"| {_fmt(v(t, 'paced_cpu_us_per_chunk'))} "
            f"| {_fmt(v(t, 'ttft_added_p50_ms'), 2)} / {_fmt(v(t, 'ttft_added_p99_ms'), 2)} "
            f"| {_fmt(v(t, 'gap_p99_ms'), 2)} | {_fmt(v(t, 'idle_kib_per_stream'))} |"
        )
    lines += [
        "",
        "Direct row: absolute figures (open-loop / TTFT columns are then 0 by definition).",
    ]
    lines += ["", "| goal | " + " | ".join(t for t in summary if t != "direct") + " |"]
    lines.append("|---|" + "---|" * (len(summary) - 1))
    for g in result["goals"]:
        cells = []
        for t in summary:
            if t == "direct":
                continue
            value = g["values"].get(t)
            mark = "" if value is None else (" ✅" if g["met"][t] else " ❌")
            cells.append(_fmt(value, 2) + mark)
        lines.append(f"| {g['text']} | " + " | ".join(cells) + " |")
    lines += ["", "CPU use of each process during the tests (1.0 = one core):", ""]
    lines.append(
        "| test | proxy | proxy CPU | of which kernel | upstream CPU | load generator CPU |"
    )
    lines.append("|---|---|---|---|---|---|")
    for test in ("max_rps", "unpaced", "paced"):
        for t in summary:
            cells = [_fmt(v(t, f"{test}_{who}_cpu_util"), 2) for who in _UTIL]
            cells.insert(1, _fmt(v(t, f"{test}_proxy_kernel_share"), 2))
            lines.append(f"| {test} | {t} | " + " | ".join(cells) + " |")
    if result["notes"]:
        lines += ["", "Notes: " + "; ".join(result["notes"])]
    flag = " --quick" if plan["name"] == "quick" else ""
    lines += ["", f"Reproduce: `make bench-proxy` (or `python -m benchmarks.proxy{flag}`).", ""]
    return "\n".join(lines)
