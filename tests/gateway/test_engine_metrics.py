"""Engine-metrics parsing: every captured page, hand-made pages per flavour, format quirks, and
a cross-check against prometheus_client's full parser."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.sim.exposition import FLAVOURS, render_metrics
from benchmarks.sim.profiles import get_profile
from benchmarks.sim.stats import EngineStats
from gateway.engine_metrics import (
    ENGINE_NAMES,
    EngineSample,
    MetricNames,
    Signal,
    UnknownEngineError,
    custom_names,
    detect_engine,
    names_for,
    parse_engine_metrics,
    parse_signal,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "metrics"

# file -> expected sample (its engine is also what detect_engine must say)
EXPECTED: dict[str, EngineSample] = {
    # Real captures (metrics-samples/).
    "vllm-v0-0.4.3.txt": EngineSample("vllm-v0", 0, 0, 0.0),
    "vllm-v1-0.7to0.9-docs-excerpt.txt": EngineSample("vllm-v0", None, None, None),
    "nim-llm-1.0.0-llama-3.1-8b.txt": EngineSample("nim", 0, 1, 0.0002848191398461977),
    "sglang-docs-2024-llama-3.1-8b.txt": EngineSample("sglang", 2826, 162, 0.28),
    # Hand-made pages (each states its format source and expectation in its first line).
    "handmade-vllm-v1-0.11-dp2.txt": EngineSample("vllm-v1", 7, 11, 0.72),
    "handmade-vllm-0.10-both-kv-names.txt": EngineSample("vllm-v1", 2, 9, 0.55),
    "handmade-sglang-0.5-underscore-tp2.txt": EngineSample("sglang", 12, 30, 0.4),
    "handmade-tgi-3.txt": EngineSample("tgi", 3, 5, None),
    "handmade-trtllm-triton.txt": EngineSample("trtllm", 4, 2, 0.375),
    "handmade-trtllm-serve.txt": EngineSample("trtllm", 1, 3, 0.5),
}


def page(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_every_fixture_has_an_expectation() -> None:
    assert {p.name for p in FIXTURES.glob("*.txt")} == set(EXPECTED)


@pytest.mark.parametrize("name", EXPECTED, ids=lambda n: n.removesuffix(".txt"))
def test_fixture_pages(name: str) -> None:
    text = page(name)
    expected = EXPECTED[name]
    assert detect_engine(text) == expected.engine
    assert parse_engine_metrics(text) == expected
    assert parse_engine_metrics(text, engine=expected.engine) == expected


def test_vllm_0_10_page_never_reads_as_kv_zero() -> None:
    text = page("handmade-vllm-0.10-both-kv-names.txt")
    # Whichever vLLM table is configured, the new name is found: the deprecated alias (0.0
    # here) is read only when the new name is absent.
    assert parse_engine_metrics(text, engine="vllm-v1").kv_usage == 0.55
    new_only = page("handmade-vllm-v1-0.11-dp2.txt")
    assert parse_engine_metrics(new_only, engine="vllm-v0").kv_usage == 0.72
    # A table that knows only the old name reports unknown, not 0.
    old_only = custom_names(None, kv_usage="vllm:gpu_cache_usage_perc")
    assert parse_engine_metrics(new_only, names=old_only).kv_usage is None


def test_missing_signals_are_unknown_not_zero() -> None:
    sample = parse_engine_metrics(page("vllm-v0-0.4.3.txt"), engine="tgi")
    assert sample == EngineSample("tgi", None, None, None)


VLLM_HEAD = "# HELP vllm:num_requests_running x\n# TYPE vllm:num_requests_running gauge\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vllm:num_requests_waiting 4\nvllm:num_requests_running 1\n", (4, 1, None)),
        ('vllm:num_requests_waiting{model_name="m"} 1.2e+001', (12, None, None)),
        ("vllm:num_requests_waiting 1.15891634176e+002\n", (116, None, None)),
        ("vllm:num_requests_waiting 3 1718140558000\n", (3, None, None)),
        ("vllm:num_requests_waiting\t5\n", (5, None, None)),
        ("vllm:num_requests_waiting 2\r\nvllm:gpu_cache_usage_perc 0.5\r\n", (2, None, 0.5)),
        ("\n\nvllm:num_requests_waiting 2\n\n\n", (2, None, None)),
        ("vllm:num_requests_waiting NaN\n", (None, None, None)),
        ("vllm:num_requests_waiting +Inf\n", (None, None, None)),
        ("vllm:num_requests_waiting -1\n", (None, None, None)),
        ("vllm:num_requests_waiting abc\n", (None, None, None)),
        ("vllm:num_requests_waiting 1e300\nvllm:num_requests_waiting 1e300\n", (None, None, None)),
        ("vllm:num_requests_waiting\n", (None, None, None)),
        ("vllm:gpu_cache_usage_perc 1.5\n", (None, None, None)),
        ("vllm:gpu_cache_usage_perc 1\n", (None, None, 1.0)),
        (
            'vllm:num_requests_waiting{engine="0"} 2\nvllm:num_requests_waiting{engine="1"} NaN\n',
            (None, None, None),
        ),
        (
            'vllm:kv_cache_usage_perc{engine="0"} NaN\nvllm:gpu_cache_usage_perc{engine="0"} 0.3\n',
            (None, None, 0.3),
        ),
        (
            "vllm:num_requests_waiting_created 1.7e+09\nvllm:num_requests_waiting_by_reason 9\n",
            (None, None, None),
        ),
        ("# HELP vllm:num_requests_waiting vllm:num_requests_waiting 5\n", (None, None, None)),
        (
            VLLM_HEAD + 'vllm:num_requests_running{a="x}y",b="q\\"u,o}te",c="\\\\"} 6\n',
            (None, 6, None),
        ),
        (VLLM_HEAD + 'vllm:num_requests_running{le="0.5",model_name="m",} 7\n', (None, 7, None)),
        (VLLM_HEAD + 'vllm:num_requests_running{model_name="m" 7\n', (None, None, None)),
    ],
    ids=[
        "first_line_no_help",
        "three_digit_exponent",
        "long_exponent",
        "timestamp",
        "tab",
        "crlf",
        "blank_lines",
        "nan",
        "inf",
        "negative",
        "garbage",
        "absurd",
        "no_value",
        "kv_above_one",
        "kv_exactly_one",
        "one_engine_nan_poisons_sum",
        "bad_new_kv_falls_back_to_alias",
        "created_and_longer_names",
        "name_in_help_text",
        "escaped_label_values",
        "trailing_comma_label_order",
        "unterminated_labels",
    ],
)
def test_format_quirks(text: str, expected: tuple[int | None, int | None, float | None]) -> None:
    s = parse_engine_metrics(text, engine="vllm-v0")
    assert (s.queue_depth, s.running, s.kv_usage) == expected


def test_sglang_reads_the_lowest_tp_rank_numerically() -> None:
    text = "".join(
        f'sglang:num_queue_reqs{{tp_rank="{r}"}} {v}\n' for r, v in (("10", 9), ("2", 5), ("3", 7))
    )
    assert parse_engine_metrics(text).queue_depth == 5


def test_detect_engine_unknown_page() -> None:
    assert detect_engine("") is None
    assert detect_engine("# HELP foo bar\nfoo 1\n") is None
    with pytest.raises(UnknownEngineError):
        parse_engine_metrics("foo 1\n")
    with pytest.raises(ValueError, match="unknown engine 'vllm'"):
        parse_engine_metrics("foo 1\n", engine="vllm")


def test_every_engine_has_a_table() -> None:
    assert set(ENGINE_NAMES) == {"vllm-v0", "vllm-v1", "nim", "sglang", "tgi", "trtllm"}
    for name in ENGINE_NAMES:
        assert names_for(name).engine == name


class TestCustomNames:
    def test_selectors_with_labels(self) -> None:
        names = custom_names(
            None,
            waiting='my_queue{pool="a"}',
            running="my_running",
            kv_usage='my_kv{kind="ratio"}',
        )
        text = (
            'my_queue{pool="b"} 9\nmy_queue{pool="a"} 4\nmy_running 2\nmy_kv{kind="ratio"} 0.25\n'
        )
        assert parse_engine_metrics(text, names=names) == EngineSample("custom", 4, 2, 0.25)

    def test_override_keeps_the_engine_table_for_the_rest(self) -> None:
        names = custom_names(names_for("tgi"), kv_usage="tgi_kv_ratio")
        text = page("handmade-tgi-3.txt") + "tgi_kv_ratio 0.5\n"
        assert parse_engine_metrics(text, names=names) == EngineSample("tgi", 3, 5, 0.5)

    def test_scale_for_percent_gauges(self) -> None:
        names = MetricNames("custom", (), (), (Signal("kv_percent", (), 0.01),))
        assert parse_engine_metrics("kv_percent 42\n", names=names).kv_usage == pytest.approx(0.42)

    @pytest.mark.parametrize("bad", ["", "a b", 'q{x="1"', "q{x=1}", '{x="1"}', 'q{x="1"}z'])
    def test_malformed_selector(self, bad: str) -> None:
        with pytest.raises(ValueError, match="malformed"):
            parse_signal(bad)

    def test_selector_round_trip(self) -> None:
        sig = parse_signal('nv_trt_llm_request_metrics{request_type="waiting"}')
        assert sig == Signal("nv_trt_llm_request_metrics", (("request_type", "waiting"),))
        assert parse_signal(str(sig)) == sig


# -- cross-check against prometheus_client's parser ---------------------------------------


def reference(text: str, names: MetricNames) -> EngineSample:
    """The same aggregation rules over prometheus_client's fully parsed samples."""
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]

    def read(alternatives: tuple[Signal, ...], ratio: bool) -> float | None:
        for sig in alternatives:
            series = [
                s
                for s in samples
                if s.name == sig.name and all(s.labels.get(k) == v for k, v in sig.labels)
            ]
            if names.rank_label and series:
                ranks = [s.labels[names.rank_label] for s in series if names.rank_label in s.labels]
                if ranks:
                    low = min(ranks, key=int)
                    series = [s for s in series if s.labels.get(names.rank_label, low) == low]
            values = [s.value * sig.scale for s in series]
            if values and all(0 <= v <= (1 if ratio else 1e12) for v in values):
                return max(values) if ratio else math.fsum(values)
        return None

    w, r = read(names.waiting, False), read(names.running, False)
    return EngineSample(
        names.engine,
        None if w is None else round(w),
        None if r is None else round(r),
        read(names.kv_usage, True),
    )


