"""The admin port: /metrics, /healthz, /readyz and /debug/replicas.

Kept off the proxy port so that Prometheus scrapes and Kubernetes probes never compete with
client traffic and can be firewalled separately.

* ``/healthz`` — the process is alive and its event loop answers (liveness).
* ``/readyz`` — the gateway accepts traffic: 200 from start until shutdown begins, including
  while no replica is ready (requests then get 503 ``no_replica``, and later wait for capacity);
  503 while draining, so load balancers stop sending before the listener closes.
* ``/debug/replicas`` — each replica as the gateway sees it (phase, models, in-flight, last
  scrape and its age); enabled by ``admin.debug_endpoints``. Never includes request data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.exporter import metrics_handler

if TYPE_CHECKING:
    from gateway.app import Gateway


def build_admin_app(gw: Gateway) -> web.Application:
    app = web.Application()

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        ready = gw.ready
        body = {
            "ready": ready,
            "draining": gw.draining,
            "replicas_ready": sum(
                1 for s in gw.pool.view(gw.clock()).replicas if s.phase == "ready"
            ),
        }
        return web.json_response(body, status=200 if ready else 503)

    async def debug_replicas(_request: web.Request) -> web.Response:
        return web.json_response({"replicas": replica_report(gw)})

    app.router.add_get("/metrics", metrics_handler(gw.registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if gw.cfg.admin.debug_endpoints:
        app.router.add_get("/debug/replicas", debug_replicas)
    return app


def replica_report(gw: Gateway) -> list[dict[str, object]]:
    pool = gw.pool
    view = pool.view(gw.clock())
    out: list[dict[str, object]] = []
    for s in view.replicas:
        error, failed_at = pool.scrape_error(s.id)
        out.append(
            {
                "id": s.id,
                "url": pool.url(s.id),
                "phase": s.phase,
                "models": sorted(s.models),
                "inflight": pool.inflight(s.id),
                "engine": pool.engine(s.id),
                "queue_depth": s.queue_depth,
                "running": s.running,
                "kv_usage": s.kv_usage,
                "metrics_age_s": None if s.scraped_at is None else view.now - s.scraped_at,
                "metrics_stale": s.scraped_at is None
                or view.now - s.scraped_at > view.max_metrics_age_s,
                "inflight_at_scrape": s.inflight_at_scrape,
                "scrape_error": error,
                "scrape_error_age_s": None if failed_at is None else view.now - failed_at,
                "ready_since_s": None if s.ready_since is None else view.now - s.ready_since,
            }
        )
    return out
