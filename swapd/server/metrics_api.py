"""Wiring the telemetry sinks into the app, and ``GET /metrics``.

``/metrics`` is a status call: it reads the scheduler, backends and verifier
and never starts a model or touches a TTL. It sits behind ``apiKeys`` like
the other API routes (the access middleware sees every route).
"""

from __future__ import annotations

import time

from aiohttp import web

from swapd.server.keys import RUNTIME
from swapd.telemetry.prom import CONTENT_TYPE, PromMetrics

# a VRAM reading older than this is refreshed (off the loop) before a scrape renders it
VRAM_FRESH_SECONDS = 2.0

PROM = web.AppKey("swapd.prom", PromMetrics)


def install(app: web.Application) -> None:
    """Add the Prometheus sinks and ``/metrics``; call after the core and GPU lifecycles are added."""

    async def metrics_lifecycle(app: web.Application):
        rt = app[RUNTIME]
        observe = rt.config.observe
        prom = PromMetrics(rt, performance=not observe.performance_disabled, every=observe.performance_every)
        app[PROM] = prom
        rt.telemetry.sinks.append(prom.requests)
        rt.telemetry.model_sinks.append(prom.requests)
        rt.telemetry.capture_bytes = observe.capture_buffer_bytes
        if prom.perf is not None:
            prom.perf.start()
        yield
        if prom.perf is not None:
            await prom.perf.close()

    app.cleanup_ctx.append(metrics_lifecycle)
    app.router.add_get("/metrics", handle_metrics)


async def handle_metrics(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    verifier = rt.gpu
    if verifier is not None:
        view = verifier.memory_view()
        if view is not None and time.monotonic() - view.at > VRAM_FRESH_SECONDS:
            await verifier.refresh_memory()
    body = request.app[PROM].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
