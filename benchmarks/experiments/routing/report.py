"""Markdown report of the routing experiment, rendered from ``results.json`` data only.

Every number in the report comes from the results, so the report and the JSON committed beside
it cannot disagree. Sentences that interpret are chosen by the data: a met goal is stated as
met, a missed one with its size and the measurements that explain it.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.experiments.routing import goals
from benchmarks.experiments.routing.findings import (
    findings,
    fmt,
    gap_analysis,
    misses,
    p99,
    seed_range,
)
from benchmarks.experiments.routing.plan import (
    BOUNDS,
    DEFAULT_INTERVAL_S,
    DIAGNOSTIC_ROWS,
    EXACT_GAUGES_ROW,
    HEADLINE_RATES,
    MAIN_ROWS,
    P2C_FAMILY,
    settings_from,
)
from benchmarks.experiments.routing.schema import Goal, Results, cells_of, find

LIVE_PENDING = "Not run for this report (see `validate_live.py`, `make bench-routing-live`)."


def headline_table(results: Results) -> str:
    cells = cells_of(results, "headline")
    lines = [
        "| rate | policy | TTFT p50 s | p90 s | p99 s (seed range) | ITL p50/p99 ms | E2E p99 s "
        "| out tok/s | max waiting | KV spread | preempt./run | lost |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rate in HEADLINE_RATES:
        for row in MAIN_ROWS + DIAGNOSTIC_ROWS:
            c = find(cells, row, rate)
            if c is None:
                continue
            label = f"*{row}* (diagnostic)" if row in DIAGNOSTIC_ROWS else row
            lines.append(
                f"| {rate:g} | {label} | {fmt(c['ttft_p50_s'])} | {fmt(c['ttft_p90_s'])} "
                f"| **{fmt(c['ttft_p99_s'])}** ({seed_range(c)}) "
                f"| {1000 * c['itl_p50_s']:.0f}/{1000 * c['itl_p99_s']:.0f} "
                f"| {fmt(c['e2e_p99_s'], 1)} | {c['output_tokens_per_s']:.0f} | {c['max_waiting']} "
                f"| {fmt(c['kv_spread_mean'])} | {c['preemptions_per_run']:.0f} | {c['lost']} |"
            )
    return "\n".join(lines)


def _goals_table(items: Sequence[Goal]) -> str:
    lines = ["| goal | rate | target | measured | met |", "|---|---|---|---|---|"]
    for g in items:
        met = "**yes**" if g["met"] else "**no**"
        lines.append(f"| {g['goal']} | {g['rate']:g} | {g['target']} | {g['measured']} | {met} |")
    return "\n".join(lines)


def _bound_table(results: Results) -> str:
    lb = results["late_binding"]
    sweep = lb["sweep"]
    if not sweep:
        return f"No sweep in this run (quick mode): bound `{lb['chosen']}` used."
    top = HEADLINE_RATES[-1]
    lines = [
        "| bound | "
        + " | ".join(f"p99 s @{r:g} (seeds)" for r in HEADLINE_RATES)
        + f" | held/run @{top:g} | buffer wait p99 s @{top:g} |",
        "|---|" + "---|" * (len(HEADLINE_RATES) + 2),
    ]
    for label in BOUNDS:
        row = [c for c in sweep if c["row"] == label]
        if not row:
            continue
        p99s = []
        for rate in HEADLINE_RATES:
            c = find(row, rate=rate)
            p99s.append(f"{p99(c)} ({seed_range(c)})" if c else "-")
        t = find(row, rate=top)
        tail = (
            f" | {t['held_per_run']:.0f} | {fmt(t['buffer_wait_p99_s'])} |" if t else " | - | - |"
        )
        mark = " **(chosen)**" if label == lb["chosen"] else ""
        lines.append(f"| `{label}`{mark} | " + " | ".join(p99s) + tail)
    return "\n".join(lines)


def _load_table(results: Results) -> str:
    cells = cells_of(results, "load")
    fracs = sorted({c["axis"] for c in cells})
    cap = results["capacity"]["cluster_rps"]
    lines = [
        "| policy | " + " | ".join(f"{f:.0%} ({f * cap:.1f}/s)" for f in fracs) + " |",
        "|---|" + "---|" * len(fracs),
    ]
    for row in MAIN_ROWS:
        vals = [find(cells, row, axis=f) for f in fracs]
        if any(vals):
            lines.append(f"| {row} | " + " | ".join(p99(c) for c in vals) + " |")
    return "\n".join(lines)


def _scrape_table(results: Results) -> str:
    cells = cells_of(results, "scrape")
    intervals = sorted({c["axis"] for c in cells})
    lines = [
        "| rate | policy | " + " | ".join(f"{i:g} s" for i in intervals) + " |",
        "|---|---|" + "---|" * len(intervals),
    ]
    for rate in HEADLINE_RATES:
        for row in (*P2C_FAMILY, EXACT_GAUGES_ROW):
            vals = [find(cells, row, rate, i) for i in intervals]
            label = f"*{row}* (diagnostic)" if row == EXACT_GAUGES_ROW else row
            if any(vals):
                lines.append(f"| {rate:g} | {label} | " + " | ".join(p99(c) for c in vals) + " |")
    return "\n".join(lines)


def _gateway_table(results: Results) -> str:
    cells = cells_of(results, "gateways")
    ks = sorted({c["axis"] for c in cells})
    lines = [
        "| rate | policy | "
        + " | ".join(f"{k:g} gw p99 s" for k in ks)
        + " | gain kept at "
        + ", ".join(f"{k:g}" for k in ks[1:])
        + " gw |",
        "|---|---|" + "---|" * (len(ks) + 1),
    ]
    for rate in HEADLINE_RATES:
        rr = find(cells, "round_robin", rate)
        for row in ("round_robin", "least_request", "p2c", "p2c_late_binding"):
            vals = [find(cells, row, rate, k) for k in ks]
            first = vals[0]
            if not any(vals):
                continue
            kept = "-"
            if rr is not None and first is not None and row != "round_robin":
                gain = rr["ttft_p99_s"] - first["ttft_p99_s"]
                kept = ", ".join(
                    f"{(rr['ttft_p99_s'] - v['ttft_p99_s']) / gain:.0%}" if v and gain > 0 else "-"
                    for v in vals[1:]
                )
            lines.append(
                f"| {rate:g} | {row} | " + " | ".join(p99(v) for v in vals) + f" | {kept} |"
            )
    return "\n".join(lines)


def _prefix_table(results: Results) -> str:
    cells = sorted(cells_of(results, "prefix"), key=lambda c: (c["rate"], c["row"]))
    lines = [
        "| rate | policy | TTFT p50 s | p99 s | E2E p99 s | out tok/s | KV mean | preempt./run "
        "| affinity hits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        total = sum(c["reasons"].values()) or 1
        hits = (
            f"{c['reasons'].get('affinity_hit', 0) / total:.0%}"
            if c["row"] == "prefix_affinity"
            else "-"
        )
        lines.append(
            f"| {c['rate']:g} | {c['row']} | {fmt(c['ttft_p50_s'])} | {p99(c)} "
            f"| {fmt(c['e2e_p99_s'], 1)} | {c['output_tokens_per_s']:.0f} | {fmt(c['kv_mean'])} "
            f"| {c['preemptions_per_run']:.0f} | {hits} |"
        )
    return "\n".join(lines)


def _series_text(results: Results) -> str:
    head = cells_of(results, "headline")
    parts = []
    for row in ("round_robin", "p2c"):
        c = find(head, row, HEADLINE_RATES[0])
        if c:
            parts.append(
                f"{row}: max waiting {c['max_waiting']}, mean KV spread across replicas "
                f"{fmt(c['kv_spread_mean'])}, {c['preemptions_per_run']:.0f} preemptions per run"
            )
    return "; ".join(parts)


def render(results: Results) -> str:
    meta, cap, speed = results["meta"], results["capacity"], results["speed"]
    st = settings_from(meta["settings"])
    cluster = cap["cluster_rps"]
    head = cells_of(results, "headline")
    per_cell = max((c["requests"] for c in head), default=0)
    late_goals = [
        g for g in goals.evaluate(head, row="p2c_late_binding") if "p2c_late_binding" in g["goal"]
    ]
    quick = " **(quick mode: short runs, for CI - not the committed result)**" if st.quick else ""
    loads = ", ".join(f"{r:g} req/s = {100 * r / cluster:.0f}%" for r in HEADLINE_RATES)
    misses_text = "\n".join(misses(results)) or "Every goal is met."
    findings_text = "\n".join(findings(results)) or "None beyond the tables (short runs)."
    lost = sum(c["lost"] for c in results["cells"])
    load_list = ", ".join(f"{100 * x:.0f}%" for x in st.load_fractions)
    rates = " and ".join(f"{r:g}" for r in HEADLINE_RATES)
    chosen = results["late_binding"]["chosen"]
    sweep_text = (
        f" Bounds were compared on seeds {list(st.bound_seeds)} (disjoint from the headline "
        f"seeds), {st.bound_s / 60:g} min each; the lowest pooled p99 at "
        f"{HEADLINE_RATES[-1]:g} req/s was kept."
        if st.bounds
        else ""
    )
    return f"""# Routing quality: 8 x A10G + Llama-3.1-8B, discrete-event simulation{quick}

