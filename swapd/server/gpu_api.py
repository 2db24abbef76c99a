"""Wiring of swapd.gpu into the server: verified stops, gated starts, GET /api/gpus."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from swapd.footprints import FootprintBook, FootprintStore, default_state_dir
from swapd.gpu import VramVerifier

if TYPE_CHECKING:
    from swapd.server.runtime import Runtime


def _runtime(app: web.Application) -> Runtime:
    # Imported late: swapd.server.app imports this module.
    from swapd.server.app import RUNTIME

    return app[RUNTIME]


def install(app: web.Application) -> None:
    """Add the GPU verifier to ``app``; call after the core lifecycle is added."""

    async def gpu_lifecycle(app: web.Application):
        rt = _runtime(app)
        verifier = VramVerifier(rt, FootprintBook(FootprintStore(default_state_dir())))
        # Hooks first, so a start racing with NVML's initialisation (preload) is
        # still gated: the hooks wait for open() to finish.
        verifier.attach(rt.scheduler)
        rt.gpu = verifier
        await verifier.open()
        yield

    async def close_nvml(app: web.Application) -> None:
        # An on_cleanup handler runs after every cleanup context has exited,
        # i.e. after the core's scheduler.close() has stopped (and verified)
        # every backend, so NVML must stay open until here.
        verifier = getattr(_runtime(app), "gpu", None)
        if verifier is not None:
            await verifier.close()

    app.cleanup_ctx.append(gpu_lifecycle)
    app.on_cleanup.append(close_nvml)
    app.router.add_get("/api/gpus", handle_gpus)


async def model_usage(app: web.Application) -> dict[str, dict[str, Any]]:
    """Per running model {"vram_mib", "pids"}, from a cache refreshed at most once a
    second off the event loop; empty when NVML is unavailable."""
    verifier = getattr(_runtime(app), "gpu", None)
    if verifier is None:
        return {}
    return await verifier.usage()


async def handle_gpus(request: web.Request) -> web.Response:
    verifier: VramVerifier | None = getattr(_runtime(request.app), "gpu", None)
    if verifier is None:
        return web.json_response({"available": False, "reason": "GPU support is not started", "devices": []})
    return web.json_response(await verifier.status())
