"""PNG figures of the routing experiment, drawn from ``results.json`` data only (Agg backend).

``write_all`` draws every figure whose data is present and returns the file names:
``ttft_p99_vs_load.png``, ``ttft_cdf.png``, ``replica_timeseries.png`` (the talk's figures:
per-replica KV usage and waiting under round_robin vs p2c), ``ttft_p99_vs_scrape.png`` and
``gateways.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from benchmarks.experiments.routing.schema import Cell, Results

CDF_TICKS = (0.01, 0.1, 0.5, 0.9, 0.99, 0.999)

STYLE: dict[str, tuple[str, str]] = {  # row -> (colour, line style)
    "round_robin": ("tab:red", "-"),
    "least_request": ("tab:orange", "-"),
    "p2c_kv": ("tab:purple", "-"),
    "p2c": ("tab:blue", "-"),
    "p2c_no_correction": ("tab:cyan", "--"),
    "p2c_late_binding": ("tab:green", "-"),
    "oracle": ("black", ":"),
    "oracle_scraped": ("grey", ":"),
    "p2c_exact_gauges": ("tab:blue", ":"),
    "prefix_affinity": ("tab:brown", "-"),
}


def _cells(results: Results, section: str) -> list[Cell]:
    return [c for c in results["cells"] if c["section"] == section]


def _rows(cells: Sequence[Cell]) -> list[str]:
    seen = [str(c["row"]) for c in cells]
    return [r for r in STYLE if r in seen] + sorted(set(seen) - set(STYLE))


def _line(ax: Axes, cells: Sequence[Cell], row: str, scale: float = 1.0) -> None:
    """``row``'s TTFT p99 against the section's axis."""
    pts = sorted((c["axis"] * scale, c["ttft_p99_s"]) for c in cells if c["row"] == row)
    if pts:
        colour, style = STYLE.get(row, ("grey", "-"))
        ax.plot(*zip(*pts, strict=True), style, color=colour, marker="o", ms=3, label=row)


def write_all(results: Results, out: Path) -> list[str]:
    written = []
    for name, draw in (
        ("ttft_p99_vs_load.png", _load),
        ("ttft_cdf.png", _cdf),
        ("replica_timeseries.png", _timeseries),
        ("ttft_p99_vs_scrape.png", _scrape),
        ("gateways.png", _gateways),
    ):
        fig = draw(results)
        if fig is None:
            continue
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(name)
    return written


def _load(results: Results) -> Figure | None:
    cells = _cells(results, "load")
    if not cells:
        return None
    capacity = results["capacity"]["cluster_rps"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for row in _rows(cells):
        _line(ax, cells, row, 100.0)
    for rate in (12.0, 13.0):
        ax.axvline(100.0 * rate / capacity, color="grey", lw=0.6, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel(f"offered load, % of measured capacity ({capacity:.2f} req/s)")
    ax.set_ylabel("TTFT p99 (s)")
    ax.set_title("TTFT p99 vs load, 8 x A10G Llama-3.1-8B (dashed: 12 and 13 req/s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _cdf(results: Results) -> Figure | None:
    cells = [c for c in _cells(results, "headline") if "ttft_cdf_s" in c]
    if not cells:
        return None
    rates = sorted({c["rate"] for c in cells})
    fig, axes = plt.subplots(1, len(rates), figsize=(6.0 * len(rates), 4.5), squeeze=False)
    for ax, rate in zip(axes[0], rates, strict=True):
        for row in _rows(cells):
            cell = next((c for c in cells if c["row"] == row and c["rate"] == rate), None)
            if cell is None:
                continue
            xs = cell.get("ttft_cdf_s", [])
            n = len(xs) - 1
            ys = [i / n for i in range(n + 1)]
            colour, style = STYLE.get(row, ("grey", "-"))
            ax.plot(xs[1:-1], ys[1:-1], style, color=colour, label=row)
        ax.set_xscale("log")
        ax.set_yscale("logit")
        ax.set_ylim(0.01, 0.999)
        ax.set_yticks(CDF_TICKS, [f"{t:.1%}".replace(".0%", "%") for t in CDF_TICKS])
        ax.minorticks_off()
        ax.set_xlabel("TTFT (s)")
        ax.set_ylabel("fraction of requests (logit scale)")
        ax.set_title(f"TTFT CDF at {rate:g} req/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _timeseries(results: Results) -> Figure | None:
    series = results["series"]
    rows = [r for r in ("round_robin", "p2c") if r in series]
    if not rows:
        return None
    fig, axes = plt.subplots(2, len(rows), figsize=(6.5 * len(rows), 6.5), squeeze=False)
    for col, row in enumerate(rows):
        s = series[row]
        t = s["t_s"]
        for i, kv in enumerate(s["kv_usage"]):
            axes[0][col].plot(t, [100.0 * v for v in kv], lw=0.8, label=f"replica {i}")
        for i, waiting in enumerate(s["waiting"]):
            axes[1][col].plot(t, waiting, lw=0.8, label=f"replica {i}")
        axes[0][col].set_title(f"{row} at {s['rate']:g} req/s: KV-cache usage per replica")
        axes[0][col].set_ylabel("KV usage (%)")
        axes[0][col].set_ylim(0, 102)
        axes[1][col].set_title(f"{row} at {s['rate']:g} req/s: num_requests_waiting per replica")
        axes[1][col].set_ylabel("waiting requests")
        axes[1][col].set_xlabel("time in the measured window (s), 1 s samples")
        for ax in (axes[0][col], axes[1][col]):
            ax.grid(True, alpha=0.3)
    top = max(max(max(w) for w in series[r]["waiting"]) for r in rows)
    for col in range(len(rows)):
        axes[1][col].set_ylim(0, max(1, top) * 1.05)
    axes[0][0].legend(fontsize=7, ncol=4)
    fig.tight_layout()
    return fig


def _scrape(results: Results) -> Figure | None:
    cells = _cells(results, "scrape")
    if not cells:
        return None
    rates = sorted({c["rate"] for c in cells})
    fig, axes = plt.subplots(1, len(rates), figsize=(6.0 * len(rates), 4.5), squeeze=False)
    for ax, rate in zip(axes[0], rates, strict=True):
        at = [c for c in cells if c["rate"] == rate]
        for row in _rows(at):
            _line(ax, at, row)
        oracle = [
            c for c in _cells(results, "headline") if c["row"] == "oracle" and c["rate"] == rate
        ]
        if oracle:
            ax.axhline(oracle[0]["ttft_p99_s"], color="black", ls=":", label="oracle")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("scrape interval (s); stale after 4 intervals")
        ax.set_ylabel("TTFT p99 (s)")
        ax.set_title(f"TTFT p99 vs scrape interval at {rate:g} req/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _gateways(results: Results) -> Figure | None:
    cells = _cells(results, "gateways")
    if not cells:
        return None
    rates = sorted({c["rate"] for c in cells})
    fig, axes = plt.subplots(1, len(rates), figsize=(5.5 * len(rates), 4.0), squeeze=False)
    for ax, rate in zip(axes[0], rates, strict=True):
        at = [c for c in cells if c["rate"] == rate]
        for row in _rows(at):
            _line(ax, at, row)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("gateways sharing the 8 replicas")
        ax.set_ylabel("TTFT p99 (s)")
        ax.set_title(f"Multiple gateways at {rate:g} req/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return fig
