"""Proxy overhead benchmark (issue 9): kvgate against direct, nginx and the Rust routers.

``python -m benchmarks.proxy`` (``make bench-proxy``) runs it; ``benchmarks/proxy/run.py``
describes what is measured and how. The pieces, each its own process:

- ``upstream``: a fixed-response OpenAI-compatible replica stand-in, cheap enough that it
  never limits the proxy under test (its CPU is reported);
- ``loadgen``: a raw-protocol asyncio client (open-loop latency, SSE streams, idle streams)
  and the process accounting (``/proc/<pid>/stat``) shared with the orchestrator; ``wrk``
  drives the maximum request rate;
- ``nginx``: the C reference, a plain reverse proxy config written per run.
"""
