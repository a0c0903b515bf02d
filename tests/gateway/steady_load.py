"""Steady client traffic through a gateway while a test changes the replicas under it.

``async with SteadyLoad(url, model, clients=6) as load: ...`` keeps ``clients`` closed loops
sending small chat requests (every other one streamed) until the block ends, then waits for the
requests in flight. ``load.failures`` lists every request that did not end in a complete 200
(status, or the exception's name; a stream must end with ``[DONE]``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from types import TracebackType

import aiohttp


class SteadyLoad:
    def __init__(self, base_url: str, model: str, *, clients: int = 6, tokens: int = 8) -> None:
        self._url = f"{base_url}/v1/chat/completions"
        self._model = model
        self._clients = clients
        self._tokens = tokens
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self.done = 0
        self.failures: list[str] = []
        self.progress = asyncio.Event()  # set after every finished request

    async def __aenter__(self) -> SteadyLoad:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self._clients)]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        assert self._session is not None
        await self._session.close()

    async def wait_for_requests(self, n: int, limit_s: float = 5.0) -> None:
        """Until ``n`` more requests have finished (traffic really flows)."""
        target = self.done + n
        async with asyncio.timeout(limit_s):
            while self.done < target:
                self.progress.clear()
                await self.progress.wait()

    def summary(self) -> Counter[str]:
        return Counter(self.failures)

    async def _client(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            stream = (i + n) % 2 == 1
            n += 1
            try:
                outcome = await self._one(stream)
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome = type(exc).__name__
            if outcome != "ok":
                self.failures.append(outcome)
            self.done += 1
            self.progress.set()

    async def _one(self, stream: bool) -> str:
        assert self._session is not None
        body = {
            "model": self._model,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": self._tokens,
            "ignore_eos": True,
            "stream": stream,
        }
        async with asyncio.timeout(10), self._session.post(self._url, json=body) as resp:
            data = await resp.read()
            if resp.status != 200:
                return f"status {resp.status}: {data[:200]!r}"
            if stream and not data.rstrip().endswith(b"data: [DONE]"):
                return f"stream without [DONE]: {data[-200:]!r}"
            return "ok"
