"""Wiring: one gateway's components, its two aiohttp apps and their lifecycle.

``build_app(cfg, clock=, rng=, registry=)`` assembles pool, policy, router, catalog, scraper and
proxy into a ``Gateway`` (stored under ``GATEWAY``) and returns the proxy app; the admin app
(``gateway.admin.build_admin_app``) reads the same ``Gateway``. ``GatewayServer`` runs both on
their ports and implements graceful shutdown.

Invariants:

* No global state: clock, rng and the Prometheus registry are injected; two gateways can live
  in one process (tests do this).
* Every background task (catalog refresh, scraper) is created in the app's ``cleanup_ctx``,
  cancelled and awaited there; one that dies unexpectedly is logged and sets ``Gateway.failed``,
  which stops the server with a non-zero exit instead of leaving a dead loop behind.
* Every client-visible error is rendered once, by ``request_middleware``, which also writes the
  one access line and the request metrics of each request.
* Shutdown: stop reporting ready, optionally keep serving ``shutdown.delay_s``, stop accepting,
  let in-flight requests finish for up to ``shutdown.drain_s``, then cancel what is left (each
  releases its replica in its ``finally``) and close.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.access_log import AccessLog
from gateway.admin import build_admin_app
from gateway.auth import KeyStore, UpstreamCredentials, auth_middleware
from gateway.buffer import RequestBuffer, saturation_bounds
from gateway.catalog import ModelCatalog
from gateway.config import (
    DnsReplicas,
    GatewayConfig,
    KubernetesReplicas,
    ReplicasConfig,
    StaticReplicas,
    load_config,
    policy_name,
    policy_params,
)
from gateway.discovery.base import Discovery
from gateway.discovery.static import FileWatch, replicas_from_urls
from gateway.errors import ConfigError, GatewayError, from_http_exception, render
from gateway.exporter import GatewayMetrics, ReplicaStateCollector
from gateway.health import HealthTracker
from gateway.log import AccessRecord, request_id_var
from gateway.pool import ReplicaPool
from gateway.proxy import ACCESS, Proxy
from gateway.replica_client import ReplicaClient
from gateway.router import Router
from gateway.scraper import MetricsScraper
from policies.base import Policy
from policies.registry import make_policy
from policies.types import ReplicaId

logger = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
CLIENT_CLOSED = 499  # nginx's status for "client closed the request": access log and metrics


def package_version() -> str:
    try:
        return version("kvgate")
    except PackageNotFoundError:
        return "0+unknown"


class RequestIds:
    """Generated request ids: 32 hex characters, a random per-process prefix and a counter
    (unique across gateway replicas and restarts, without ``uuid4`` per request)."""

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._count = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._count):016x}"


@dataclass(eq=False)
class Gateway:
    """One gateway's components, shared by its proxy and admin apps."""

    cfg: GatewayConfig
    clock: Callable[[], float]
    registry: CollectorRegistry
    metrics: GatewayMetrics
    pool: ReplicaPool
    policy: Policy
    router: Router
    catalog: ModelCatalog
    scraper: MetricsScraper
    proxy: Proxy
    health: HealthTracker
    buffer: RequestBuffer
    started: bool = False
    draining: bool = False
    failed: asyncio.Event = field(default_factory=asyncio.Event)
    discovery: Discovery | None = None  # membership source that runs as a task (not static)
    replica_client: ReplicaClient | None = None  # exists while the app runs
    access_log: AccessLog = field(default_factory=AccessLog)
    request_ids: RequestIds = field(default_factory=lambda: RequestIds())

    @property
    def ready(self) -> bool:
        """/readyz: accepting traffic (also while requests wait for replicas), not draining."""
        return self.started and not self.draining

    def client(self) -> ReplicaClient:
        assert self.replica_client is not None, "the replica client exists while the app runs"
        return self.replica_client


GATEWAY = web.AppKey("gateway", Gateway)


