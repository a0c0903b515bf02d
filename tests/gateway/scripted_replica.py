"""A replica whose answers a test scripts: a real aiohttp server on 127.0.0.1 speaking just
enough of an engine's HTTP API (``/v1/models``, ``/health``, ``/metrics``, chat completions),
that records every request it receives — method, path, headers — including requests for paths
it does not serve. For what the simulator cannot do on purpose: serve a broken ``/metrics``
page, or tell a test exactly which headers and paths reached a replica.

``metrics`` is the page served (bytes, or a callable returning bytes), changeable at any time;
``metrics_status``/``metrics_headers`` likewise. ``hang_metrics`` makes ``/metrics`` never
answer. Chat completions answer at once, as JSON or as a short SSE stream (``stream: true``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "metrics"


def vllm_page(waiting: int = 0, running: int = 0, kv: float = 0.0) -> bytes:
    return (
        "# HELP vllm:num_requests_waiting Number of requests waiting.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{engine="0",model_name="m"}} {waiting}\n'
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{engine="0",model_name="m"}} {running}\n'
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f'vllm:kv_cache_usage_perc{{engine="0",model_name="m"}} {kv}\n'
    ).encode()


@dataclass(frozen=True)
class Seen:
    method: str
    path: str  # as the server parsed it, before any normalisation of ours
    raw_path: str
    headers: CIMultiDict[str]


@dataclass
class ScriptedReplica:
    model: str = "m"
    metrics: bytes | Callable[[], bytes] = field(default_factory=vllm_page)
    metrics_status: int = 200
    metrics_headers: dict[str, str] = field(default_factory=dict)
    hang_metrics: bool = False
    models_body: bytes | None = None  # served as /v1/models instead of the real list
    seen: list[Seen] = field(default_factory=list)
    metrics_scrapes: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        """Paths of every request but the gateway's own control-plane calls."""
        control = ("/metrics", "/v1/metrics", "/health", "/v1/models")
        return [s.path for s in self.seen if s.path not in control]

    def generation_requests(self) -> list[Seen]:
        return [s for s in self.seen if s.path.endswith("/completions")]

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_route("*", "/{tail:.*}", self._anything)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _record(
        self, request: web.Request, handler: Callable[[web.Request], object]
    ) -> web.StreamResponse:
        self.seen.append(
            Seen(request.method, request.path, request.raw_path, CIMultiDict(request.headers))
        )
        response = await handler(request)  # type: ignore[misc]
        assert isinstance(response, web.StreamResponse)
        return response

    async def _models(self, _request: web.Request) -> web.Response:
        if self.models_body is not None:
            return web.Response(body=self.models_body, content_type="application/json")
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "t"}]}
        )

    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response()

    async def _metrics(self, _request: web.Request) -> web.Response:
        self.metrics_scrapes += 1
        if self.hang_metrics:
            await asyncio.Event().wait()
        body = self.metrics() if callable(self.metrics) else self.metrics
        return web.Response(
            status=self.metrics_status,
            body=body,
            headers={"Content-Type": "text/plain; version=0.0.4", **self.metrics_headers},
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        completion = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
        }
        if not body.get("stream"):
            return web.json_response(completion)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "model": self.model,
            "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}],
        }
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _anything(self, _request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "not found"}}, status=404)


StartScripted = Callable[..., Awaitable[list[ScriptedReplica]]]


@contextlib.asynccontextmanager
async def scripted_replicas() -> AsyncIterator[StartScripted]:
    """``start(2, metrics=b"...")`` starts replicas; all are stopped when the block ends. Test
    modules wrap it in a fixture."""
    started: list[ScriptedReplica] = []

    async def start(n: int = 1, **fields: Any) -> list[ScriptedReplica]:
        out = []
        for _ in range(n):
            replica = ScriptedReplica(**fields)
            started.append(replica)
            await replica.start()
            out.append(replica)
        return out

    try:
        yield start
    finally:
        for replica in started:
            await replica.stop()
