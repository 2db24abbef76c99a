"""llama-swap's ``GET /api/performance`` and ``GET /api/hardware``.

``/api/performance`` serves the samples the Prometheus sampler
(``swapd.telemetry.prom.PerfSampler``) already takes every
``performance.every`` seconds and keeps for an hour: nothing is sampled
twice. With ``performance.disabled`` it answers 503 ``{"enabled": false}``,
as llama-swap does. ``?after=<RFC3339>`` keeps only later samples (400 for a
time that does not parse). The JSON is llama-swap's ``SysStat`` and
``GpuStat``; ``mem_util_pct`` is the share of GPU memory in use, as
llama-swap computes it from nvidia-smi's figures.

``/api/hardware`` is the machine's ``HardwareSnapshot`` (swapd.hardware),
read once in a thread when swapd starts (after the GPU verifier opened
NVML), and served as it was read; 503 if it could not be read.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from aiohttp import web

from swapd import __version__, hardware
from swapd.logging import get_logger
from swapd.server.errors import ClientError
from swapd.server.keys import RUNTIME
from swapd.server.metrics_api import PROM
from swapd.telemetry.prom import PerfSample

log = get_logger("swapd.server")

MB = 1024 * 1024


class HardwareInfo:
    """The snapshot, read once: a task started with the app, awaited by the first requests."""

    def __init__(self) -> None:
        self.task: asyncio.Task | None = None


HARDWARE = web.AppKey("swapd.hardware", HardwareInfo)


def install(app: web.Application) -> None:
    """The two routes and the hardware read; call after gpu_api.install and metrics_api.install."""
    info = app[HARDWARE] = HardwareInfo()

    async def lifecycle(app: web.Application):
        info.task = asyncio.get_running_loop().create_task(_read_hardware(app))
        yield
        if not info.task.done():
            info.task.cancel()
        await asyncio.gather(info.task, return_exceptions=True)

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/api/performance", handle_performance)
    app.router.add_get("/api/hardware", handle_hardware)


async def _read_hardware(app: web.Application) -> dict[str, Any] | None:
    verifier = getattr(app[RUNTIME], "gpu", None)
    nvml = getattr(verifier, "nvml", None)
    gpus: list[dict[str, Any]] = []
    driver = None
    if nvml is not None:
        try:
            gpus = await nvml.call(nvml.describe)
            driver = nvml.driver
        except Exception as exc:  # the GPUs are best effort, as every optional fact
            log.warning("hardware.gpus_unreadable", error=str(exc))
    try:
        return await asyncio.to_thread(hardware.snapshot, __version__, gpus, driver)
    except Exception as exc:
        log.warning("hardware.unavailable", error=str(exc))
        return None


async def handle_hardware(request: web.Request) -> web.Response:
    task = request.app[HARDWARE].task
    found = await asyncio.shield(task) if task is not None else None
    if found is None:
        raise ClientError(503, "hardware detection unavailable", "hardware_unavailable")
    return web.json_response(found)


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="microseconds")


def sys_stat(sample: PerfSample) -> dict[str, Any]:
    """llama-swap's ``SysStat``: megabytes are whole MiB, the loopback interface is left out."""
    mem, swap, load = sample.memory, sample.swap, sample.load
    return {
        "timestamp": _rfc3339(sample.at),
        "cpu_util_per_core": list(sample.cpu_percent),
        "mem_total_mb": mem.total // MB if mem is not None else 0,
        "mem_used_mb": mem.used // MB if mem is not None else 0,
        "mem_free_mb": mem.free // MB if mem is not None else 0,
        "swap_total_mb": swap.total // MB if swap is not None else 0,
        "swap_used_mb": swap.used // MB if swap is not None else 0,
        "load_avg_1": load[0] if load else 0.0,
        "load_avg_5": load[1] if load else 0.0,
        "load_avg_15": load[2] if load else 0.0,
        "net_io": [
            {"name": name, "bytes_recv": io.bytes_recv, "bytes_sent": io.bytes_sent}
            for name, io in sample.network.items()
            if name != "lo"
        ],
    }


def gpu_stats(sample: PerfSample) -> list[dict[str, Any]]:
    """llama-swap's ``GpuStat`` per GPU in one sample (a figure NVML cannot give is 0, as nvidia-smi's N/A is)."""
    out = []
    for dev in sample.gpus:
        used, total = int(dev.used_mib), int(dev.total_mib)
        out.append(
            {
                "timestamp": _rfc3339(sample.at),
                "id": dev.index,
                "name": dev.name,
                "uuid": dev.uuid,
                "temp_c": int(dev.temperature_c or 0),
                "vram_temp_c": 0,
                "gpu_util_pct": float(dev.util_percent or 0.0),
                "mem_util_pct": used / total * 100 if total > 0 else 0.0,
                "mem_used_mb": used,
                "mem_total_mb": total,
                "fan_speed_pct": float(getattr(dev, "fan_percent", None) or 0.0),
                "power_draw_w": float(dev.power_w or 0.0),
            }
        )
    return out


def _parse_after(text: str) -> float:
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        when = None
    if when is None or when.tzinfo is None or "T" not in text.upper():
        raise ClientError(400, "invalid 'after' timestamp, use RFC3339 format", "invalid_request")
    return when.timestamp()


async def handle_performance(request: web.Request) -> web.Response:
    prom = request.app.get(PROM)
    sampler = prom.perf if prom is not None else None
    if sampler is None:
        return web.json_response({"enabled": False}, status=503)
    samples = list(sampler.history)
    after_text = request.query.get("after", "")
    sys_out: list[dict[str, Any]] | None
    gpu_out: list[dict[str, Any]] | None
    if after_text:
        after = _parse_after(after_text)
        samples = [s for s in samples if s.at > after]
        sys_out = [sys_stat(s) for s in samples]
        gpu_out = [g for s in samples for g in gpu_stats(s)]
    else:
        # llama-swap's empty ring buffers encode as null
        sys_out = [sys_stat(s) for s in samples] or None
        gpu_out = [g for s in samples for g in gpu_stats(s)] or None
    return web.json_response({"enabled": True, "sys_stats": sys_out, "gpu_stats": gpu_out})
