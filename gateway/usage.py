"""Token counts from what replicas send back, read without decoding whole bodies.

``usage_tokens`` finds the OpenAI ``usage`` object of a response body or of a stream's last
events; ``stream_token_estimate`` counts a stream's events when the replica sent no usage.
Both run once per request (``GatewayMetrics.stream_finished``/``response_finished``), on the
bytes the proxy already holds: nothing here is on the per-chunk path.

Prompt tokens come only from ``usage``: counting them would need the model's tokenizer.
"""

from __future__ import annotations

import re
from typing import Final

_USAGE_OBJECT: Final = re.compile(rb'"usage"\s*:\s*\{')
_PROMPT_TOKENS: Final = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS: Final = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_USAGE_WINDOW = 512  # bytes after "usage": {  — the object is small and flat up front


def usage_tokens(buf: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of the last ``"usage": {...}`` object in ``buf``, or None.

    A byte search and two bounded regexes instead of decoding the body: bodies can be large
    (embeddings), and the usage object is the last ``"usage"`` key of an OpenAI response or
    stream. ``"usage": null`` (OpenAI-style chunks before the usage chunk) is None.
    """
    at = buf.rfind(b'"usage"')
    if at < 0:
        return None
    match = _USAGE_OBJECT.match(buf, at)
    if match is None:
        return None
    window = buf[match.end() : match.end() + _USAGE_WINDOW]
    prompt = _PROMPT_TOKENS.search(window)
    completion = _COMPLETION_TOKENS.search(window)
    if prompt is None and completion is None:
        return None
    return (int(prompt[1]) if prompt else 0, int(completion[1]) if completion else 0)


def stream_token_estimate(newlines: int, tail: bytes, *, chat: bool) -> int:
    """Generated tokens of a stream without usage: its ``data:`` events, less ``[DONE]`` and the
    chat role chunk that vLLM and SGLang send before the first token.

    Every OpenAI-style event is one ``data:`` line and a blank line, two newlines whether lines
    end in LF or CRLF. An engine that puts several tokens in one event (vLLM may, while it holds
    back a partial UTF-8 sequence or a stop string) makes this an estimate.
    """
    events = newlines // 2
    if tail.rstrip().endswith(b"[DONE]"):  # a JSON event ends in "}"
        events -= 1
    if chat and events > 0:
        events -= 1
    return max(0, events)
