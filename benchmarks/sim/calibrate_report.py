"""Pass/fail checks and the markdown report for ``benchmarks.sim.calibrate``.

Kept apart from the experiments so each module stays readable. ``checks`` returns one dict
per acceptance criterion (name, predicted, published, ok); ``markdown`` lays the numbers out
side by side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from benchmarks.sim.profiles import Profile

Row = Sequence[float]
Results = dict[str, Any]


def profile_dict(p: Profile) -> dict[str, object]:
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}


def _within(pred: float, pub: float, tol: float) -> bool:
    return abs(pred - pub) <= tol * abs(pub)


def checks(r: Results, h100_pub: Sequence[Row], nim_pub: Sequence[Row], tol: float) -> list[Any]:
    out: list[dict[str, object]] = []

    def check(name: str, predicted: object, published: object, ok: bool) -> None:
        out.append({"name": name, "predicted": predicted, "published": published, "ok": ok})

    h = r["h100"]
    check(
        "h100 decode s/token at 1 req/s (within 15%)",
        h[0]["decode_s_per_token"],
        h100_pub[0][3],
        _within(h[0]["decode_s_per_token"], h100_pub[0][3], tol),
    )
    sat = max(row["achieved"] for row in h)
    check("h100 saturation req/s (within 15%)", sat, 113.0, _within(sat, 113.0, tol))
    below = [row["ttft_p50_s"] for row in h[:3]]
    check(
        "h100 TTFT p50 below the knee, 1-75 req/s (each within 15% of 33/31/37 ms)",
        below,
        [row[2] for row in h100_pub[:3]],
        all(_within(p, row[2], tol) for p, row in zip(below, h100_pub[:3], strict=True)),
    )
    past = [row["ttft_p50_s"] for row in h[4:]]
    check(
        "h100 TTFT p50 past the knee with a 440 client cap (within 15% of 2.18/2.10 s)",
        past,
        [row[2] for row in h100_pub[4:]],
        all(_within(p, row[2], tol) for p, row in zip(past, h100_pub[4:], strict=True)),
    )
    sat_decode = [row["decode_s_per_token"] for row in h[4:]]
    check(
        "h100 decode s/token at saturation (within 15% of 26.2/25.3 ms)",
        sat_decode,
        [row[3] for row in h100_pub[4:]],
        all(_within(p, row[3], tol) for p, row in zip(sat_decode, h100_pub[4:], strict=True)),
    )
    n = {row["concurrency"]: row for row in r["nim"]}
    itl = {c: row["itl_mean_s"] for c, row in n.items()}
    tput = {c: row["out_tok_s"] for c, row in n.items()}
    check(
        "nim shape: ITL flat to c=5 (<10% rise) then rising (c=250 > 2x c=1)",
        [itl[c] for c in sorted(itl)],
        [row[2] for row in nim_pub],
        itl[5] < 1.1 * itl[1] and itl[250] > 2.0 * itl[1],
    )
    check(
        "nim shape: throughput near-linear early (c=50 > 6x c=5), saturating late "
        "(c=250 < 1.25x c=150)",
        [tput[c] for c in sorted(tput)],
        [row[3] for row in nim_pub],
        tput[50] > 6.0 * tput[5] and tput[250] < 1.25 * tput[150],
    )
    talk = {(row["rate"], row["policy"]): row for row in r["a10g_talk"]}
    rnd12, lr12 = talk[(12.0, "random")], talk[(12.0, "least_request")]
    check(
        "a10g 12 req/s: random routing builds queues (max waiting >= 20; talk: 36)",
        max(rnd12["max_waiting"]),
        36,
        max(rnd12["max_waiting"]) >= 20,
    )
    check(
        "a10g 12 req/s: least-request keeps p99 TTFT under 1 s (talk: P2C-KV < 1 s)",
        lr12["ttft_p99_s"],
        1.0,
        lr12["ttft_p99_s"] < 1.0,
    )
    full = rnd12["kv_time_at_95"]
    busiest = max(range(len(full)), key=full.__getitem__)
    check(
        "a10g 12 req/s random: preemptions; KV near 100% on some replicas (p90 >= 0.98) while"
        " others sit lower (time at >= 95% KV under half the busiest's); the busiest replica's"
        " queue is among the longest half",
        {"kv_p90": rnd12["kv_p90"], "time_at_95": full, "max_waiting": rnd12["max_waiting"]},
        "some ~100%, others < 80% (Knative); queues on the busiest",
        sum(rnd12["preemptions"]) > 0
        and max(rnd12["kv_p90"]) >= 0.98
        and min(full) <= 0.5 * max(full)
        and rnd12["max_waiting"][busiest] >= sorted(rnd12["max_waiting"])[len(full) // 2],
    )
    lr13 = talk[(13.0, "least_request")]
    check(
        "a10g 13 req/s least-request: every replica reaches KV >= 95% (max of 15 s samples)",
        lr13["kv_sampled_max"],
        "> 0.95 (calibration-a10g.md; the talk: > 98% under P2C-KV)",
        min(lr13["kv_sampled_max"]) >= 0.95,
    )
    if r["a10g_fit"]:
        a10g = r["profiles"]["a10g-llama3-8b"]
        knee = next(
            row["knee_req_s"]
            for row in r["a10g_fit"]
            if row["num_gpu_blocks"] == a10g["num_gpu_blocks"]
            and row["per_token_s"] == a10g["per_token_s"]
        )
        check("a10g knee of the 8-replica cluster in 12-14 req/s", knee, "12-14", 12 <= knee <= 14)
    return out


def _ms(x: float) -> str:
    return f"{1000 * x:.1f}"


def markdown(r: Results, h100_pub: Sequence[Row], nim_pub: Sequence[Row]) -> str:
    lines = ["# Replica simulator calibration (virtual time)", ""]
    lines += ["Generated by `python -m benchmarks.sim.calibrate`; JSON beside this file.", ""]
    lines += ["## H100 + Llama-3.1-8B, inference-perf KubeCon NA 2025 (sim-fidelity §4.3)", ""]
    lines += [
        "vLLM 0.11, max-num-seqs 192, no chunked prefill, no prefix cache; prompt ~201, output"
        " 64; constant rate, client cap 440 in flight. Each cell: predicted / published.",
        "",
        "| offered req/s | achieved req/s | TTFT p50 ms | decode ms/token | ITL p99 ms |"
        " out tok/s | waiting (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, pub in zip(r["h100"], h100_pub, strict=True):
        lines.append(
            f"| {pub[0]} | {row['achieved']:.1f} / {pub[1]} "
            f"| {_ms(row['ttft_p50_s'])} / {_ms(pub[2])} "
            f"| {_ms(row['decode_s_per_token'])} / {_ms(pub[3])} "
            f"| {_ms(row['itl_p99_s'])} / {_ms(pub[4])} "
            f"| {row['out_tok_s']:.0f} / {pub[5]} | {row['waiting_mean']:.0f} / {pub[6]} |"
        )
    lines += ["", "## NIM concurrency sweep shape (§5.1), closed loop, H100 8B profile", ""]
    lines += [
        "Published: NIM 1.8.0 8B (likely FP8; ISL/OSL not captured). Simulated: bf16 profile,"
        " 200 in / 200 out. Compare shapes, not absolute values.",
        "",
        "| concurrency | TTFT p50 ms sim / pub | ITL ms sim / pub | out tok/s sim / pub |",
        "|---|---|---|---|",
    ]
    for row, pub in zip(r["nim"], nim_pub, strict=True):
        lines.append(
            f"| {pub[0]} | {_ms(row['ttft_p50_s'])} / {_ms(pub[1])} "
            f"| {_ms(row['itl_mean_s'])} / {_ms(pub[2])} | {row['out_tok_s']:.0f} / {pub[3]} |"
        )
    lines += ["", "## A10G + Llama-3.1-8B, the KubeCon 2024 talk (calibration-a10g.md)", ""]
    lines += [
        "8 replicas, Poisson arrivals, OpenOrca-like lengths (16-1600, means 540/415), 900 s;"
        " least_request = exact in-flight counts (Knative-like). KV figures per replica from"
        " 15 s samples (a Prometheus-like view); max waiting from every step.",
        "",
        "| rate | policy | TTFT p50 s | TTFT p99 s | max waiting (per replica) |"
        " KV mean | KV p90 | time at KV >= 95% | preemptions |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["a10g_talk"]:
        kv = [" ".join(f"{x:.2f}" for x in row[k]) for k in ("kv_mean", "kv_p90", "kv_time_at_95")]
        lines.append(
            f"| {row['rate']:g} | {row['policy']} | {row['ttft_p50_s']:.2f} "
            f"| {row['ttft_p99_s']:.2f} | {row['max_waiting']} | {kv[0]} | {kv[1]} | {kv[2]} "
            f"| {sum(row['preemptions'])} |"
        )
    if r["a10g_fit"]:
        lines += ["", "### Fit of the free parameters", ""]
        lines += [
            "Knee = offered rate at which least-request's p99 TTFT crosses 1 s (log-linear"
            " interpolation over 11-15 req/s, 600 s runs). Target 12-14 req/s.",
            "",
            "| KV tokens | per-token compute (ms) | knee req/s |",
            "|---|---|---|",
        ]
        for row in r["a10g_fit"]:
            kv_tokens = (row["num_gpu_blocks"] - 1) * 16
            lines.append(
                f"| {kv_tokens} | {1000 * row['per_token_s']:.2f} | {row['knee_req_s']:.2f} |"
            )
    lines += _profile_table(r["profiles"])
    lines += ["", "## Checks", "", "| check | predicted | published | ok |", "|---|---|---|---|"]
    for c in r["checks"]:
        lines.append(
            f"| {c['name']} | {_fmt(c['predicted'])} | {_fmt(c['published'])} "
            f"| {'yes' if c['ok'] else '**NO**'} |"
        )
    cpu = ", ".join(f"{k} {v:.1f} s" for k, v in r["cpu_s"].items())
    lines += ["", f"CPU time: {cpu}.", ""]
    return "\n".join(lines)


def _profile_table(profiles: dict[str, dict[str, Any]]) -> list[str]:
    """What each profile's step-time model implies (noise-free), against §5.1's estimates."""
    lines = [
        "",
        "## Profiles: what the constants imply (sim-fidelity §5.1)",
        "",
        "| profile | KV tokens | batch-1 ITL ms | 512-token prefill step ms |"
        " 256 decodes @1K ctx ms | decode-only knee (tokens) |",
        "|---|---|---|---|---|---|",
    ]
    for name, fields in profiles.items():
        p = Profile(**fields)
        knee = max(0.0, (p.weights_floor_s - p.linear_base_s) / p.per_token_s)
        lines.append(
            f"| {name} | {p.kv_capacity_tokens} | {_ms(p.step_time(1, 500, 0))} "
            f"| {_ms(p.step_time(512, 0, 512 * 256))} "
            f"| {_ms(p.step_time(256, 256 * 1024, 0))} | {knee:.0f} |"
        )
    lines += [
        "",
        "§5.1 estimates: A10G batch-1 ITL 30-35 ms, KV 31-37K tokens, 0.25-0.45 ms/token;"
        " H100 8B 7.1 ms measured, ~440K tokens; 70B TP4 18-22 ms, ~440-470K tokens.",
    ]
    return lines


def _fmt(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, list):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    if isinstance(x, dict):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in x.items())
    return str(x)
