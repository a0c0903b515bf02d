"""Workloads are deterministic, build prompts of the intended length, and hit their statistics.

Statistical checks use a fixed seed and a tolerance of four standard errors computed from the
sample itself (plus half a token for integer rounding), so they fail on a wrong distribution,
not on noise. Run with ``-s`` to see the achieved statistics.
"""

from __future__ import annotations

import math
import statistics
from itertools import islice

import pytest

from benchmarks.load.workloads import (
    SPLITWISE_CODE_INPUT,
    SPLITWISE_CODE_OUTPUT,
    SPLITWISE_CONV_INPUT,
    SPLITWISE_CONV_OUTPUT,
    WORKLOADS,
    Arrivals,
    QuantileKnots,
    SharedPrefixWorkload,
    make_workload,
)
from benchmarks.sim.openai_shapes import count_tokens, text_block_hashes

N = 5000


def _mean_close(values: list[int], target: float, label: str) -> None:
    mean = statistics.fmean(values)
    tol = 4 * statistics.stdev(values) / math.sqrt(len(values)) + 0.5
    print(f"{label}: mean {mean:.1f} (target {target}, tolerance {tol:.1f})")
    assert abs(mean - target) <= tol, f"{label}: mean {mean:.1f}, wanted {target} ± {tol:.1f}"


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_same_seed_same_stream_other_seed_differs(name: str) -> None:
    a = make_workload(name, seed=7).take(50)
    b = make_workload(name, seed=7).take(50)
    c = make_workload(name, seed=8).take(50)
    assert a == b
    assert [r.prompt_text() for r in a] == [r.prompt_text() for r in b]
    assert [r.prompt_text() for r in a] != [r.prompt_text() for r in c]
    assert [r.index for r in a] == list(range(50))


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_prompt_text_has_the_intended_token_count_for_the_simulator(name: str) -> None:
    for spec in make_workload(name, seed=3).take(100):
        assert count_tokens(spec.prompt_text()) == spec.prompt_tokens
        assert len(spec.prompt_text()) == 4 * spec.prompt_tokens
        assert "".join(m["content"] for m in spec.messages()) == spec.prompt_text()
        assert spec.prompt_text().isascii()


def test_independent_requests_never_share_a_prefix_block() -> None:
    specs = [s for s in make_workload("sharegpt", seed=1).take(2000) if s.prompt_tokens >= 16]
    first_blocks = {text_block_hashes(s.prompt_text(), "m", 16, 1) for s in specs}
    assert len(first_blocks) == len(specs) > 1500


def test_shared_prefix_groups_share_the_literal_system_prompt() -> None:
    wl = SharedPrefixWorkload(seed=5, num_groups=3, prompts_per_group=4, system_prompt_len=128)
    specs = wl.take(200)
    assert {s.group for s in specs} == {0, 1, 2}
    assert len({(s.group, s.user.tag) for s in specs}) == 12  # every (group, question) drawn
    by_group: dict[int | None, set[str]] = {}
    for s in specs:
        assert s.system is not None
        assert s.prompt_text().startswith(s.system.text())
        assert s.messages()[0] == {"role": "system", "content": s.system.text()}
        by_group.setdefault(s.group, set()).add(s.system.text())
    assert all(len(texts) == 1 for texts in by_group.values())
    # The simulator's prefix cache sees it: all 128 // 16 system blocks shared within a group,
    # and no block shared across groups.
    hashes = {g: text_block_hashes(next(iter(t)), "m", 16, 8) for g, t in by_group.items()}
    assert all(len(h) == 8 for h in hashes.values())
    assert len({h[0] for h in hashes.values()}) == 3


def test_openorca_means_and_ranges() -> None:
    specs = make_workload("openorca", seed=11).take(N)
    prompt = [s.prompt_tokens for s in specs]
    output = [s.max_tokens for s in specs]
    assert min(prompt) >= 16 and max(prompt) <= 1600
    assert min(output) >= 16 and max(output) <= 1600
    _mean_close(prompt, 540, "openorca input")
    _mean_close(output, 415, "openorca output")
    assert max(prompt) > 1300 and max(output) > 1200  # the range is used, not just the mean


