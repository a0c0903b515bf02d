"""What routing needs from an OpenAI-compatible request body, and nothing more.

The only module that knows the request schema. It reads ``model``, ``stream`` and the prompt
text (for prefix affinity) from a body decoded once with orjson; the body forwarded to the
replica is the client's original bytes (``with_model`` splices a default model into them
without re-serialising the rest).

Invariants: the prompt text is used only to compute prefix-block hashes and is never stored or
logged; its cost is bounded by ``block_chars * max_blocks`` characters whatever the prompt size.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import orjson

from gateway.errors import InvalidJson, InvalidRequest
from policies.hashing import prefix_block_hashes
from policies.types import RequestInfo

Endpoint = Literal["chat", "completions", "embeddings"]


def decode_body(body: bytes) -> dict[str, object]:
    """The request as a JSON object; 400 for invalid JSON or any other JSON value."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(obj).__name__}")
    return obj


def requested_model(obj: dict[str, object]) -> str | None:
    model = obj.get("model")
    if model is None:
        return None
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string")
    return model


def requested_stream(obj: dict[str, object]) -> bool:
    stream = obj.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean")
    return stream


def with_model(body: bytes, model: str) -> bytes:
    """``body`` (a JSON object without "model") with ``"model": model`` as its first member."""
    start = body.index(b"{") + 1
    rest = body[start:].lstrip()
    sep = b"" if rest.startswith(b"}") else b","
    return b"{" + b'"model":' + orjson.dumps(model) + sep + rest


def prompt_text(obj: dict[str, object], endpoint: Endpoint, limit: int) -> tuple[str, int]:
    """The first ``limit`` characters of the prompt, and the prompt's total length in chars.

    Chat messages are joined as ``role\\ncontent\\n`` so a shared system prompt and history give
    a shared prefix, as the engine's chat template would.
    """
    if endpoint == "chat":
        parts = _chat_parts(obj.get("messages"))
    else:
        parts = _prompt_parts(obj.get("prompt" if endpoint == "completions" else "input"), limit)
    out: list[str] = []
    kept = 0
    total = 0
    for part in parts:
        total += len(part)
        if kept < limit:
            piece = part[: limit - kept]
            out.append(piece)
            kept += len(piece)
    return "".join(out), total


def _chat_parts(messages: object) -> Iterable[str]:
    if not isinstance(messages, list):
        return
    for m in messages:
        if not isinstance(m, dict):
            continue
        role = m.get("role")
        yield f"{role if isinstance(role, str) else ''}\n"
        content = m.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for c in content:
                if isinstance(c, dict) and isinstance(c.get("text"), str):
                    yield c["text"]
        yield "\n"


def _prompt_parts(prompt: object, limit: int) -> Iterable[str]:
    # str | list[str] | list[int] (token ids) | list[list[int]]: the first prompt only; a token
    # id is at least one character, so ``limit`` ids cover the ``limit`` characters hashed.
    if isinstance(prompt, str):
        yield prompt
    elif isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):
            yield first
        elif isinstance(first, int):
            yield ",".join(str(t) for t in prompt[:limit] if isinstance(t, int))
        elif isinstance(first, list):
            yield ",".join(str(t) for t in first[:limit] if isinstance(t, int))


def build_request_info(
    obj: dict[str, object],
    *,
    seq: int,
    model: str,
    stream: bool,
    endpoint: Endpoint,
    prefix: tuple[int, int] | None,
) -> RequestInfo:
    """``prefix`` is (block_chars, max_blocks) when the policy uses prefix hashes, else None."""
    if prefix is None:
        return RequestInfo(seq=seq, model=model, stream=stream)
    block_chars, max_blocks = prefix
    text, total = prompt_text(obj, endpoint, block_chars * max_blocks)
    return RequestInfo(
        seq=seq,
        model=model,
        stream=stream,
        prefix_hashes=prefix_block_hashes(model, text, block_chars, max_blocks),
        prompt_chars=total,
    )
