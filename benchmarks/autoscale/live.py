"""The live autoscaling demonstration: KEDA's decisions from the real gateway's /metrics.

For the demo and tests only. A ``LiveAutoscaler`` plays Prometheus + KEDA + the ReplicaSet
controller on loopback:

* every ``scrape_interval_s`` it reads the running gateway's admin ``/metrics`` and takes the
  model's concurrency, ``kvgate_requests_in_flight + kvgate_requests_queued`` (docs/metrics.md),
  exactly what the KEDA trigger in ``config/autoscaling/keda-concurrency`` queries;
* a ``keda.ScaledObjectController`` (the same model the experiment uses; short polling
  interval, cooldown and HPA sync period so a test takes seconds) decides the replica count at
  the times it would run;
* replicas are ``benchmarks.sim.server.SimReplica``s with a cold start (``load_time_s``: the
  port answers 503 on /health while the model "loads"); a replica joins the gateway when it is
  ready - the URL is added to the gateway's static config file, which the gateway re-reads
  (``FileWatch``; ``reload`` is the in-process SIGHUP, ``FileWatch.request_reload``), as an
  EndpointSlice turns ready. Scale-down removes the URL first (the gateway drains it), waits
  for the replica's in-flight requests to finish, then stops it.

Invariants: the config file lists exactly the ready, not-deleted replicas; every replica
started is stopped by ``close``; the controller's clock is the event loop's, from ``start``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from benchmarks.autoscale.controller import Observation, ReplicaStatus
from benchmarks.autoscale.hpa_api import Behavior, ControllerConfig, ScalingPolicy, ScalingRules
from benchmarks.autoscale.keda import ScaledObjectController, ScaledObjectSpec, Trigger
from benchmarks.sim.server import ReplicaSettings, SimReplica
from gateway.app import GatewayServer
from gateway.config import load_config, replica_id
from gateway.discovery.static import FileWatch
from policies.types import ReplicaId

logger = logging.getLogger(__name__)

CONCURRENCY_SERIES = ("kvgate_requests_in_flight", "kvgate_requests_queued")


def concurrency_from_metrics(text: str, model: str) -> float | None:
    """Sum of the model's in-flight and queued gauges in a Prometheus text page (None: absent)."""
    total, seen = 0.0, False
    label = f'model="{model}"'
    for line in text.splitlines():
        if not line.startswith(CONCURRENCY_SERIES):
            continue
        name, _, rest = line.partition("{")
        if name not in CONCURRENCY_SERIES or label not in rest.partition("}")[0]:
            continue
        total += float(line.rsplit(" ", 1)[1])
        seen = True
    return total if seen else None


@dataclass(frozen=True, slots=True)
class LiveSpec:
    model: str
    target: float = 4.0  # concurrent requests per replica (the trigger's threshold)
    max_replicas: int = 4
    cold_start_s: float = 1.0  # SimReplica load_time_s
    scrape_interval_s: float = 0.25
    polling_interval_s: float = 0.5  # KEDA pollingInterval
    cooldown_s: float = 2.0  # KEDA cooldownPeriod (to zero)
    sync_period_s: float = 0.5  # the HPA's sync period
    downscale_window_s: int = 2  # HPA scale-down stabilisation window
    replica: ReplicaSettings = field(default_factory=lambda: ReplicaSettings.fast(0.01))


@dataclass(slots=True)
class _Live:
    replica: SimReplica
    created_s: float
    ready_s: float | None = None
    task: asyncio.Task[None] | None = None


@dataclass(frozen=True, slots=True)
class Sample:
    t: float
    concurrency: float | None
    spec_replicas: int
    ready: int