def build_app(
    cfg: GatewayConfig,
    *,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    registry: CollectorRegistry | None = None,
    config_path: Path | None = None,
) -> web.Application:
    """``config_path``: the file ``cfg`` came from; static replicas are then re-read from it
    when it changes or on SIGHUP (``kvgate serve`` passes it)."""
    registry = registry if registry is not None else CollectorRegistry()
    policy = make_policy(policy_name(cfg.policy), policy_params(cfg.policy))
    metrics = GatewayMetrics(registry, version=package_version(), policy=policy.name)
    pool = ReplicaPool(
        max_metrics_age_s=cfg.scraper.max_metrics_age_s,
        saturation=saturation_bounds(cfg.saturation),
        slow_start_s=cfg.health.slow_start_s,
    )
    health = HealthTracker(pool, cfg.health, clock=clock)
    router = Router(
        pool, policy, rng=rng or random.Random(), clock=clock, metrics=metrics, health=health
    )

    def on_scrape(replica: ReplicaId, reason: str | None, _duration_s: float) -> None:
        if reason is not None:
            metrics.scrape_failed(replica, reason)

    scraper = MetricsScraper(pool, cfg.scraper, clock=clock, on_result=on_scrape)
    # One credential object for the proxy and the catalog: one token file, read in one place.
    credentials = UpstreamCredentials(
        forward_client_auth=cfg.upstream.forward_client_auth,
        api_key_file=None if cfg.upstream.api_key_file is None else Path(cfg.upstream.api_key_file),
        clock=clock,
    )
    catalog = ModelCatalog(
        pool,
        refresh_interval_s=cfg.models.refresh_interval_s,
        refresh_timeout_s=cfg.models.refresh_timeout_s,
        clock=clock,
        health=health,
        probe_path=cfg.health.probe_path,
        probe_timeout_s=cfg.health.probe_timeout_s,
        credentials=credentials,
    )
    buffer = RequestBuffer(
        pool, router, cfg.buffer, configured_models=cfg.models.names, clock=clock
    )
    gw: Gateway

    def client() -> ReplicaClient:
        return gw.client()

    proxy = Proxy(
        cfg,
        pool=pool,
        router=router,
        catalog=catalog,
        client=client,
        metrics=metrics,
        clock=clock,
        buffer=buffer,
        credentials=credentials,
    )
    registry.register(
        ReplicaStateCollector(
            pool,
            clock,
            labels=proxy.labels,
            in_flight=metrics.in_flight,
            queued=lambda: buffer.queued_by_model(proxy.labels.label),
        )
    )
    pool.add_listener(metrics.forget_replicas)
    gw = Gateway(
        cfg, clock, registry, metrics, pool, policy, router, catalog, scraper, proxy, health, buffer
    )
    gw.discovery = _discovery(cfg.replicas)
    if isinstance(cfg.replicas, StaticReplicas):  # known now; the watch only reloads
        pool.set_members("static", replicas_from_urls(cfg.replicas.urls))
        if config_path is not None:
            gw.discovery = _config_watch(cfg, config_path)
    middlewares = [request_middleware(gw)]
    if cfg.auth is not None:  # inside the request middleware: its 401/429 are rendered, logged
        middlewares.append(auth_middleware(_key_store(cfg, clock)))
    app = web.Application(middlewares=middlewares)
    app[GATEWAY] = gw
    proxy.add_routes(app)
    app.cleanup_ctx.append(_lifecycle(gw))
    return app


def _key_store(cfg: GatewayConfig, clock: Callable[[], float]) -> KeyStore:
    auth = cfg.auth
    assert auth is not None
    return KeyStore(
        keys_file=None if auth.keys_file is None else Path(auth.keys_file),
        keys_dir=None if auth.keys_dir is None else Path(auth.keys_dir),
        priority_classes=cfg.buffer.priority_classes,
        reload_interval_s=auth.reload_interval_s,
        clock=clock,
    )


def _config_watch(cfg: GatewayConfig, path: Path) -> FileWatch:
    """Static replicas re-read from the config file (on change or SIGHUP), nothing else."""

    def load() -> list[str]:
        new = load_config(path)
        if not isinstance(new.replicas, StaticReplicas):
            raise ConfigError(f"{path}: replicas.discovery changed; restart kvgate to apply it")
        if msgspec.structs.replace(new, replicas=cfg.replicas) != cfg:
            logger.warning("%s: only replicas.urls is reloaded; restart for the rest", path)
        return new.replicas.urls

    return FileWatch(path, load, load_errors=(ConfigError,), source="static")


def _discovery(replicas: ReplicasConfig) -> Discovery | None:
    """The membership task for dns/kubernetes discovery (imported only when configured)."""
    if isinstance(replicas, DnsReplicas):
        from gateway.discovery.dns import DnsDiscovery

        return DnsDiscovery(
            replicas.name,
            replicas.port,
            interval_s=replicas.interval_s,
            timeout_s=replicas.timeout_s,
            scheme=replicas.scheme,
        )
    if isinstance(replicas, KubernetesReplicas):
        from gateway.discovery.kube_auth import (
            KubeConfigError,
            in_cluster_credentials,
            kubeconfig_credentials,
        )
        from gateway.discovery.kubernetes import KubernetesDiscovery

        try:
            if replicas.kubeconfig is not None:
                creds = kubeconfig_credentials(Path(replicas.kubeconfig), replicas.context)
            else:
                creds = in_cluster_credentials()
        except KubeConfigError as exc:
            raise ConfigError(f"replicas (kubernetes discovery): {exc}") from exc
        return KubernetesDiscovery(
            creds,
            replicas.service,
            namespace=replicas.namespace,
            port=replicas.port,
            scheme=replicas.scheme,
            watch_timeout_s=replicas.watch_timeout_s,
        )
    return None


def _lifecycle(gw: Gateway) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        gw.replica_client = ReplicaClient(connect_timeout_s=gw.cfg.upstream.connect_timeout_s)
        tasks = [
            _supervised(gw, "catalog", gw.catalog.run()),
            _supervised(gw, "scraper", gw.scraper.run()),
        ]
        if gw.discovery is not None:
            tasks.append(_supervised(gw, "discovery", gw.discovery.run(gw.pool)))
        gw.started = True
        try:
            yield
        finally:
            gw.started = False
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await gw.scraper.close()
            await gw.catalog.close()
            await gw.client().close()
            gw.access_log.close()

    return lifecycle


