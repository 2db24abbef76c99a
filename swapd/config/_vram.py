"""The ``vram`` router's settings and a model's declared ``vram`` footprint.

Sizes are MiB: a bare number is MiB; ``MiB``/``GiB`` (and ``MB``/``GB``, read
the way GPU tools print them, as MiB and GiB) may follow, with or without a
space. ``"11GiB"`` is 11264, ``900`` is 900.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ._model import VramSettings
from ._reader import _Context, _describe, open_block

_VRAM_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(MiB|GiB|MB|GB|M|G)?\s*$", re.IGNORECASE)
_VRAM_UNITS = {"mib": 1.0, "mb": 1.0, "m": 1.0, "gib": 1024.0, "gb": 1024.0, "g": 1024.0}
KNOWN_VRAM_ROUTER_KEYS = ("reserve", "modelsMax", "pinned")
DEFAULT_RESERVE_MIB = 512.0


def parse_vram_size(value: Any) -> float | None:
    """MiB for a size such as ``900``, ``"900MiB"`` or ``"11GiB"``; None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value >= 0 else None
    if not isinstance(value, str):
        return None
    match = _VRAM_SIZE_RE.match(value)
    if match is None:
        return None
    return float(match.group(1)) * _VRAM_UNITS[(match.group(2) or "mib").lower()]


def _size_or_fail(ctx: _Context, value: Any, model: str | None, key: str, *, positive: bool) -> float:
    mib = parse_vram_size(value)
    if mib is None or (positive and mib <= 0):
        what = "a positive size" if positive else "a size"
        ctx.fail(f'expected {what} in MiB, such as 900, "900MiB" or "11GiB"; got {_describe(value)}', model, key)
    return mib


def model_vram(ctx: _Context, model_id: str, model: Mapping[str, Any]) -> tuple[tuple[int, float], ...] | float | None:
    """A model's ``vram`` key: None (absent), MiB on each of its GPUs, or MiB per GPU index."""
    if "vram" not in model or model["vram"] is None:
        return None
    value = model["vram"]
    if isinstance(value, dict):
        if not value:
            ctx.fail("expected a size, or a mapping of GPU index to size; got an empty mapping", model_id, "vram")
        per_device: list[tuple[int, float]] = []
        for device, size in value.items():
            try:
                index = int(str(device))
            except ValueError:
                index = -1
            if index < 0:
                ctx.fail(f"GPU index must be an integer >= 0, got {device!r}", model_id, "vram")
            per_device.append((index, _size_or_fail(ctx, size, model_id, f"vram.{device}", positive=True)))
        return tuple(sorted(per_device))
    return _size_or_fail(ctx, value, model_id, "vram", positive=True)


def vram_settings(
    ctx: _Context, settings: Mapping[str, Any], models: Mapping[str, Any], aliases: Mapping[str, str]
) -> VramSettings:
    """``routing.router.settings.vram`` (all keys optional)."""
    prefix = "routing.router.settings.vram"
    reader = open_block(ctx, settings.get("vram"), prefix, KNOWN_VRAM_ROUTER_KEYS)
    node = reader.mapping
    reserve = DEFAULT_RESERVE_MIB
    if node.get("reserve") is not None:
        reserve = _size_or_fail(ctx, node["reserve"], None, f"{prefix}.reserve", positive=False)
    models_max = reader.int("modelsMax", 0)
    if models_max < 0:
        reader.fail("modelsMax", f"must be >= 0 (0 means no cap), got {models_max}")
    pinned: list[str] = []
    for index, name in enumerate(reader.str_list("pinned")):
        real = name if name in models else aliases.get(name)
        if real is None:
            ctx.fail(f"'{name}' is not a defined model or alias", None, f"{prefix}.pinned[{index}]")
        if real not in pinned:
            pinned.append(real)
    return VramSettings(reserve_mib=reserve, models_max=models_max, pinned=tuple(pinned))


def vram_router(
    ctx: _Context, expanded: Mapping[str, Any], models: Mapping[str, Any], aliases: Mapping[str, str]
) -> VramSettings | None:
    """The vram router's settings when ``routing.router.use`` is ``vram``; otherwise None
    (its ``settings.vram`` block is then ignored with a warning)."""
    routing = expanded.get("routing")
    router = routing.get("router") if isinstance(routing, dict) else None
    if not isinstance(router, dict):
        return None
    settings = router.get("settings")
    settings = settings if isinstance(settings, dict) else {}
    if router.get("use") != "vram":
        if settings.get("vram") is not None:
            ctx.warn("key 'routing.router.settings.vram' is ignored: routing.router.use is not 'vram'")
        return None
    return vram_settings(ctx, settings, models, aliases)