def test_sharegpt_means_and_vllm_filters() -> None:
    specs = make_workload("sharegpt", seed=11).take(N)
    prompt = [s.prompt_tokens for s in specs]
    output = [s.max_tokens for s in specs]
    assert min(prompt) >= 4 and max(prompt) <= 1024 and min(output) >= 4
    assert max(p + o for p, o in zip(prompt, output, strict=True)) <= 2048
    _mean_close(prompt, 161, "sharegpt input")
    _mean_close(output, 338, "sharegpt output")


@pytest.mark.parametrize(
    ("dist", "stats"),
    [
        (SPLITWISE_CONV_INPUT, (1155, 1020, 2734, 4142)),
        (SPLITWISE_CONV_OUTPUT, (211, 129, 424, 601)),
        (SPLITWISE_CODE_INPUT, (2048, 1469, 5188, 7436)),
        (SPLITWISE_CODE_OUTPUT, (28, 13, 55, 251)),
    ],
    ids=["conv-input", "conv-output", "code-input", "code-output"],
)
def test_splitwise_quantiles_exact_and_mean_fitted(
    dist: QuantileKnots, stats: tuple[float, float, float, float]
) -> None:
    mean, med, p90, p99 = stats
    assert dist.quantile(0.5) == pytest.approx(med)
    assert dist.quantile(0.9) == pytest.approx(p90)
    assert dist.quantile(0.99) == pytest.approx(p99)
    assert dist.mean() == pytest.approx(mean, rel=1e-6)
    values = [v for _, v in dist.knots]
    assert values == sorted(values)


@pytest.mark.parametrize("name", ["splitwise_conv", "splitwise_code"])
def test_splitwise_sampled_statistics(name: str) -> None:
    published = {
        "splitwise_conv": ((1155, 1020, 2734), (211, 129, 424)),
        "splitwise_code": ((2048, 1469, 5188), (28, 13, 55)),
    }[name]
    specs = make_workload(name, seed=2).take(4 * N)
    for label, values, (mean, med, p90) in (
        ("input", [s.prompt_tokens for s in specs], published[0]),
        ("output", [s.max_tokens for s in specs], published[1]),
    ):
        _mean_close(values, mean, f"{name} {label}")
        deciles = statistics.quantiles(values, n=10)
        print(f"{name} {label}: median {deciles[4]:.0f} (={med}), p90 {deciles[8]:.0f} (={p90})")
        assert deciles[4] == pytest.approx(med, rel=0.05, abs=1)
        assert deciles[8] == pytest.approx(p90, rel=0.05, abs=1)


def test_max_total_tokens_filters_draws() -> None:
    specs = make_workload("splitwise_code", seed=1, max_total_tokens=4096).take(500)
    assert max(s.prompt_tokens + s.max_tokens for s in specs) <= 4096


def test_make_workload_rejects_unknown_names_and_parameters() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("nope")
    with pytest.raises(ValueError, match="bad parameters"):
        make_workload("openorca", bogus=1)
    with pytest.raises(ValueError, match=">= 1"):
        make_workload("shared_prefix", num_groups=0)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_arrivals_have_the_set_rate_and_cv(burstiness: float) -> None:
    n, rate = 20_000, 50.0
    arrivals = Arrivals(rate, burstiness)
    gaps = list(islice(arrivals.gaps(seed=9), n))
    mean, cv = statistics.fmean(gaps), statistics.stdev(gaps) / statistics.fmean(gaps)
    # Relative standard errors: the mean's is CV/sqrt(n); the sample SD's is about
    # sqrt((excess kurtosis + 2) / (4n)), and a Gamma's excess kurtosis is 6/b.
    mean_tol = 4 * arrivals.cv / math.sqrt(n)
    cv_tol = 4 * math.sqrt((6 / burstiness + 2) / (4 * n)) + mean_tol
    print(f"b={burstiness}: mean gap {mean * rate:.4f}/rate, CV {cv:.3f} (set {arrivals.cv:.3f})")
    assert mean * rate == pytest.approx(1.0, rel=mean_tol)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=cv_tol)


def test_arrivals_are_seeded_and_validated() -> None:
    a = Arrivals(10.0, 0.5)
    assert list(islice(a.times(1), 100)) == list(islice(a.times(1), 100))
    assert list(islice(a.times(1), 100)) != list(islice(a.times(2), 100))
    times = list(islice(a.times(1), 100))
    assert times == sorted(times) and times[0] > 0
    with pytest.raises(ValueError, match="rate"):
        Arrivals(0.0)
    with pytest.raises(ValueError, match="burstiness"):
        Arrivals(1.0, -1.0)