Generated by `{meta["command"]}` ({meta["generated"]}): {meta["runs"]} runs, {meta["cpu_s"]:.0f}
CPU-seconds, {meta["wall_s"]:.0f} s wall with {meta["processes"]} worker process(es). Numbers:
[`results.json`](results.json). Question and method: [`README.md`](README.md).

**Setup.** 8 replicas of the `a10g-llama3-8b` engine model (vLLM V1 continuous batching,
chunked prefill, 34K-token paged KV cache with preemption; calibrated to the KubeCon 2024
talk), OpenOrca-like lengths (input and output 16-1600 tokens, means 540 and 415), streaming,
open-loop Poisson arrivals; one gateway scraping every {DEFAULT_INTERVAL_S:g} s (stale after 4
intervals); the unchanged `policies/` objects decide.

**Capacity.** Measured saturation throughput {fmt(cap["per_replica_rps"], 3)} req/s per replica
({cap["method"]}), so **{cluster:.2f} req/s** for the cluster: {loads}.

**Run length and confidence.** Headline cells: {len(st.headline_seeds)} seed(s) x
{st.headline_s / 60:g} simulated minutes after a {st.warmup_s:g} s warm-up (about {per_cell}
requests per cell). TTFT and E2E quantiles pool every seed's requests; the bracket after a p99
is its range over seeds. Near the knee a p99 is set by a handful of bursts per run, so that
range is wide, and it is the honest error bar: differences inside it are not established.
Sweeps use fewer seeds and shorter runs ({st.load_s / 60:g} min per load point,
{st.scrape_s / 60:g} min per scrape interval, {len(st.gateway_seeds)} x {st.gateway_s / 60:g} min
per gateway count): read them for shape. Requests lost, all cells together: {lost}
(rejections by a gateway buffer + unfinished; must be 0).

