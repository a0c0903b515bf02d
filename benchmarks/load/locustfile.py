"""Locust users that stream OpenAI chat/completions requests drawn from our seeded workloads.

    locust -f benchmarks/load/locustfile.py --headless -u 8 -r 8 -t 60s \\
        --host http://127.0.0.1:8080 --user-rate 1.5 --workload openorca --csv out/locust

Each user runs its task at a constant throughput (``constant_throughput(--user-rate)``), so the
offered load is ``users × user-rate`` requests per second as long as each request finishes
within ``1/user-rate`` seconds (the seed recipe: RPS = users × rate). Past that point Locust's
users are a closed loop; use ``benchmarks.load.openloop`` for true open-loop arrivals.

Statistics entries:

* ``POST <path>``: the whole streamed request, response time = send to last byte, response
  length = output tokens. A non-200, an ``error`` event, a broken stream or a stream without
  ``[DONE]`` is a failure.
* ``TTFT <path>``: time to the first non-empty content chunk, fired through the events API as
  its own request type, so Locust computes its percentiles and CSV columns like any request's.
* ``TPOT <path>``: per request, (e2e - TTFT) / (output tokens - 1).

Options (also as environment variables): ``--model`` / ``KVGATE_MODEL`` (default: the first
model at ``/v1/models``), ``--api chat|completions`` / ``KVGATE_API``, ``--workload`` /
``KVGATE_WORKLOAD``, ``--workload-seed`` / ``KVGATE_WORKLOAD_SEED``, ``--workload-params``
``k=v,k=v`` / ``KVGATE_WORKLOAD_PARAMS``, ``--user-rate`` / ``KVGATE_USER_RATE``,
``--no-sim-fields`` / ``KVGATE_NO_SIM_FIELDS``.

All users of one Locust process share one workload stream (gevent runs one user at a time, so
``next()`` needs no lock); in distributed mode every worker process replays the same stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import requests
from locust import HttpUser, constant_throughput, events, task
from locust.env import Environment

from benchmarks.load.openloop import Api, request_body
from benchmarks.load.workloads import WORKLOADS, RequestSpec, make_workload


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    group = parser.add_argument_group("kvgate")
    group.add_argument("--model", env_var="KVGATE_MODEL", default="", help="default: discovered")
    group.add_argument(
        "--api", env_var="KVGATE_API", default="chat", choices=("chat", "completions")
    )
    group.add_argument(
        "--workload", env_var="KVGATE_WORKLOAD", default="openorca", choices=sorted(WORKLOADS)
    )
    group.add_argument("--workload-seed", env_var="KVGATE_WORKLOAD_SEED", type=int, default=0)
    group.add_argument(
        "--workload-params", env_var="KVGATE_WORKLOAD_PARAMS", default="",
        help="comma-separated integer options, e.g. max_total_tokens=4096",
    )  # fmt: skip
    group.add_argument(
        "--user-rate", env_var="KVGATE_USER_RATE", type=float, default=1.0,
        help="requests per second per user (RPS = users × user-rate)",
    )  # fmt: skip
    group.add_argument(
        "--no-sim-fields", env_var="KVGATE_NO_SIM_FIELDS", action="store_true",
        help="do not send the simulator's sim_prompt_tokens field",
    )  # fmt: skip


class _Shared:
    """Process-wide state built once from the parsed options."""

    specs: Iterator[RequestSpec] | None = None
    model: str = ""


def _params(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = item.partition("=")
        out[key.strip()] = int(value)
    return out


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is None:  # used as a library without Locust's parser
        return
    wl = make_workload(opts.workload, opts.workload_seed, **_params(opts.workload_params))
    _Shared.specs = iter(wl)
    _Shared.model = opts.model


def _discover_model(host: str) -> str:
    resp = requests.get(host.rstrip("/") + "/v1/models", timeout=10)
    resp.raise_for_status()
    return str(resp.json()["data"][0]["id"])


class OpenAIStreamingUser(HttpUser):
    """One streaming client; its pacing and request mix come from the command line."""

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.api: Api = "completions" if opts is not None and opts.api == "completions" else "chat"
        self.path = "/v1/chat/completions" if self.api == "chat" else "/v1/completions"
        self.sim_fields = not (opts is not None and opts.no_sim_fields)
        self._pace = constant_throughput(opts.user_rate if opts is not None else 1.0)
        if _Shared.specs is None:
            _Shared.specs = iter(make_workload("openorca"))
        if not _Shared.model:
            _Shared.model = _discover_model(self.host or "")

    def wait_time(self) -> float:
        return self._pace(self)

    @task
    def generate(self) -> None:
        assert _Shared.specs is not None
        spec = next(_Shared.specs)
        body = request_body(
            spec, model=_Shared.model, api=self.api, sim_prompt_tokens=self.sim_fields
        )
        start = time.perf_counter()
        with self.client.post(
            self.path, json=body, stream=True, catch_response=True, name=self.path
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            try:
                ttft, tokens, failure = self._consume(resp, start)
            except (requests.RequestException, ValueError) as exc:
                ttft, tokens, failure = None, 0, f"disconnect: {type(exc).__name__}"
            e2e = time.perf_counter() - start
            # Locust timed only up to the headers (stream=True); report the whole stream.
            resp.request_meta["response_time"] = e2e * 1000
            resp.request_meta["response_length"] = tokens
            if failure is not None:
                resp.failure(failure)
                return
            resp.success()
        if ttft is not None:
            self._fire("TTFT", ttft)
            if tokens > 1:
                self._fire("TPOT", (e2e - ttft) / (tokens - 1))

    def _consume(self, resp: Any, start: float) -> tuple[float | None, int, str | None]:
        """Read the SSE stream: (TTFT, output tokens, failure reason or None)."""
        ttft: float | None = None
        chunks = 0
        usage: int | None = None
        for line in resp.iter_lines(chunk_size=None):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return ttft, usage if usage is not None else chunks, None
            obj = json.loads(payload)
            if "error" in obj:
                return ttft, chunks, "stream error event"
            for choice in obj.get("choices") or ():
                text = (choice.get("delta") or {}).get("content") or choice.get("text")
                if text:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    chunks += 1
            if obj.get("usage"):
                usage = obj["usage"].get("completion_tokens")
        return ttft, chunks, "stream ended without [DONE]"

    def _fire(self, kind: str, seconds: float) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=self.path,
            response_time=seconds * 1000,
            response_length=0,
            exception=None,
            context=self.context(),
        )
