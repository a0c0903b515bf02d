"""The issue's "straightforward aiohttp + uvloop proxy" as a calibration row.

The issue quotes ≈ 158 µs per request and ≈ 27 µs per chunk for it on the reference machine;
measuring it in the same run shows how fast this machine is today, and how much of kvgate's
cost is aiohttp's and how much its own. No routing, metrics, logging or error handling: a
random replica, the body forwarded, the answer relayed chunk by chunk.

``python -m benchmarks.proxy.baseline --port P --replica URL [--replica URL ...]``
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import AsyncIterator, Sequence

import aiohttp
import uvloop
from aiohttp import web

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "date", "server"}


def build_app(replicas: Sequence[str]) -> web.Application:
    session: aiohttp.ClientSession | None = None

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        nonlocal session
        connector = aiohttp.TCPConnector(limit=0)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        yield
        await session.close()

    async def forward(request: web.Request) -> web.StreamResponse:
        assert session is not None
        body = await request.read()
        url = random.choice(replicas) + request.path_qs
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with session.request(request.method, url, data=body, headers=headers) as up:
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            if up.content_type != "text/event-stream":
                payload = await up.read()
                return web.Response(status=up.status, body=payload, headers=out_headers)
            resp = web.StreamResponse(status=up.status, headers=out_headers)
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.cleanup_ctx.append(lifecycle)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replica", action="append", required=True)
    args = parser.parse_args(argv)
    app = build_app(args.replica)
    loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