@pytest.mark.parametrize("name", EXPECTED, ids=lambda n: n.removesuffix(".txt"))
def test_agrees_with_prometheus_client_on_fixtures(name: str) -> None:
    text = page(name)
    names = names_for(EXPECTED[name].engine)
    assert parse_engine_metrics(text, names=names) == reference(text, names)


label_values = st.text(alphabet='ab,}{="\\\n ', max_size=6)
values = st.sampled_from(
    ["0", "3", "2.0", "1e+01", "1.5e+000", "0.25", "NaN", "-1", "+Inf", "7 123"]
)


@st.composite
def vllm_pages(draw: st.DrawFn) -> str:
    lines: list[str] = []
    for metric in (
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
    ):
        if draw(st.booleans()):
            lines.append(f"# HELP {metric} help text with {metric} in it")
            lines.append(f"# TYPE {metric} gauge")
        for engine in range(draw(st.integers(0, 3))):
            model = draw(label_values)
            model = model.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
            labels = [f'engine="{engine}"', f'model_name="{model}"']
            if draw(st.booleans()):
                labels.reverse()
            lines.append(f"{metric}{{{','.join(labels)}}} {draw(values)}")
        lines.append(f"{metric}_created 1.7e+09")
        if draw(st.booleans()):
            lines.append("")
    order = draw(st.permutations(range(len(lines))))
    return "\n".join(lines[i] for i in order) + "\n"


@settings(max_examples=60, derandomize=True, deadline=None)
@given(text=vllm_pages())
def test_agrees_with_prometheus_client_on_generated_pages(text: str) -> None:
    names = names_for("vllm-v1")
    assert parse_engine_metrics(text, names=names) == reference(text, names)


# -- the replica simulator's pages, one per flavour it impersonates -------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(
    ("waiting", "running", "kv"), [(0, 0, 0.0), (7, 3, 0.42), (2826, 162, 1.0)], ids=str
)
def test_simulator_pages(flavour: str, waiting: int, running: int, kv: float) -> None:
    stats = EngineStats(
        profile=get_profile("a10g-llama3-8b"),
        num_waiting=waiting,
        num_running=running,
        kv_usage=kv,
        start_unix_s=1.7e9,
    )
    text = render_metrics(stats, flavour, "meta-llama/Llama-3.1-8B-Instruct")  # type: ignore[arg-type]
    assert detect_engine(text) == flavour
    assert parse_engine_metrics(text) == EngineSample(flavour, waiting, running, kv)
    names = names_for(flavour)
    assert parse_engine_metrics(text, names=names) == reference(text, names)
