"""What routing reads from a request body, and the access log that must not leak it."""

from __future__ import annotations

import io
import logging

import orjson
import pytest

from gateway.log import AccessRecord, log_access, setup_logging
from gateway.request_info import build_request_info, decode_body, prompt_text, with_model
from policies.hashing import prefix_block_hashes


@pytest.mark.parametrize(
    "body",
    [b"{}", b'  { "prompt": "x" }', b'{"a":{"b":[1,2]},"model2":"m"}', b"\n{\n}\n"],
)
def test_with_model_splices_without_reserialising(body: bytes) -> None:
    out = with_model(body, 'm"1')
    obj = orjson.loads(out)
    assert obj == {"model": 'm"1', **orjson.loads(body)}
    assert out.endswith(body[body.index(b"{") + 1 :].lstrip())


def test_prompt_text_chat_completion_and_token_ids() -> None:
    chat: dict[str, object] = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]},
        ]
    }
    assert prompt_text(chat, "chat", 1000) == ("system\nbe brief\nuser\nhi\n", 24)
    assert prompt_text(chat, "chat", 10)[0] == "system\nbe "
    assert prompt_text({"prompt": ["first", "second"]}, "completions", 100) == ("first", 5)
    assert prompt_text({"prompt": [1, 22, 333]}, "completions", 4)[0] == "1,22"
    assert prompt_text({"input": "embed me"}, "embeddings", 100) == ("embed me", 8)
    assert prompt_text({"messages": "nope"}, "chat", 100) == ("", 0)


def test_request_info_hashes_only_when_asked() -> None:
    obj = decode_body(orjson.dumps({"model": "m", "prompt": "abcdefgh" * 10}))
    plain = build_request_info(
        obj, seq=1, model="m", stream=True, endpoint="completions", prefix=None
    )
    assert plain.prefix_hashes == () and plain.stream
    hashed = build_request_info(
        obj, seq=2, model="m", stream=False, endpoint="completions", prefix=(16, 3)
    )
    assert hashed.prefix_hashes == prefix_block_hashes("m", "abcdefgh" * 6, 16, 3)
    assert hashed.prompt_chars == 80


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_access_line_has_the_fields_and_nothing_else(fmt: str) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging("INFO", fmt, stream=stream)
        log_access(
            AccessRecord(
                request_id="r1", method="POST", path="/v1/chat/completions", model="m",
                replica="a:1", status=200, duration_s=1.5, ttfb_s=0.25, attempts=2, started=99.0,
            )
        )  # fmt: skip
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    line = stream.getvalue().strip()
    if fmt == "json":
        obj = orjson.loads(line)
        assert obj["request_id"] == "r1" and obj["status"] == 200 and obj["ttfb_s"] == 0.25
        assert obj["replica"] == "a:1" and obj["attempts"] == 2 and "started" not in obj
    else:
        assert "request_id=r1" in line and "status=200" in line and "ttfb_s=0.250000" in line
        assert "started" not in line
