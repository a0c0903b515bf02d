"""``make demo``: four simulated vLLM replicas and kvgate in front of them, in the foreground.

    python -m benchmarks.demo                 # replicas on :8001-8004, gateway :8080, admin :9090
    python -m benchmarks.demo --smoke         # start, send one chat completion, stop (CI check)

The replicas are ``benchmarks.sim`` replicas (the A10G / Llama-3.1-8B profile, ready at once,
vLLM v1 metrics) running in this process; the gateway is the real ``GatewayServer`` with
``config/demo.yaml`` (ports overridable). Ctrl-C stops everything. Exit status 1 if a port is
taken or the smoke request fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import replace
from pathlib import Path

import msgspec
import openai
import uvloop

from benchmarks.sim.server import ReplicaSettings, SimReplica
from gateway.app import GatewayServer
from gateway.config import GatewayConfig, StaticReplicas, load_config
from gateway.log import setup_logging

CONFIG = Path(__file__).resolve().parents[1] / "config" / "demo.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--replica-port", type=int, default=8001, help="first replica port; 0 = free")
    p.add_argument("--port", type=int, default=None, help="gateway port (default: config's)")
    p.add_argument("--admin-port", type=int, default=None, help="admin port (default: config's)")
    p.add_argument("--smoke", action="store_true", help="one chat completion, then exit")
    return p.parse_args(argv)


def demo_config(args: argparse.Namespace, urls: list[str]) -> GatewayConfig:
    cfg = load_config(CONFIG)
    listen, admin = cfg.listen, cfg.admin
    if args.port is not None:
        listen = msgspec.structs.replace(listen, port=args.port)
    if args.admin_port is not None:
        admin = msgspec.structs.replace(admin, port=args.admin_port)
    replicas = StaticReplicas(urls=urls)
    return msgspec.structs.replace(cfg, listen=listen, admin=admin, replicas=replicas)


def instructions(api: str, admin: str, model: str, n: int) -> str:
    chat = (
        f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], '
        '"max_tokens": 32'
    )
    sdk = (
        "from openai import OpenAI; "
        f'c = OpenAI(base_url="{api}/v1", api_key="unused"); '
        f'r = c.chat.completions.create(model="{model}", '
        'messages=[{"role": "user", "content": "Hello!"}], max_tokens=32); '
        "print(r.choices[0].message.content, r.usage)"
    )
    return f"""
kvgate demo is up: {n} simulated vLLM replicas (A10G, Llama-3.1-8B) behind the gateway.

  OpenAI API      {api}/v1        model: {model}
  Metrics         {admin}/metrics
  Replica state   {admin}/debug/replicas
  Readiness       {admin}/readyz

Try:
  curl -s {api}/v1/models
  curl -s {api}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{chat}}}'
  curl -sN {api}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{chat}, "stream": true}}'
  .venv/bin/python -c '{sdk}'
  curl -s {admin}/metrics | grep -E '^kvgate_(requests_(total|in_flight)|replica_queue_depth)'

Ctrl-C stops everything.
"""


async def smoke(api: str, model: str) -> None:
    async with openai.AsyncOpenAI(base_url=api + "/v1", api_key="unused") as client:
        r = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=16
        )
    tokens = r.usage.completion_tokens if r.usage else 0
    print(f"smoke: {tokens} tokens: {r.choices[0].message.content!r}", flush=True)


async def run(args: argparse.Namespace) -> int:
    settings = ReplicaSettings(load_time_s=0.0)
    replicas = []
    for i in range(args.replicas):
        port = args.replica_port + i if args.replica_port else 0
        replicas.append(SimReplica(replace(settings, port=port), seed=i))
    server: GatewayServer | None = None
    try:
        for r in replicas:
            await r.start()
        server = GatewayServer(demo_config(args, [r.url for r in replicas]))
        await server.start()
        await server.gateway.catalog.refresh_once()  # list models before saying "try it"
        api = f"http://127.0.0.1:{server.port}"
        admin = f"http://127.0.0.1:{server.admin_port}"
        model = replicas[0].model
        if args.smoke:
            await smoke(api, model)
            return 0
        print(instructions(api, admin, model, len(replicas)), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("\nstopping...", flush=True)
        return 0
    finally:
        if server is not None:
            await server.stop()
        await asyncio.gather(*(r.stop() for r in replicas), return_exceptions=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("INFO", "plain")
    logging.getLogger("benchmarks.sim").setLevel(logging.WARNING)
    try:
        return uvloop.run(run(args))
    except OSError as exc:  # a port is taken
        print(
            f"demo: {exc} (pass other ports: --port, --admin-port, --replica-port)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
