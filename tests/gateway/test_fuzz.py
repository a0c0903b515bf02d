"""Property-based fuzzing of the two parsers that read untrusted bytes: the request parser
(``gateway/request_info.py``, client bodies) and the engine-metrics parser
(``gateway/engine_metrics.py``, replica pages). Bounded for CI (a few seconds in all) and
seeded through hypothesis' database-less derandomized mode so a run is reproducible.

Properties: no input makes either parser raise anything but its documented errors; what they
return is within its bounds (an unknown signal is None, never a made-up 0); the prompt work is
bounded whatever the prompt; a default model spliced into a body keeps the rest intact."""

from __future__ import annotations

import math
import string
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.engine_metrics import (
    ENGINE_NAMES,
    UnknownEngineError,
    detect_engine,
    names_for,
    parse_engine_metrics,
)
from gateway.errors import InvalidJson, InvalidRequest
from gateway.request_info import (
    build_request_info,
    decode_body,
    requested_model,
    requested_stream,
    with_model,
)

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

JSON_FUZZ = settings(FUZZ, max_examples=80)  # generating nested JSON is the costly part

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["system", "user", "assistant"]) | json_values,
        "content": st.text(max_size=300)
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text()}))
        | json_values,
    },
)
request_objects = st.fixed_dictionaries(
    {},
    optional={
        "model": st.text(max_size=20) | json_values,
        "stream": st.booleans() | json_values,
        "messages": st.lists(message, max_size=8) | json_values,
        "prompt": st.text(max_size=500)
        | st.lists(st.integers(min_value=0, max_value=200_000), max_size=300)
        | st.lists(st.lists(st.integers(0, 50_000), max_size=50), max_size=3)
        | json_values,
        "input": st.text() | st.lists(st.text(), max_size=5) | json_values,
        "max_tokens": json_values,
    },
).flatmap(lambda d: st.dictionaries(st.text(max_size=8), json_values, max_size=3).map(
    lambda extra: {**extra, **d}
))  # fmt: skip


@FUZZ
@given(st.binary(max_size=2000))
def test_any_bytes_decode_to_an_object_or_a_400(body: bytes) -> None:
    try:
        obj = decode_body(body)
    except (InvalidJson, InvalidRequest) as exc:
        assert exc.status == 400
        return
    assert isinstance(obj, dict)


@JSON_FUZZ
@given(json_values)
def test_any_json_value_is_an_object_or_a_400(value: Any) -> None:
    body = orjson.dumps(value)
    try:
        obj = decode_body(body)
    except InvalidRequest as exc:
        assert not isinstance(value, dict) and exc.code == "invalid_request"
        return
    assert obj == value


@JSON_FUZZ
@given(request_objects, st.sampled_from(["chat", "completions", "embeddings"]), st.booleans())
def test_request_fields_are_read_or_refused_and_prompt_work_is_bounded(
    obj: dict[str, Any], endpoint: Any, prefix: bool
) -> None:
    m, s = obj.get("model"), obj.get("stream")
    valid = (m is None or (isinstance(m, str) and m != "")) and (s is None or isinstance(s, bool))
    try:
        model = requested_model(obj)
        stream = requested_stream(obj)
    except InvalidRequest:
        assert not valid
        return
    assert valid
    block_chars, max_blocks = 16, 8
    info = build_request_info(
        obj,
        seq=1,
        model=model or "default",
        stream=stream,
        endpoint=endpoint,
        prefix=(block_chars, max_blocks) if prefix else None,
    )
    assert info.model == (model or "default") and info.stream is stream
    if prefix:
        assert len(info.prefix_hashes) <= max_blocks
        assert info.prompt_chars >= 0
    else:
        assert info.prefix_hashes == ()


@JSON_FUZZ
@given(request_objects, st.text(min_size=1, max_size=30))
def test_a_default_model_splices_into_any_body_without_one(obj: dict[str, Any], model: str) -> None:
    obj.pop("model", None)
    body = orjson.dumps(obj, option=orjson.OPT_INDENT_2)  # whitespace where a client may put it
    spliced = orjson.loads(with_model(body, model))
    assert spliced == {"model": model, **obj}


