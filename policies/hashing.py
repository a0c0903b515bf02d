"""Stable, chained prompt-prefix block hashes for prefix-affinity routing.

A prompt is cut into blocks of ``block_chars`` characters; block *i*'s hash covers the model name
and every character up to the end of block *i* (each hash is chained from the previous digest),
so two prompts share hash *i* exactly when they share their first *i + 1* blocks — the same
shape as an engine's prefix cache (vLLM hashes 16-token blocks chained from the parent block).

Invariants:

* Stable across processes, restarts and machines: ``hashlib.blake2b(digest_size=8)``, never the
  built-in ``hash()``, which is salted per process (PYTHONHASHSEED).
* Only full blocks are hashed (an engine caches only full blocks); text shorter than one block
  yields ``()``.
* Cost is bounded by ``block_chars * max_blocks`` characters whatever the prompt length.
"""

from __future__ import annotations

from hashlib import blake2b


def prefix_block_hashes(
    model: str, text: str, block_chars: int, max_blocks: int
) -> tuple[int, ...]:
    """Chained 64-bit hashes of the first ``max_blocks`` full ``block_chars``-character blocks."""
    if block_chars < 1:
        raise ValueError(f"block_chars must be >= 1, got {block_chars}")
    if max_blocks < 0:
        raise ValueError(f"max_blocks must be >= 0, got {max_blocks}")
    n_blocks = min(max_blocks, len(text) // block_chars)
    if n_blocks == 0:
        return ()
    # The model name seeds the chain: the same prompt on two models must not share cache entries.
    prev = blake2b(model.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    out: list[int] = []
    for i in range(n_blocks):
        block = text[i * block_chars : (i + 1) * block_chars]
        prev = blake2b(prev + block.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        out.append(int.from_bytes(prev, "big"))
    return tuple(out)
