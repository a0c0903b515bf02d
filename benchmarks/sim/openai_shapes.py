"""The OpenAI wire format as vLLM speaks it: request parsing and pre-encoded response bytes.

Pure functions and small records, no I/O. ``server.py`` parses a request body with
``parse_generation`` / ``parse_embeddings`` and writes what ``StreamShape`` and the ``*_body``
builders return.

Prompt length. A deterministic stand-in tokenizer: one token per 4 characters (rounded up) of
the prompt text; for chat, the text is the messages rendered through a fixed template. A
``/v1/completions`` prompt given as a list of token ids counts one token per id, as the OpenAI
API defines it. Benchmarks that want an exact count without building a long prompt send the
simulator-only top-level field ``"sim_prompt_tokens": 540`` (a real vLLM ignores unknown top-level
fields with a warning, so the same request runs against real replicas).

Prefix hashes. Whole blocks of the prompt (``block_size`` tokens = ``4 * block_size`` bytes of
the UTF-8 text, or ``block_size`` token ids) are hashed in a chain seeded with the model name
(keyed blake2b, stable across processes), so prompts sharing a prefix share leading hashes and
hit the engine's prefix cache. Never more hashes than whole blocks of ``prompt_tokens``.

Output text. Every generated token is one of 16 four-character words, so the output text also
measures about 4 characters per token and never needs JSON escaping.

Invariants: a ``GenerationRequest`` always satisfies ``1 <= prompt_tokens``,
``min_tokens <= max_tokens`` and ``prompt_tokens + max_tokens <= max_model_len``; anything else
raises ``RequestError`` (HTTP 400) with vLLM's message where vLLM has one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import orjson

Kind = Literal["chat", "completion"]

CHARS_PER_TOKEN = 4
WORDS: tuple[bytes, ...] = tuple(
    w.encode()
    for w in (
        " the", " and", " for", " are", " but", " not", " you", " all",
        " any", " can", " her", " was", " one", " our", " out", " day",
    )
)  # fmt: skip
WORD_MASK = len(WORDS) - 1
DONE = b"data: [DONE]\n\n"
SIM_PROMPT_TOKENS_FIELD = "sim_prompt_tokens"


class RequestError(Exception):
    """A request the replica refuses; rendered once as an OpenAI-style error body."""

    def __init__(self, status: int, message: str, err_type: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type


def error_body(status: int, message: str, err_type: str) -> bytes:
    """vLLM's current error shape (``ErrorResponse`` with a nested ``error`` object)."""
    return orjson.dumps(
        {"error": {"message": message, "type": err_type, "param": None, "code": status}}
    )


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One parsed chat or completion request, limits already applied."""

    kind: Kind
    model: str
    stream: bool
    include_usage: bool
    prompt_tokens: int
    block_hashes: tuple[int, ...]
    max_tokens: int  # never None: vLLM fills in max_model_len - prompt_tokens
    min_tokens: int
    ignore_eos: bool
    seed: int | None


def count_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


def _chain(blocks: Sequence[bytes], model: str) -> tuple[int, ...]:
    prev = hashlib.blake2b(model.encode(), digest_size=16).digest()
    out: list[int] = []
    for block in blocks:
        prev = hashlib.blake2b(block, digest_size=16, key=prev).digest()
        out.append(int.from_bytes(prev[:8], "little"))
    return tuple(out)


def text_block_hashes(text: str, model: str, block_size: int, max_blocks: int) -> tuple[int, ...]:
    data = text.encode()
    size = block_size * CHARS_PER_TOKEN
    n = min(len(data) // size, max_blocks)
    return _chain([data[i * size : (i + 1) * size] for i in range(n)], model)


def token_block_hashes(ids: Sequence[int], model: str, block_size: int) -> tuple[int, ...]:
    n = len(ids) // block_size
    blocks = [
        b"".join(
            i.to_bytes(4, "little", signed=True) for i in ids[k * block_size : (k + 1) * block_size]
        )
        for k in range(n)
    ]
    return _chain(blocks, model)


def render_chat(messages: object) -> str:
    """The chat template stand-in: role markers around each message's text."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list")
    parts: list[str] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise RequestError(400, f"messages[{i}] must be an object with a string 'role'")
        content = msg.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = "".join(
                p["text"]
                for p in content
                if isinstance(p, dict)
                and p.get("type") == "text"
                and isinstance(p.get("text"), str)
            )
        else:
            raise RequestError(400, f"messages[{i}].content must be a string or a list of parts")
        parts.append(f"<|{msg['role']}|>\n{text}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


def _opt_int(body: dict[str, object], key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"'{key}' must be an integer")
    if value < minimum:
        raise RequestError(400, f"'{key}' must be at least {minimum}, got {value}")
    return value


def _opt_bool(body: dict[str, object], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(400, f"'{key}' must be a boolean")
    return value


def check_model(body: dict[str, object], served_model: str) -> str:
    model = body.get("model")
    if model is None:
        return served_model  # vLLM serves the first served model name when none is given
    if not isinstance(model, str):
        raise RequestError(400, "'model' must be a string")
    if model != served_model:
        raise RequestError(404, f"The model `{model}` does not exist.", "NotFoundError")
    return model


def _completion_prompt(prompt: object, model: str, block_size: int) -> tuple[int, tuple[int, ...]]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one is the same request
    if isinstance(prompt, str):
        n = count_tokens(prompt)
        return n, text_block_hashes(prompt, model, block_size, n // block_size)
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return len(prompt), token_block_hashes(prompt, model, block_size)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise RequestError(400, "the simulator serves one prompt per request, not a batch")
    raise RequestError(400, "'prompt' must be a string or a list of token ids")


def _prompt(
    body: dict[str, object], kind: Kind, model: str, block_size: int
) -> tuple[int, tuple[int, ...], int | None]:
    """(prompt tokens, prefix block hashes, requested max tokens or None)."""
    if kind == "chat":
        text = render_chat(body.get("messages"))
        prompt_tokens = count_tokens(text)
        hashes = text_block_hashes(text, model, block_size, prompt_tokens // block_size)
        max_tokens = _opt_int(body, "max_completion_tokens", 1)
        if max_tokens is None:
            max_tokens = _opt_int(body, "max_tokens", 1)
    else:
        if "prompt" not in body:
            raise RequestError(400, "'prompt' is required")
        prompt_tokens, hashes = _completion_prompt(body["prompt"], model, block_size)
        max_tokens = _opt_int(body, "max_tokens", 1)
    explicit = _opt_int(body, SIM_PROMPT_TOKENS_FIELD, 1)
    if explicit is not None:
        prompt_tokens = explicit
        hashes = hashes[: explicit // block_size]
    if prompt_tokens < 1:
        raise RequestError(400, "the prompt is empty")
    return prompt_tokens, hashes, max_tokens


def _streaming(body: dict[str, object]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = _opt_bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise RequestError(400, "Stream options can only be defined when `stream=True`.")
    if not isinstance(options, dict):
        raise RequestError(400, "'stream_options' must be an object")
    return stream, _opt_bool(options, "include_usage")


def parse_generation(
    body: object, kind: Kind, *, served_model: str, max_model_len: int, block_size: int
) -> GenerationRequest:
    """Validate a chat/completion body the way vLLM's OpenAI front end does."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = check_model(body, served_model)
    prompt_tokens, hashes, max_tokens = _prompt(body, kind, model, block_size)
    if _opt_int(body, "n", 1) not in (None, 1):
        raise RequestError(400, "the simulator generates one choice per request ('n' must be 1)")
    stream, include_usage = _streaming(body)
    if max_tokens is None:
        max_tokens = max_model_len - prompt_tokens  # vLLM's default: the rest of the context
    if prompt_tokens + max_tokens > max_model_len or max_tokens < 1:
        raise RequestError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages or "
            "completion.",
        )
    min_tokens = _opt_int(body, "min_tokens", 0) or 0
    if min_tokens > max_tokens:
        raise RequestError(
            400,
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.",
        )
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, "'seed' must be an integer")
    return GenerationRequest(
        kind=kind,
        model=model,
        stream=stream,
        include_usage=include_usage,
        prompt_tokens=prompt_tokens,
        block_hashes=hashes,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        ignore_eos=_opt_bool(body, "ignore_eos"),
        seed=seed,
    )


def parse_embeddings(body: object, *, served_model: str) -> tuple[str, list[bytes], int]:
    """Returns (model, one seed per input, total prompt tokens)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = check_model(body, served_model)
    raw = body.get("input")
    items: list[object] = raw if isinstance(raw, list) and raw else [raw]
    if isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw):
        items = [raw]  # one input given as token ids
    seeds: list[bytes] = []
    tokens = 0
    for item in items:
        if isinstance(item, str) and item:
            seeds.append(item.encode())
            tokens += count_tokens(item)
        elif isinstance(item, list) and item and all(isinstance(t, int) for t in item):
            seeds.append(orjson.dumps(item))
            tokens += len(item)
        else:
            raise RequestError(
                400, "'input' must be a non-empty string, token list, or list of those"
            )
    return model, seeds, tokens


def output_text(n: int) -> str:
    return b"".join(WORDS[i & WORD_MASK] for i in range(n)).decode()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


class StreamShape:
    """Pre-encoded SSE events of one streaming response, in vLLM's chunk shape.

    A token event is a cached bytes object per word, so writing a token costs a list lookup.
    vLLM sends the role chunk (chat) together with the first token, the finish reason in the
    chunk of the last token, then the usage chunk (``include_usage``) and ``[DONE]``.
    """

    __slots__ = ("_final_head", "_final_tail", "_usage_head", "role_chunk", "tokens")

    def __init__(self, kind: Kind, request_id: str, created: int, model: str) -> None:
        obj = b"chat.completion.chunk" if kind == "chat" else b"text_completion"
        head = b'data: {"id":"%s","object":"%s","created":%d,"model":%s,"choices":[' % (
            request_id.encode(),
            obj,
            created,
            orjson.dumps(model),
        )
        if kind == "chat":
            choice = b'{"index":0,"delta":{"content":"'
            tail = b'"},"logprobs":null,"finish_reason":null}]}\n\n'
            self._final_tail = b'"},"logprobs":null,"finish_reason":"%s","stop_reason":null}]}\n\n'
            self.role_chunk = (
                head + b'{"index":0,"delta":{"role":"assistant","content":""},'
                b'"logprobs":null,"finish_reason":null}]}\n\n'
            )
        else:
            choice = b'{"index":0,"text":"'
            tail = b'","logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
            self._final_tail = b'","logprobs":null,"finish_reason":"%s","stop_reason":null}]}\n\n'
            self.role_chunk = b""
        self.tokens: tuple[bytes, ...] = tuple(head + choice + w + tail for w in WORDS)
        self._final_head = head + choice
        self._usage_head = head

    def final_chunk(self, index: int, finish_reason: str) -> bytes:
        return (
            self._final_head + WORDS[index & WORD_MASK] + self._final_tail % finish_reason.encode()
        )

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        usage = orjson.dumps(_usage(prompt_tokens, completion_tokens))
        return self._usage_head + b'],"usage":' + usage + b"}\n\n"


def completion_body(
    req: GenerationRequest, request_id: str, created: int, n_tokens: int, finish_reason: str
) -> bytes:
    text = output_text(n_tokens)
    choice: dict[str, object]
    if req.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
        obj = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
            "prompt_logprobs": None,
        }
        obj = "text_completion"
    return orjson.dumps(
        {
            "id": request_id,
            "object": obj,
            "created": created,
            "model": req.model,
            "choices": [choice],
            "usage": _usage(req.prompt_tokens, n_tokens),
        }
    )


def models_body(model: str, max_model_len: int, created: int, owned_by: str) -> bytes:
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {
                    "id": model,
                    "object": "model",
                    "created": created,
                    "owned_by": owned_by,
                    "root": model,
                    "parent": None,
                    "max_model_len": max_model_len,
                    "permission": [
                        {
                            "id": "modelperm-sim",
                            "object": "model_permission",
                            "created": created,
                            "allow_create_engine": False,
                            "allow_sampling": True,
                            "allow_logprobs": True,
                            "allow_search_indices": False,
                            "allow_view": True,
                            "allow_fine_tuning": False,
                            "organization": "*",
                            "group": None,
                            "is_blocking": False,
                        }
                    ],
                }
            ],
        }
    )


def embeddings_body(
    model: str, request_id: str, created: int, seeds: list[bytes], tokens: int, dim: int
) -> bytes:
    """Deterministic unit-norm vectors derived from each input's hash: same input, same vector."""
    data = []
    for index, seed in enumerate(seeds):
        raw = hashlib.blake2b(seed, digest_size=64).digest() * (-(-dim // 64))
        vec = [b - 127.5 for b in raw[:dim]]
        norm = sum(v * v for v in vec) ** 0.5 or 1.0
        data.append({"index": index, "object": "embedding", "embedding": [v / norm for v in vec]})
    return orjson.dumps(
        {
            "id": request_id,
            "object": "list",
            "created": created,
            "model": model,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }
    )
