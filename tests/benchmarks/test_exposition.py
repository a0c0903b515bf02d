"""Each engine flavour's `/metrics` page parses back with the real names, labels and quirks."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from benchmarks.sim.engine import Engine, SimRequest
from benchmarks.sim.exposition import FLAVOURS, Flavour, render_metrics
from benchmarks.sim.profiles import get_profile
from benchmarks.sim.stats import V0_TTFT, V1_TTFT, Histogram, one_two_five

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "metrics"  # real captures


@pytest.fixture(scope="module")
def engine() -> Engine:
    """An engine mid-run: some finished, some running, some waiting, some preempted."""
    p = get_profile("a10g-llama3-8b", num_gpu_blocks=40, max_model_len=600, max_num_seqs=6)
    e = Engine(p, random.Random(1))
    rng = random.Random(2)
    now = 0.0
    for i in range(20):
        e.add_request(SimRequest(f"r{i}", rng.randint(20, 300), rng.randint(5, 200), now), now)
    for _ in range(150):
        step = e.schedule(now)
        assert step is not None
        now += step.duration_s
        e.complete(step, now)
    e.abort_request("r19", now)
    e.stats.start_unix_s = 1_700_000_000.0
    assert e.stats.num_waiting and e.stats.num_running and e.stats.num_preemptions
    return e


def samples(text: str) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(text: str, name: str) -> float:
    (s,) = samples(text)[name]
    return s.value


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_flavour_parses_and_reports_the_gauges(engine: Engine, flavour: Flavour) -> None:
    text = render_metrics(engine.stats, flavour, MODEL)
    names = {
        "vllm-v0": ("vllm:num_requests_waiting", "vllm:num_requests_running",
                    "vllm:gpu_cache_usage_perc"),
        "vllm-v1": ("vllm:num_requests_waiting", "vllm:num_requests_running",
                    "vllm:kv_cache_usage_perc"),
        "nim": ("num_requests_waiting", "num_requests_running", "gpu_cache_usage_perc"),
        "sglang": ("sglang:num_queue_reqs", "sglang:num_running_reqs", "sglang:token_usage"),
    }[flavour]  # fmt: skip
    s = engine.stats
    assert value(text, names[0]) == s.num_waiting
    assert value(text, names[1]) == s.num_running
    assert value(text, names[2]) == pytest.approx(s.kv_usage)
    for fam in samples(text).values():
        for sample in fam:
            assert sample.labels.get("model_name", MODEL) == MODEL


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_histograms_are_cumulative_and_count_matches_inf(engine: Engine, flavour: Flavour) -> None:
    by_name = samples(render_metrics(engine.stats, flavour, MODEL))
    histograms = [n[: -len("_bucket")] for n in by_name if n.endswith("_bucket")]
    assert histograms
    for h in histograms:
        buckets = [s.value for s in by_name[f"{h}_bucket"]]
        assert buckets == sorted(buckets)
        assert by_name[f"{h}_bucket"][-1].labels["le"] == "+Inf"
        assert buckets[-1] == by_name[f"{h}_count"][0].value


def test_vllm_v1_names_labels_and_created_series(engine: Engine) -> None:
    text = render_metrics(engine.stats, "vllm-v1", MODEL)
    by_name = samples(text)
    assert "vllm:gpu_cache_usage_perc" not in text  # hidden since 0.10: never the KV source
    assert f'vllm:num_requests_waiting{{engine="0",model_name="{MODEL}"}}' in text
    assert by_name["vllm:num_preemptions_total"][0].value == engine.stats.num_preemptions
    assert by_name["vllm:prefix_cache_queries_total"][0].value == engine.stats.prefix_cache_queries
    assert "# TYPE vllm:num_preemptions_created gauge" in text
    lines = text.splitlines()
    assert lines.index("# TYPE vllm:num_preemptions_created gauge") > lines.index(
        "# TYPE vllm:num_preemptions_total counter"
    )
    assert by_name["vllm:num_preemptions_created"][0].value == 1_700_000_000.0
    reasons = {s.labels["finished_reason"] for s in by_name["vllm:request_success_total"]}
    assert "abort" in reasons
    bounds = [s.labels["le"] for s in by_name["vllm:time_to_first_token_seconds_bucket"]]
    assert bounds == [*(str(b) for b in V1_TTFT), "+Inf"]
    assert "vllm:inter_token_latency_seconds_bucket" in by_name
    assert by_name["vllm:cache_config_info"][0].labels["num_gpu_blocks"] == "40"


def test_vllm_v0_is_the_0_4_3_shape(engine: Engine) -> None:
    text = render_metrics(engine.stats, "vllm-v0", MODEL)
    by_name = samples(text)
    assert "kv_cache_usage_perc" not in text and "_created" not in text
    assert 'engine="' not in text
    assert by_name["vllm:num_requests_swapped"][0].value == 0
    bounds = [s.labels["le"] for s in by_name["vllm:time_to_first_token_seconds_bucket"]]
    assert bounds == [*(str(b) for b in V0_TTFT), "+Inf"]
    assert f'vllm:time_to_first_token_seconds_bucket{{le="0.001",model_name="{MODEL}"}}' in text
    info = by_name["vllm:cache_config_info"][0].labels
    assert (info["block_size"], info["num_gpu_blocks"]) == ("16", "40")
    reasons = {s.labels["finished_reason"] for s in by_name["vllm:request_success_total"]}
    assert "abort" not in reasons


def test_nim_is_unprefixed_with_num_request_max(engine: Engine) -> None:
    text = render_metrics(engine.stats, "nim", MODEL)
    by_name = samples(text)
    assert "vllm:" not in text and "sglang:" not in text
    assert by_name["num_request_max"][0].value == 6
    assert by_name["request_success_total"][0].labels == {"model_name": MODEL}
    assert "request_finish_total" in by_name


def test_sglang_prints_sum_before_buckets(engine: Engine) -> None:
    text = render_metrics(engine.stats, "sglang", MODEL)
    lines = text.splitlines()
    first_sum = next(
        i for i, x in enumerate(lines) if x.startswith("sglang:time_to_first_token_seconds_sum")
    )
    first_bucket = next(
        i for i, x in enumerate(lines) if x.startswith("sglang:time_to_first_token_seconds_bucket")
    )
    assert first_sum < first_bucket
    assert value(text, "sglang:num_used_tokens") == engine.stats.used_tokens


def test_unknown_flavour_is_rejected(engine: Engine) -> None:
    with pytest.raises(ValueError, match="unknown engine flavour 'tgi'"):
        render_metrics(engine.stats, "tgi", MODEL)  # type: ignore[arg-type]


def test_histogram_renders_any_subset_of_its_bounds_exactly() -> None:
    h = Histogram((0.1, 0.5, 1.0), (0.25,))
    for v, n in ((0.05, 2), (0.1, 1), (0.3, 4), (2.0, 1)):
        h.observe(v, n)
    assert h.cumulative((0.1, 1.0)) == [3, 7, 8]
    assert h.cumulative((0.25, 0.5)) == [3, 7, 8]
    with pytest.raises(ValueError, match="not stored"):
        h.cumulative((0.2,))
    assert one_two_five(600) == (1, 2, 5, 10, 20, 50, 100, 200, 500)


def _lint(text: str) -> tuple[int, set[str]]:
    proc = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    findings = {
        line.strip()
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.strip() and "should not contain ':'" not in line
    }
    return proc.returncode, findings


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
@pytest.mark.parametrize(
    ("flavour", "sample"),
    [
        ("vllm-v0", "vllm-v0-0.4.3.txt"),
        ("vllm-v1", "vllm-v1-0.7to0.9-docs-excerpt.txt"),
        ("nim", "nim-llm-1.0.0-llama-3.1-8b.txt"),
        ("sglang", "sglang-docs-2024-llama-3.1-8b.txt"),
    ],
)
def test_promtool_finds_no_more_than_in_the_real_page(
    engine: Engine, flavour: Flavour, sample: str
) -> None:
    code, ours = _lint(render_metrics(engine.stats, flavour, MODEL))
    assert code in (0, 3), ours  # 1 would be a parse error
    _, real = _lint((SAMPLES / sample).read_text() + "\n")  # captures lack a final newline
    assert ours <= real, ours - real
