"""The issue's goals, checked against the pooled headline cells (TTFT p99 over every seed).

Each check returns the target, what was measured, whether it is met and by what factor, so the
report can state a miss with its size. Comparisons are on pooled p99 (all seeds' requests);
``seed_wins`` adds how many individual seeds agree, a robustness hint for close calls.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.experiments.routing.schema import Cell, Goal

GOAL_P99_S = 1.0
GOAL_VS_ROUND_ROBIN = 3.0
GOAL_VS_ORACLE = 1.2


def headline(cells: Sequence[Cell], row: str, rate: float) -> Cell | None:
    for c in cells:
        if c["section"] == "headline" and c["row"] == row and c["rate"] == rate:
            return c
    return None


def _p99(cell: Cell) -> float:
    return cell["ttft_p99_s"]


def _seeds(cell: Cell) -> list[float]:
    return cell["ttft_p99_per_seed_s"]


def evaluate(cells: Sequence[Cell], row: str = "p2c") -> list[Goal]:
    """Goal checks for ``row`` (the issue's goals are about ``p2c``)."""
    rates = sorted({c["rate"] for c in cells if c["section"] == "headline"})
    out: list[Goal] = []
    for rate in rates:
        rr = headline(cells, "round_robin", rate)
        me = headline(cells, row, rate)
        oracle = headline(cells, "oracle", rate)
        if rr is not None:
            others = [c for c in cells if c["section"] == "headline" and c["rate"] == rate]
            worst = max(others, key=_p99)
            out.append(
                _check(
                    "round_robin has the worst TTFT p99",
                    rate,
                    "round_robin",
                    f"worst: {worst['row']} ({_p99(worst):.2f} s)",
                    worst is rr,
                    None,
                )
            )
        if me is None:
            continue
        out.append(
            _check(
                f"{row} TTFT p99 under {GOAL_P99_S:.0f} s",
                rate,
                f"< {GOAL_P99_S:.2f} s",
                f"{_p99(me):.2f} s",
                _p99(me) < GOAL_P99_S,
                _p99(me) / GOAL_P99_S,
            )
        )
        if rr is not None:
            ratio = _p99(rr) / _p99(me)
            wins = sum(a > b for a, b in zip(_seeds(rr), _seeds(me), strict=True))
            out.append(
                _check(
                    f"{row} TTFT p99 at least {GOAL_VS_ROUND_ROBIN:.0f}x lower than round_robin",
                    rate,
                    f">= {GOAL_VS_ROUND_ROBIN:.1f}x",
                    f"{ratio:.1f}x ({_p99(rr):.2f} s vs {_p99(me):.2f} s; "
                    f"lower on {wins}/{len(_seeds(me))} seeds)",
                    ratio >= GOAL_VS_ROUND_ROBIN,
                    ratio / GOAL_VS_ROUND_ROBIN,
                )
            )
        if oracle is not None:
            ratio = _p99(me) / _p99(oracle)
            out.append(
                _check(
                    f"{row} TTFT p99 within {GOAL_VS_ORACLE - 1:.0%} of the oracle",
                    rate,
                    f"<= {GOAL_VS_ORACLE:.2f}x oracle",
                    f"{ratio:.2f}x ({_p99(me):.2f} s vs {_p99(oracle):.2f} s)",
                    ratio <= GOAL_VS_ORACLE,
                    ratio / GOAL_VS_ORACLE,
                )
            )
    top = rates[-1] if rates else None
    p2c, kv = (headline(cells, "p2c", top), headline(cells, "p2c_kv", top)) if top else (None, None)
    if top is not None and p2c is not None and kv is not None:
        wins = sum(a < b for a, b in zip(_seeds(p2c), _seeds(kv), strict=True))
        out.append(
            _check(
                "queue-first p2c beats KV-only p2c_kv (TTFT p99)",
                top,
                "p2c < p2c_kv",
                f"{_p99(p2c):.2f} s vs {_p99(kv):.2f} s (lower on {wins}/{len(_seeds(p2c))} seeds)",
                _p99(p2c) < _p99(kv),
                _p99(p2c) / _p99(kv),
            )
        )
    return out


def _check(
    goal: str, rate: float, target: str, measured: str, met: bool, factor: float | None
) -> Goal:
    return Goal(
        goal=goal,
        rate=rate,
        target=target,
        measured=measured,
        met=met,
        factor=None if factor is None else round(factor, 3),
    )