def _supervised(
    gw: Gateway, name: str, coro: Coroutine[object, object, None]
) -> asyncio.Task[None]:
    task = asyncio.create_task(coro, name=f"kvgate-{name}")

    def done(t: asyncio.Task[None]) -> None:
        if t.cancelled():
            return
        exc = t.exception()
        logger.critical("background task %s stopped: %r", name, exc, exc_info=exc)
        gw.failed.set()

    task.add_done_callback(done)
    return task


def request_middleware(gw: Gateway) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        given = request.headers.get("x-request-id", "")
        rid = given if given and _REQUEST_ID.fullmatch(given) else gw.request_ids.next()
        token = request_id_var.set(rid)
        rec = AccessRecord(
            request_id=rid, method=request.method, path=request.path, started=gw.clock()
        )
        request[ACCESS] = rec
        try:
            resp = await _rendering_errors(gw, handler, request, rec)
            rec.status = resp.status
            if not resp.prepared:
                resp.headers["x-request-id"] = rid
            return resp
        except ConnectionResetError:
            # The client closed its connection while its response was being written (under
            # uvloop a client's FIN often surfaces here, before the handler is cancelled).
            # Nothing can reach it; re-raising would make aiohttp log a 500 with a traceback
            # for an everyday event, so hand aiohttp a response whose write fails quietly.
            rec.status = CLIENT_CLOSED
            if request.transport is not None and not request.transport.is_closing():
                raise
            return web.Response(status=CLIENT_CLOSED)
        except BaseException:  # cancelled: the client went away...
            rec.status = CLIENT_CLOSED
            if gw.draining:  # ...or the shutdown drain time ran out
                rec.error = "cancelled_at_shutdown"
            raise
        finally:
            rec.duration_s = gw.clock() - rec.started
            _finish(gw, rec)
            request_id_var.reset(token)

    return middleware


async def _rendering_errors(
    gw: Gateway,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    request: web.Request,
    rec: AccessRecord,
) -> web.StreamResponse:
    """The handler's response, or the rendered error (the one place errors become JSON)."""
    try:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            raise from_http_exception(exc) from exc
    except GatewayError as exc:
        error = exc
    except ConnectionResetError:
        raise
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        error = GatewayError("internal error in the gateway")
    rec.error = error.code
    if error.retry_after_s is not None:  # refused for lack of capacity, not a client error
        gw.metrics.rejections.labels(gw.proxy.model_label(rec.model), error.code).inc()
    return render(error, rec.request_id)


def _finish(gw: Gateway, rec: AccessRecord) -> None:
    label = gw.proxy.model_label(rec.model)
    gw.metrics.request_finished(label, rec.status, rec.duration_s)
    if gw.cfg.logging.access_log:
        gw.access_log.record(rec)


class GatewayServer:
    """Both apps on their ports, and the graceful stop that SIGTERM triggers."""

    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        registry: CollectorRegistry | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.app = build_app(cfg, clock=clock, rng=rng, registry=registry, config_path=config_path)
        self.gateway = self.app[GATEWAY]
        self.admin_app = build_admin_app(self.gateway)
        # handler_cancellation: a client that disconnects cancels its handler at once, which
        # closes the upstream request and releases the replica (see proxy.py).
        self._runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=cfg.shutdown.drain_s,
            keepalive_timeout=cfg.listen.header_timeout_s,  # aiohttp's only slow-loris bound
        )
        self._admin_runner = web.AppRunner(self.admin_app, access_log=None, shutdown_timeout=1.0)

    async def start(self) -> None:
        await self._runner.setup()
        listen = self.cfg.listen
        await web.TCPSite(self._runner, listen.host, listen.port, backlog=listen.backlog).start()
        await self._admin_runner.setup()
        admin = self.cfg.admin
        await web.TCPSite(self._admin_runner, admin.host, admin.port).start()
        logger.info(
            "kvgate %s serving the OpenAI API on port %d, admin on port %d (policy %s)",
            package_version(),
            self.port,
            self.admin_port,
            self.gateway.policy.name,
        )

    @property
    def port(self) -> int:
        return _bound_port(self._runner)

    @property
    def admin_port(self) -> int:
        return _bound_port(self._admin_runner)

    async def stop(self) -> None:
        """Report not ready, stop accepting, drain in-flight requests, close."""
        gw = self.gateway
        gw.draining = True
        delay = self.cfg.shutdown.delay_s
        if delay > 0:
            logger.info("shutting down: not ready; still serving for %.1f s", delay)
            await asyncio.sleep(delay)
        logger.info(
            "shutting down: no longer accepting; draining %d in-flight requests (up to %.1f s)",
            gw.pool.total_inflight(),
            self.cfg.shutdown.drain_s,
        )
        await self._runner.cleanup()
        await self._admin_runner.cleanup()
        logger.info("shutdown complete")


def _bound_port(runner: web.AppRunner) -> int:
    address = runner.addresses[0]
    return int(address[1])