class LiveAutoscaler:
    def __init__(
        self,
        spec: LiveSpec,
        config_path: Path,
        base_config: dict[str, Any],
        admin_url: Callable[[], str],
        reload: Callable[[], None],
        routable: Callable[[str], bool] = lambda url: False,
    ) -> None:
        self.spec = spec
        self._routable = routable
        self.history: list[Sample] = []
        self.max_ready = 0
        self._path = config_path
        self._base = base_config
        self._admin_url = admin_url
        self._reload = reload
        self._replicas: list[_Live] = []
        self._draining: set[asyncio.Task[None]] = set()
        self._spec_replicas = 0
        self._seed = 0
        self._t0 = 0.0
        self._value: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        down = ScalingRules(
            stabilization_window_s=spec.downscale_window_s,
            policies=(ScalingPolicy("Percent", 100, 1),),
        )
        self.controller = ScaledObjectController(
            ScaledObjectSpec(
                (Trigger("concurrency", spec.target),),
                polling_interval_s=spec.polling_interval_s,
                cooldown_period_s=spec.cooldown_s,
                max_replica_count=spec.max_replicas,
                behavior=Behavior(scale_down=down),
            ),
            ControllerConfig(sync_period_s=spec.sync_period_s),
        )

    # ------------------------------------------------------------------ config file
    @staticmethod
    def write_config(path: Path, base: dict[str, Any], urls: list[str]) -> None:
        """Atomically replace the gateway's config with ``base`` listing ``urls``."""
        data = {**base, "replicas": {"urls": urls}}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kvgate-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(data, f)
        os.replace(tmp, path)

    # ------------------------------------------------------------------ reading
    @property
    def ready(self) -> int:
        return sum(1 for r in self._replicas if r.ready_s is not None)

    @property
    def started(self) -> int:
        """Replicas alive, draining ones included."""
        return len(self._replicas) + len(self._draining)

    async def wait_until(
        self, predicate: Callable[[LiveAutoscaler], bool], timeout_s: float
    ) -> None:
        """Wait (bounded) until ``predicate(self)`` holds; re-checked at every change."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._t0 = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(self._run(), name="live-autoscaler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        tasks = [r.task for r in self._replicas if r.task is not None] + list(self._draining)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(r.replica.stop() for r in self._replicas), return_exceptions=True)
        self._replicas.clear()

    def _now(self) -> float:
        return asyncio.get_running_loop().time() - self._t0

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            next_scrape = 0.0
            while True:
                now = self._now()
                if now >= next_scrape:
                    self._value = await self._scrape(session)
                    next_scrape = now + self.spec.scrape_interval_s
                if now >= self.controller.next_due_s():
                    await self._sync(now)
                wake = min(next_scrape, self.controller.next_due_s())
                await asyncio.sleep(max(0.0, wake - self._now()))

    async def _scrape(self, session: aiohttp.ClientSession) -> float | None:
        try:
            async with session.get(f"{self._admin_url()}/metrics") as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("scraping the gateway failed: %s", exc)
            return None
        return concurrency_from_metrics(text, self.spec.model)

    async def _sync(self, now: float) -> None:
        external = {} if self._value is None else {"concurrency": (self._value,)}
        statuses = tuple(
            ReplicaStatus(str(i), ready=r.ready_s is not None, start_s=r.created_s)
            for i, r in enumerate(self._replicas)
        )
        obs = Observation(
            spec_replicas=self._spec_replicas,
            status_replicas=len(self._replicas),
            replicas=statuses,
            external=external,
        )
        desired = self.controller.observe(now, obs)
        if desired != self._spec_replicas:
            logger.info(
                "scale %d -> %d (concurrency %s)", self._spec_replicas, desired, self._value
            )
            self._spec_replicas = desired
            await self._scale_to(desired)
        self.history.append(Sample(now, self._value, self._spec_replicas, self.ready))
        self._notify()

    async def _scale_to(self, n: int) -> None:
        while len(self._replicas) < n:
            settings = replace(
                self.spec.replica, model=self.spec.model, load_time_s=self.spec.cold_start_s
            )
            rep = SimReplica(settings, seed=self._seed)
            self._seed += 1
            await rep.start()
            live = _Live(rep, self._now())
            live.task = asyncio.create_task(self._await_ready(live))
            self._replicas.append(live)
        if len(self._replicas) > n:
            # Loading replicas go first, then the most recently ready (the ReplicaSet's order).
            self._replicas.sort(key=lambda r: (r.ready_s is not None, r.ready_s or 0.0))
            doomed, self._replicas = (
                self._replicas[: len(self._replicas) - n],
                self._replicas[len(self._replicas) - n :],
            )
            self._publish()
            for live in doomed:
                if live.task is not None:
                    live.task.cancel()
                task = asyncio.create_task(self._drain(live))
                self._draining.add(task)
                task.add_done_callback(self._draining.discard)

    async def _await_ready(self, live: _Live) -> None:
        await live.replica.wait_ready(timeout_s=self.spec.cold_start_s + 30.0)
        live.ready_s = self._now()
        self._publish()
        self.max_ready = max(self.max_ready, self.ready)
        self._notify()

    async def _drain(self, live: _Live) -> None:
        try:
            # As a preStop hook: keep serving until the gateway has taken the replica out of
            # rotation (it re-reads the file asynchronously), then until its requests finish.
            # Polled: the pool notifies membership changes but not a replica turning draining.
            async with asyncio.timeout(30.0):
                while self._routable(live.replica.url):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            await live.replica.wait_for(lambda r: r.inflight_requests == 0, timeout_s=60.0)
        finally:
            await live.replica.stop()
            task = asyncio.current_task()
            if task is not None:
                self._draining.discard(task)
            self._notify()

    def _publish(self) -> None:
        urls = sorted(r.replica.url for r in self._replicas if r.ready_s is not None)
        self.write_config(self._path, self._base, urls)
        self._reload()

    def _notify(self) -> None:
        self._changed.set()


# ---------------------------------------------------------------------- the demonstration
def gateway_base_config(model: str, max_wait_s: float = 30.0) -> dict[str, Any]:
    """The gateway config the demonstration runs (ports chosen by the OS)."""
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "models": {"names": [model]},
        "buffer": {"max_wait_s": max_wait_s},
        "shutdown": {"drain_s": 1.0},
        "logging": {"access_log": False},
    }


@contextlib.asynccontextmanager
async def live_stack(
    spec: LiveSpec, workdir: Path
) -> AsyncIterator[tuple[GatewayServer, LiveAutoscaler]]:
    """A real gateway with no replica, watching its config file, and the autoscaler."""
    path = workdir / "kvgate.yaml"
    base = gateway_base_config(spec.model)
    LiveAutoscaler.write_config(path, base, [])
    server = GatewayServer(load_config(path), config_path=path)
    await server.start()
    watch = server.gateway.discovery
    reload = watch.request_reload if isinstance(watch, FileWatch) else (lambda: None)
    pool = server.gateway.pool

    def routable(url: str) -> bool:
        rid = replica_id(url)
        return rid in pool.ids() and pool.state(ReplicaId(rid)).phase == "ready"

    scaler = LiveAutoscaler(
        spec, path, base, lambda: f"http://127.0.0.1:{server.admin_port}", reload, routable
    )
    try:
        await scaler.start()
        yield server, scaler
    finally:
        await scaler.close()
        await server.stop()


async def burst(port: int, model: str, n: int, max_tokens: int) -> list[int]:
    """``n`` concurrent chat completions through the gateway; their HTTP statuses."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    async with aiohttp.ClientSession() as session:

        async def one() -> int:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            async with session.post(url, json=body) as resp:
                await resp.read()
                return resp.status

        return list(await asyncio.gather(*(one() for _ in range(n))))