# -- the engine metrics parser ----------------------------------------------------------------

_NAMES = sorted(
    {
        s.name
        for e in ENGINE_NAMES
        for t in (names_for(e),)
        for s in t.waiting + t.running + t.kv_usage
    }
)
_VALUES = ["0", "1", "-1", "NaN", "+Inf", "-Inf", "1e308", "1e-9", "0.5", "2", "abc", "", "1 2"]
_value_text = st.sampled_from([*_VALUES, "3 1700000000000"]) | st.floats().map(repr)
_label_value = st.text(alphabet=string.printable, max_size=12)
_labels = st.dictionaries(
    st.sampled_from(
        ["engine", "model_name", "tp_rank", "request_type", "kv_cache_block_type", "x"]
    ),
    _label_value | st.sampled_from(["0", "1", "waiting", "scheduled", "fraction"]),
    max_size=3,
)


@st.composite
def _sample_line(draw: st.DrawFn) -> str:
    name = draw(
        st.sampled_from(_NAMES) | st.text(alphabet=string.ascii_letters + ":_", max_size=20)
    )
    labels = draw(_labels)
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    broken = draw(st.sampled_from(["", "", "", "{", "}", '{x="', "\\", '"']))
    suffix = draw(st.sampled_from(["", "", "_created", "_total", "_sum", "_bucket"]))
    label_part = f"{{{inner}}}" if labels else draw(st.sampled_from(["", "{}"]))
    return f"{name}{suffix}{label_part}{broken} {draw(_value_text)}"


_page_lines = st.lists(
    _sample_line()
    | st.sampled_from(["# HELP x y", "# TYPE vllm:num_requests_waiting gauge", "", "#", "\r"])
    | st.text(max_size=60),
    max_size=40,
)


def _check_sample(sample: Any) -> None:
    for count in (sample.queue_depth, sample.running):
        assert count is None or (isinstance(count, int) and 0 <= count <= 10**13)
    kv = sample.kv_usage
    assert kv is None or (0.0 <= kv <= 1.0 and not math.isnan(kv))


@FUZZ
@given(_page_lines, st.sampled_from(["\n", "\r\n"]), st.sampled_from([None, *ENGINE_NAMES]))
def test_any_page_parses_to_bounded_values_or_unknown(
    lines: list[str], newline: str, engine: str | None
) -> None:
    page = newline.join(lines)
    detected = detect_engine(page)
    assert detected is None or detected in ENGINE_NAMES
    try:
        sample = parse_engine_metrics(page, engine=engine)
    except UnknownEngineError:
        assert engine is None and detected is None
        return
    _check_sample(sample)


@FUZZ
@given(st.text(max_size=3000), st.sampled_from(ENGINE_NAMES))
def test_arbitrary_text_never_breaks_the_parser(text: str, engine: str) -> None:
    _check_sample(parse_engine_metrics(text, engine=engine))


@FUZZ
@given(
    st.lists(st.integers(0, 10_000), min_size=1, max_size=4),
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
    st.sampled_from(["NaN", "-1", "+Inf", "x"]),
    st.booleans(),
)
def test_one_garbage_series_makes_the_signal_unknown_never_zero(
    waiting: list[int], kv: list[float], garbage: str, poison: bool
) -> None:
    lines = [f'vllm:num_requests_waiting{{engine="{i}"}} {w}' for i, w in enumerate(waiting)]
    lines += [f'vllm:kv_cache_usage_perc{{engine="{i}"}} {v!r}' for i, v in enumerate(kv)]
    if poison:
        lines.append(f'vllm:num_requests_waiting{{engine="99"}} {garbage}')
    sample = parse_engine_metrics("\n".join(lines) + "\n", engine="vllm-v1")
    assert sample.queue_depth == (None if poison else sum(waiting))
    assert sample.kv_usage == pytest.approx(max(kv))
    assert sample.running is None  # not on the page: unknown