## Goals

{_goals_table(results["goals"])}

{misses_text}

Where the gap to the oracle goes (TTFT p99):

{gap_analysis(results)}

The same checks for the late-binding row (`p2c_late_binding`, bound `{chosen}`):

{_goals_table(late_goals)}

## Findings

{findings_text}

## Results at {rates} req/s

{headline_table(results)}

TTFT: gateway arrival to first token (gateway buffer, front end, engine queue and prefill).
ITL: per decode token, weighted. Max waiting: largest `num_requests_waiting` on any replica at
any step. KV spread: mean over 1 s samples of (max - min) KV usage across replicas. Preemptions
per run of {st.headline_s / 60:g} min.

![TTFT CDF at {rates} req/s](ttft_cdf.png)

## The talk's figures: per-replica KV usage and queues, round_robin vs p2c

At {HEADLINE_RATES[0]:g} req/s, first {st.series_window_s / 60:g} min of the measured window of
seed {st.headline_seeds[0]}. {_series_text(results)}.

![per-replica KV usage and waiting over time](replica_timeseries.png)

## Late binding: choosing the saturation bound

p2c plus a `Saturation` bound: when every replica is past it, requests wait at the gateway
(FIFO, the live buffer's defaults: 1000 requests, 120 s) and each goes to a replica the moment
a completion or a scrape shows room.{sweep_text}

{_bound_table(results)}

## TTFT p99 against load ({load_list} of capacity), seconds

{_load_table(results)}

![TTFT p99 against offered load](ttft_p99_vs_load.png)

## Scrape interval (p2c family), TTFT p99 in seconds

`max_metrics_age_s` is 4 intervals throughout, so a slow scrape means old data, not none.

{_scrape_table(results)}

![TTFT p99 against scrape interval](ttft_p99_vs_scrape.png)

## Multiple gateways sharing the 8 replicas

Each gateway sees only its own in-flight counts and scrapes on its own phase; arrivals are
split round-robin among them. "Gain kept" = (round_robin p99 - p99 with k gateways) /
(round_robin p99 - p99 with 1 gateway).

{_gateway_table(results)}

![TTFT p99 with 1, 2 and 4 gateways](gateways.png)

## Prefix affinity on a shared-prefix workload

16 system prompts of 2048 tokens (about one replica's whole KV cache together), 64 questions of
128 tokens behind each, 256 output tokens; `prefix_affinity` (its index sized like one
replica's KV cache) against p2c and round_robin on the same arrivals.

{_prefix_table(results)}

## Simulator speed

{speed["scenario"]}: **{speed["sim_s_per_cpu_s"]:g} simulated seconds per CPU second**
({speed["sim_s_per_wall_s"]:g} per wall second, with the other runs sharing the machine).

## Validation against live

{results.get("live", LIVE_PENDING)}
"""
