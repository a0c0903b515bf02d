"""``make demo`` end to end, in-process and on free ports: replicas up, one chat completion."""

from __future__ import annotations

import pytest

from benchmarks import demo


async def test_demo_serves_a_chat_completion(capsys: pytest.CaptureFixture[str]) -> None:
    args = demo.parse_args(
        ["--smoke", "--replicas", "2", "--port", "0", "--admin-port", "0", "--replica-port", "0"]
    )
    assert await demo.run(args) == 0
    assert "smoke: 16 tokens" in capsys.readouterr().out


def test_demo_instructions_name_every_entry_point() -> None:
    text = demo.instructions("http://h:1", "http://h:2", "m", 4)
    for needle in ("http://h:1/v1", "http://h:2/metrics", "/debug/replicas", "OpenAI(", "curl"):
        assert needle in text
