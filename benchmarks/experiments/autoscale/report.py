"""report.md and the PNG figures from the experiment's results (matplotlib, Agg backend).

Figures: ``replicas-<scenario>.png`` (replicas over time against the offered load, one line
per signal: the ``kubectl get hpa -w`` picture as a graph), ``ttft-<scenario>.png`` (p99 TTFT
per 30 s of arrivals), ``cost-vs-slo.png`` (GPU-hours against 1 s attainment, every grid run),
``from-zero.png`` (KEDA from zero: kvgate's buffer against a plain Service).

The verdict ("which signal") is computed here from the grid's HPA runs with the recommended
behavior over the step, ramp and bursts scenarios: requests served under 1 s TTFT per GPU-hour,
summed over the three (a request that fails the SLO, waits too long or is lost counts against
the signal through the numerator; over-provisioning through the denominator).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

Result = Mapping[str, Any]
MAIN_SCENARIOS = ("step", "ramp", "bursts")
COLORS = {
    "concurrency": "tab:blue",
    "kv": "tab:orange",
    "waiting": "tab:green",
    "gpu_util": "tab:red",
    "rate": "tab:purple",
}


def _spec(r: Result) -> Mapping[str, Any]:
    s: Mapping[str, Any] = r["spec"]
    return s


def _pick(
    grid: Sequence[Result],
    scenario: str,
    controller: str = "hpa",
    *,
    buffered: bool = True,
    baseline: bool = True,
) -> list[Result]:
    """Grid runs of one scenario/controller with the default cold start, buffer and bounds."""
    out = []
    for r in grid:
        s = _spec(r)
        if s["scenario"] != scenario or s["controller"] != controller:
            continue
        if s["buffered"] != buffered:
            continue
        if baseline and (s["cold_start_s"] != 75.0 or s["max_inflight"] is not None):
            continue
        out.append(r)
    return out


def pooled(runs: Sequence[Result]) -> dict[tuple[str, float], dict[str, float]]:
    """Per (signal, target): requests under 1 s per GPU-hour over the scenarios swept, pooled,
    and the mean 1 s attainment."""
    acc: dict[tuple[str, float], list[float]] = {}
    for r in runs:
        spec = _spec(r)
        a = acc.setdefault((str(spec["signal"]), float(spec["target"])), [0.0, 0.0, 0.0, 0.0])
        a[0] += float(r["slo_1s"]) * float(r["requests"])
        a[1] += float(r["gpu_hours"])
        a[2] += float(r["slo_1s"])
        a[3] += 1
    return {
        k: {"good_per_gpu_hour": g / h if h else 0.0, "attainment": s / n, "gpu_hours": h}
        for k, (g, h, s, n) in acc.items()
    }


def verdict(data: Mapping[str, Any]) -> dict[str, Any]:
    grid: Sequence[Result] = data["grid"]
    per: dict[str, dict[str, float]] = {}
    for sc in MAIN_SCENARIOS:
        for r in _pick(grid, sc):
            sig = _spec(r)["signal"]
            acc = per.setdefault(sig, {"good": 0.0, "gpu_h": 0.0, "attain": 0.0, "n": 0.0})
            acc["good"] += r["slo_1s"] * r["requests"]
            acc["gpu_h"] += r["gpu_hours"]
            acc["attain"] += r["slo_1s"]
            acc["n"] += 1
    if not per:
        return {}
    table = {
        sig: {
            "good_per_gpu_hour": a["good"] / a["gpu_h"] if a["gpu_h"] else 0.0,
            "mean_attainment": a["attain"] / a["n"],
            "gpu_hours": a["gpu_h"],
        }
        for sig, a in per.items()
    }
    best_attain = max(v["mean_attainment"] for v in table.values())
    winner = max(table, key=lambda k: table[k]["good_per_gpu_hour"])
    w = table[winner]["good_per_gpu_hour"]
    margins = {
        k: (w / v["good_per_gpu_hour"] - 1.0) if v["good_per_gpu_hour"] else math.inf
        for k, v in table.items()
        if k != winner
    }
    return {"winner": winner, "table": table, "margins": margins, "best_attain": best_attain}


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _row(r: Result) -> str:
    s = _spec(r)
    front = "kvgate" if s["buffered"] else "Service"
    if s["buffered"] and s["max_inflight"] is not None:
        front += f" (bound {s['max_inflight']})"
    if s["buffered"] and (s["max_wait_s"] != 120.0 or s["max_queued"] != 1000):
        front += f" (max_wait {s['max_wait_s']:g} s, max_queued {s['max_queued']})"
    return (
        f"| {s['scenario']} | {s['controller']} | {s['signal']} = {s['target']:g} | {front} "
        f"| {s['cold_start_s']:g} | {_fmt(r['ttft_p50_s'])} | {_fmt(r['ttft_p99_s'], 1)} "
        f"| {100 * r['slo_1s']:.1f} | {100 * r['slo_custom']:.1f} | {r['gpu_hours']:.2f} "
        f"| {r['good_per_gpu_hour']:.0f} | {r['scale_events']} | {r['reversals']} "
        f"| {_fmt(r['time_to_enough_s'], 0)} | {r['underprovisioned_s']:.0f} "
        f"| {r['rejected']} | {r['lost']} |"
    )


HEADER = (
    "| scenario | controller | signal = target | front end | cold start s | TTFT p50 s "
    "| TTFT p99 s | TTFT ≤ 1 s % | TTFT ≤ SLO % | GPU-h | good req / GPU-h | scale events "
    "| reversals | to enough s | under-provisioned s | rejected (503) | lost |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def write_report(data: Mapping[str, Any], out: Path) -> None:
    grid: Sequence[Result] = data["grid"]
    figures = _plots(data, out)
    v = verdict(data)
    slo_s = _spec(grid[0])["slo_s"] if grid else 2.0
    lines = [
        "# Autoscaling experiment: which signal should scale LLM replicas",
        "",
        "Generated by `python -m benchmarks.experiments.autoscale`"
        + (" --quick (shortened plan: not the committed figures)" if data["quick"] else "")
        + f"; {data['wall_s']:.0f} s wall. Question and method: README.md.",
        "",
    ]
    if v:
        w = v["winner"]
        lines += [
            "## Verdict",
            "",
            f"**{w}** gives the most requests under 1 s TTFT per GPU-hour over the step, ramp "
            f"and bursts scenarios (HPA, recommended behavior, targets from the sweep): "
            f"{v['table'][w]['good_per_gpu_hour']:.0f} good requests per GPU-hour at "
            f"{100 * v['table'][w]['mean_attainment']:.1f} % mean attainment.",
            "",
            "| signal | target | good req / GPU-h | mean TTFT ≤ 1 s % | GPU-h (3 scenarios) "
            "| winner ahead by |",
            "|---|---|---|---|---|---|",
        ]
        for sig, t in sorted(v["table"].items(), key=lambda kv: -kv[1]["good_per_gpu_hour"]):
            m = v["margins"].get(sig)
            lines.append(
                f"| {sig} | {data['chosen_targets'][sig]:g} | {t['good_per_gpu_hour']:.0f} "
                f"| {100 * t['mean_attainment']:.1f} | {t['gpu_hours']:.2f} "
                f"| {'-' if m is None else f'{100 * m:+.0f} %'} |"
            )
        lines += ["", "Per scenario (good requests per GPU-hour; TTFT ≤ 1 s %; GPU-hours):", ""]
        lines += ["| scenario | " + " | ".join(v["table"]) + " |"]
        lines += ["|---|" + "---|" * len(v["table"])]
        for sc in (*MAIN_SCENARIOS, "from_zero"):
            cells = []
            for sig in v["table"]:
                rs = [r for r in _pick(grid, sc) if _spec(r)["signal"] == sig]
                cells.append(
                    f"{rs[0]['good_per_gpu_hour']:.0f}; {100 * rs[0]['slo_1s']:.1f}; "
                    f"{rs[0]['gpu_hours']:.2f}"
                    if rs
                    else "-"
                )
            lines.append(f"| {sc} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Targets chosen by the sweep (HPA, recommended behavior)", ""]
    lines += [
        "Rule: most requests under 1 s per GPU-hour, pooled over the scenarios swept, among "
        f"the targets whose mean 1 s attainment is at least {100 * data['attain_floor']:.0f} % "
        "(else: the best attainment). Pooled over the sweep's scenarios:",
        "",
        "| signal | target | good req / GPU-h | mean TTFT ≤ 1 s % | GPU-h | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for (sig, target), row in pooled(data["sweep"]).items():
        mark = "**yes**" if data["chosen_targets"].get(sig) == target else ""
        lines.append(
            f"| {sig} | {target:g} | {row['good_per_gpu_hour']:.0f} "
            f"| {100 * row['attainment']:.1f} | {row['gpu_hours']:.2f} | {mark} |"
        )
    lines += ["", "Every sweep run:", "", HEADER]
    lines += [_row(r) for r in data["sweep"]]
    lines += ["", "Chosen: " + ", ".join(f"{k} = {t:g}" for k, t in data["chosen_targets"].items())]
    lines += ["", f"## All runs (SLO column: TTFT ≤ {slo_s:g} s)", "", HEADER]
    lines += [_row(r) for r in grid]
    lines += ["", "## Figures", ""]
    lines += [f"![{f}]({f})" for f in figures]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _plots(data: Mapping[str, Any], out: Path) -> list[str]:
    grid: Sequence[Result] = data["grid"]
    names: list[str] = []
    for sc in (*MAIN_SCENARIOS, "from_zero"):
        runs = _pick(grid, sc)
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(9, 4.5))
        load = ax.twinx()
        first = runs[0]["series"]
        load.fill_between([s[0] / 60 for s in first], [s[1] for s in first], color="0.9")
        load.set_ylabel("offered load (req/s)")
        for r in runs:
            sig = _spec(r)["signal"]
            ax.step(
                [s[0] / 60 for s in r["series"]],
                [s[3] for s in r["series"]],
                where="post",
                color=COLORS.get(sig),
                label=f"{sig} = {_spec(r)['target']:g}",
            )
        ax.set_zorder(load.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.set_xlabel("minutes")
        ax.set_ylabel("ready replicas")
        ax.set_title(f"{sc}: ready replicas per signal (HPA, recommended behavior)")
        ax.legend(loc="upper left", fontsize=8)
        names.append(_save(fig, out, f"replicas-{sc}.png"))
        fig, ax = plt.subplots(figsize=(9, 4))
        for r in runs:
            sig = _spec(r)["signal"]
            pts = [(t / 60, p99) for t, _, p99 in r["ttft_series"] if p99 is not None]
            ax.plot(
                [p[0] for p in pts],
                [min(p[1], 600.0) for p in pts],
                color=COLORS.get(sig),
                label=sig,
            )
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("minutes (arrival)")
        ax.set_ylabel("TTFT p99 per 30 s (s)")
        ax.set_title(f"{sc}: TTFT over time")
        ax.legend(fontsize=8)
        names.append(_save(fig, out, f"ttft-{sc}.png"))
    fig, ax = plt.subplots(figsize=(7, 5))
    markers = {"step": "o", "ramp": "s", "bursts": "^", "from_zero": "D"}
    for r in grid:
        s = _spec(r)
        ax.scatter(
            r["gpu_hours"],
            100 * r["slo_1s"],
            color=COLORS.get(s["signal"]),
            marker=markers.get(s["scenario"], "x"),
            alpha=0.9 if s["controller"] == "hpa" else 0.4,
        )
    for sig, c in COLORS.items():
        ax.scatter([], [], color=c, label=sig)
    for sc, m in markers.items():
        ax.scatter([], [], color="0.4", marker=m, label=sc)
    ax.set_xlabel("GPU-hours")
    ax.set_ylabel("requests with TTFT ≤ 1 s (%)")
    ax.set_title("cost vs SLO attainment (faded: default HPA behavior / KEDA)")
    ax.legend(fontsize=7, ncol=2)
    names.append(_save(fig, out, "cost-vs-slo.png"))
    fz = [
        r for r in grid if _spec(r)["scenario"] == "from_zero" and _spec(r)["controller"] == "keda"
    ]
    if fz:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for r in fz:
            s = _spec(r)
            front = "kvgate buffer" if s["buffered"] else "plain Service"
            lab = f"{front}, {s['signal']}, cold {s['cold_start_s']:g} s"
            if s["buffered"]:
                lab += f", max_wait {s['max_wait_s']:g} s"
            if s["buffered"] and s["max_queued"] != 1000:
                lab += f", max_queued {s['max_queued']}"
            lab += f": lost {r['lost']}, 503 {r['rejected']}"
            ax.step(
                [x[0] / 60 for x in r["series"]],
                [x[3] for x in r["series"]],
                where="post",
                label=lab,
            )
        ax.set_xlabel("minutes")
        ax.set_ylabel("ready replicas")
        ax.set_title("from zero with KEDA (burst of 6 req/s from minute 5 to 10)")
        ax.legend(fontsize=7)
        names.append(_save(fig, out, "from-zero.png"))
    return names


def _save(fig: Any, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    return name
