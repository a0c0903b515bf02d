"""Wiring: one gateway's components, its two ports, the request wrapper and the lifecycle.

``build_gateway(cfg, clock=, rng=, registry=)`` assembles pool, policy, router, catalog, scraper
and proxy into a ``Gateway``. ``GatewayServer`` serves the OpenAI API on ``listen`` (the
protocol-level server of ``gateway/http_server.py``, with ``handle`` as its handler) and the
admin app (``gateway/admin.py``, aiohttp) on ``admin``, and implements graceful shutdown.

Invariants:

* No global state: clock, rng and the Prometheus registry are injected; two gateways can live
  in one process (tests do this).
* Every background task (catalog refresh, scraper, discovery) is created by ``start`` and
  cancelled and awaited by ``stop``; one that dies unexpectedly is logged and sets
  ``Gateway.failed``, which stops the server with a non-zero exit instead of leaving a dead
  loop behind.
* Every client-visible error is rendered once, by ``handle`` (or, for a request the HTTP parser
  refused, by ``refused``), which also writes the one access line and the request metrics of
  each request. Authentication comes before routing: an unauthenticated client learns nothing,
  not even which paths exist.
* Shutdown: stop reporting ready, optionally keep serving ``shutdown.delay_s``, stop accepting,
  let in-flight requests finish for up to ``shutdown.drain_s``, then cancel what is left (each
  releases its replica in its ``finally``) and close.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import logging
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.access_log import AccessLog
from gateway.admin import build_admin_app
from gateway.auth import ApiKey, KeyStore, UpstreamCredentials
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
from gateway.errors import (
    Answer,
    ConfigError,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    render,
)
from gateway.exchange import Host
from gateway.exporter import GatewayMetrics, ReplicaStateCollector
from gateway.health import HealthTracker
from gateway.http_server import HttpServer, Limits, Request
from gateway.log import AccessRecord, request_id_var
from gateway.pool import ReplicaPool
from gateway.proxy import Proxy
from gateway.replica_client import ReplicaClient
from gateway.router import Router
from gateway.scraper import MetricsScraper
from policies.base import Policy
from policies.registry import make_policy
from policies.types import ReplicaId

logger = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
CLIENT_CLOSED = 499  # nginx's status for "client closed the request": access log and metrics
Route = Callable[[Request, AccessRecord], Awaitable[None]]
FastRoute = Callable[[Request, AccessRecord, Host], bool]


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
    key_store: KeyStore | None = None  # client authentication, when ``auth`` is configured
    routes: dict[str, tuple[str, Route]] = field(default_factory=dict)
    fast_routes: dict[str, FastRoute] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        """/readyz: accepting traffic (also while requests wait for replicas), not draining."""
        return self.started and not self.draining

    def client(self) -> ReplicaClient:
        assert self.replica_client is not None, "the replica client exists while the app runs"
        return self.replica_client


def build_gateway(
    cfg: GatewayConfig,
    *,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    registry: CollectorRegistry | None = None,
    config_path: Path | None = None,
) -> Gateway:
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
    if cfg.auth is not None:
        gw.key_store = _key_store(cfg, clock)
    gw.routes = proxy.routes()
    if cfg.upstream.fast_path:
        gw.fast_routes = proxy.fast_routes()
    return gw


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


def _start_background(gw: Gateway) -> list[asyncio.Task[None]]:
    gw.replica_client = ReplicaClient(connect_timeout_s=gw.cfg.upstream.connect_timeout_s)
    tasks = [
        _supervised(gw, "catalog", gw.catalog.run()),
        _supervised(gw, "scraper", gw.scraper.run()),
    ]
    if gw.discovery is not None:
        tasks.append(_supervised(gw, "discovery", gw.discovery.run(gw.pool)))
    gw.started = True
    return tasks


async def _stop_background(gw: Gateway, tasks: list[asyncio.Task[None]]) -> None:
    gw.started = False
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await gw.scraper.close()
    await gw.catalog.close()
    await gw.client().close()
    gw.access_log.close()


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


def _record(gw: Gateway, request: Request) -> AccessRecord:
    """The request's access record, with its id: the client's ``X-Request-ID`` if usable."""
    given = request.header("x-request-id")
    rid = given if given and _REQUEST_ID.fullmatch(given) else gw.request_ids.next()
    return AccessRecord(
        request_id=rid, method=request.method, path=request.path, started=gw.clock()
    )


async def handle(gw: Gateway, request: Request) -> None:
    """One request, start to end: its id, authentication, route, the proxy, the one place its
    errors are rendered, its access line and metrics."""
    rec = _record(gw, request)
    token = request_id_var.set(rec.request_id)
    try:
        await _serve(gw, request, rec, _authorized(gw, request, rec))
    finally:
        request_id_var.reset(token)


def serve_now(gw: Gateway, request: Request) -> bool:
    """The callback path (``gateway/exchange.py``) for a request it can take: a proxied POST
    whose body is here, from an authenticated key with a free slot. False, having changed
    nothing, for anything else: ``handle`` then serves it as a task, errors included."""
    entry = gw.fast_routes.get(request.path)
    if entry is None or request.method != "POST" or not request.complete:
        return False
    rec = _record(gw, request)
    store, key = gw.key_store, None
    if store is not None:
        try:
            key = store.authenticate(request.header("Authorization"))
            store.acquire(key)
        except GatewayError:
            return False
        rec.key, rec.priority = key.name, key.priority or 0
    if entry(request, rec, _Taken(gw, request, rec, key)):
        return True
    if store is not None and key is not None:
        store.release(key)
    return False


class _Taken:
    """A request the callback path took: ``Host`` of its exchange."""

    __slots__ = ("gw", "key", "rec", "request")

    def __init__(self, gw: Gateway, request: Request, rec: AccessRecord, key: ApiKey | None):
        self.gw = gw
        self.request = request
        self.rec = rec
        self.key = key

    def finish(self, *, cancelled: bool) -> None:
        self._release_key()
        _settle(self.gw, self.request, self.rec, cancelled=cancelled)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        rec = self.rec
        ctx = contextvars.copy_context()
        ctx.run(request_id_var.set, rec.request_id)
        task = asyncio.get_running_loop().create_task(
            _serve(self.gw, self.request, rec, self._keyed(work)), context=ctx
        )
        self.request.attach(task)

    async def _keyed(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        finally:
            self._release_key()

    def _release_key(self) -> None:
        key, self.key = self.key, None
        store = self.gw.key_store
        if key is not None and store is not None:
            store.release(key)


async def _serve(
    gw: Gateway, request: Request, rec: AccessRecord, work: Coroutine[Any, Any, None]
) -> None:
    """Run ``work``; render its error, if any; write the access line."""
    cancelled = True  # unless it gets to the end: the client went away, or the drain ran out
    try:
        error = await _answered(gw, request, rec, work)
        if error is not None:
            rec.error = error.code
            if error.retry_after_s is not None:  # refused for lack of capacity, not a client
                gw.metrics.rejections.labels(gw.proxy.model_label(rec.model), error.code).inc()
            if request.answered:  # too late for a status: the client sees a broken response
                request.abort()
            else:
                status, headers, body = render(error, rec.request_id)
                if isinstance(error, MethodNotAllowed) and request.path in gw.routes:
                    headers.append(("Allow", gw.routes[request.path][0]))
                request.respond(status, headers, body)
        cancelled = False
    finally:
        _settle(gw, request, rec, cancelled=cancelled)


def _settle(gw: Gateway, request: Request, rec: AccessRecord, *, cancelled: bool) -> None:
    """The request's final status (499 when its client left or the shutdown drain ran out),
    duration, metrics and access line: once per request, on either path."""
    if cancelled:
        rec.status = CLIENT_CLOSED
        if gw.draining:
            rec.error = "cancelled_at_shutdown"
    elif not rec.status:
        rec.status = request.status if request.answered else CLIENT_CLOSED
    rec.duration_s = gw.clock() - rec.started
    _finish(gw, rec)


async def _authorized(gw: Gateway, request: Request, rec: AccessRecord) -> None:
    """Authenticate (when ``auth`` is configured), then route."""
    store = gw.key_store
    if store is None:
        await _route(gw, request, rec)
        return
    key = store.authenticate(request.header("Authorization"))
    rec.key, rec.priority = key.name, key.priority or 0
    store.acquire(key)
    try:
        await _route(gw, request, rec)
    finally:
        store.release(key)


async def _answered(
    gw: Gateway, request: Request, rec: AccessRecord, work: Coroutine[Any, Any, None]
) -> GatewayError | None:
    """Run the request; the error to render, if it failed with one."""
    try:
        await work
        return None
    except GatewayError as exc:
        return exc
    except ConnectionResetError:  # the client went away while its answer was being written
        rec.status = CLIENT_CLOSED
        request.abort()
        return None
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return GatewayError("internal error in the gateway")


async def _route(gw: Gateway, request: Request, rec: AccessRecord) -> None:
    route = gw.routes.get(request.path)
    if route is None:
        raise NotFound("no route for this path")
    method, handler = route
    if request.method != method:
        raise MethodNotAllowed("method not allowed for this path")
    await handler(request, rec)


def refused(gw: Gateway, method: str, path: str, error: GatewayError) -> Answer:
    """A request the HTTP parser refused (malformed, head too large): logged and counted like
    any other; the server writes the answer and closes the connection."""
    rid = gw.request_ids.next()
    rec = AccessRecord(request_id=rid, method=method, path=path, status=error.status)
    rec.error = error.code
    _finish(gw, rec)
    logger.info("refused a request: %s", error.message)
    return render(error, rid)


def _finish(gw: Gateway, rec: AccessRecord) -> None:
    label = gw.proxy.model_label(rec.model)
    gw.metrics.request_finished(label, rec.status, rec.duration_s)
    if gw.cfg.logging.access_log:
        gw.access_log.record(rec)


class GatewayServer:
    """Both ports, and the graceful stop that SIGTERM triggers."""

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
        gw = build_gateway(cfg, clock=clock, rng=rng, registry=registry, config_path=config_path)
        self.gateway = gw
        self.admin_app = build_admin_app(gw)
        listen = cfg.listen
        limits = Limits(
            max_body_bytes=cfg.upstream.max_body_bytes,
            header_timeout_s=listen.header_timeout_s,
            body_timeout_s=listen.body_timeout_s,
        )
        self._http = HttpServer(
            functools.partial(handle, gw),
            limits,
            functools.partial(refused, gw),
            fast=functools.partial(serve_now, gw) if gw.fast_routes else None,
        )
        self._admin_runner = web.AppRunner(self.admin_app, access_log=None, shutdown_timeout=1.0)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = _start_background(self.gateway)
        listen = self.cfg.listen
        await self._http.start(listen.host, listen.port, backlog=listen.backlog)
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
        return self._http.port

    @property
    def admin_port(self) -> int:
        address = self._admin_runner.addresses[0]
        return int(address[1])

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
        await self._http.shutdown(self.cfg.shutdown.drain_s)
        await _stop_background(gw, self._tasks)
        await self._admin_runner.cleanup()
        logger.info("shutdown complete")