async def demonstrate(
    spec: LiveSpec, workdir: Path, *, requests: int = 16, max_tokens: int = 100
) -> dict[str, Any]:
    """Scale from zero under a burst, serve it all, scale back to zero; a summary."""
    async with live_stack(spec, workdir) as (server, scaler):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        statuses = await burst(server.port, spec.model, requests, max_tokens)
        served_s = loop.time() - t0
        timeout = spec.cooldown_s + 10 * spec.polling_interval_s + 20.0
        await scaler.wait_until(lambda s: s.started == 0 and s._spec_replicas == 0, timeout)
        return {
            "statuses": statuses,
            "served_s": served_s,
            "max_ready": scaler.max_ready,
            "scaled_to_zero_s": loop.time() - t0,
            "history": scaler.history,
        }


def main() -> int:
    """``python -m benchmarks.autoscale.live``: the demonstration with A10G-like replicas."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = LiveSpec(
        model="llama-3.1-8b-instruct",
        target=4.0,
        max_replicas=4,
        cold_start_s=5.0,
        polling_interval_s=1.0,
        cooldown_s=10.0,
        sync_period_s=1.0,
        downscale_window_s=5,
        replica=ReplicaSettings.fast(0.02),
    )
    with tempfile.TemporaryDirectory() as d:
        out = asyncio.run(demonstrate(spec, Path(d), requests=24, max_tokens=200))
    codes = sorted(set(out["statuses"]))
    print(
        f"{len(out['statuses'])} requests, statuses {codes}, served in {out['served_s']:.1f} s, "
        f"up to {out['max_ready']} replicas, back to zero after {out['scaled_to_zero_s']:.1f} s"
    )
    return 0 if codes == [200] else 1


if __name__ == "__main__":
    raise SystemExit(main())
