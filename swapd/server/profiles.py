"""Profiles: named sets of pins, one of them active at a time (llama-swap's ``profiles``).

While a profile is active, a request whose model name it pins goes to the
pin's target instead (a model, alias, peer model or selector), before aliases,
filters and routing; an empty target switches the name off (404). On
``/upstream/`` paths the longest pinned prefix wins. Which profile is active
is the Runtime's (``active_profile``, ``set_active_profile``); none is at
start, and a reload keeps it while the new config still has it.

Routes: ``GET /api/profiles`` and ``PUT /api/profiles/active``.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, unquote

from aiohttp import web

from swapd.config import ProfileConfig
from swapd.server.errors import ClientError
from swapd.server.keys import RUNTIME
from swapd.server.slowclient import read_body

BODY_LIMIT = 64 * 1024  # {"name": ...} is a few bytes


def active(rt) -> ProfileConfig | None:
    """The active profile, or None."""
    name = rt.active_profile
    return rt.config.profiles.get(name) if name is not None else None


def switched_off(profile: ProfileConfig, name: str) -> ClientError:
    return ClientError(404, f"model {name!r} is switched off by the active profile {profile.id!r}", "model_not_found")


def pin(rt, name: str) -> str:
    """``name`` after the active profile's pins; a name pinned to nothing raises 404."""
    profile = active(rt)
    if profile is None or name not in profile.pins:
        return name
    target = profile.pins[name]
    if not target:
        raise switched_off(profile, name)
    return target


def pin_upstream(rt, segments: list[str]) -> list[str] | None:
    """An ``/upstream/`` path split at ``/`` (percent-encoded) with its longest pinned prefix replaced.

    Returns the new segments (the pin's target, then the rest of the path), or
    None when no pin matches; a prefix pinned to nothing raises 404.
    """
    profile = active(rt)
    if profile is None or not profile.pins:
        return None
    found = None
    for count in range(1, len(segments) + 1):
        name = unquote("/".join(segments[:count]))
        if name in profile.pins:
            found = (count, name)  # keep walking: the longest pinned prefix wins
    if found is None:
        return None
    count, name = found
    target = profile.pins[name]
    if not target:
        raise switched_off(profile, name)
    return quote(target, safe="/").split("/") + segments[count:]


def listing(rt, taken: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """The active profile's pins that ``/v1/models`` lists: (id, llamaswap metadata).

    A pin that switches a name off is not listed, nor one whose name is
    already a model id, alias, peer model or selector (``taken``), as in
    llama-swap.
    """
    profile = active(rt)
    if profile is None:
        return []
    return [(name, {"type": "profile"}) for name, target in profile.pins.items() if target and name not in taken]


# -- routes ---------------------------------------------------------------------------


def _state(rt) -> dict[str, Any]:
    return {"active": rt.active_profile}


async def handle_profiles(request: web.Request) -> web.Response:
    """``GET /api/profiles``: the active profile (or null) and every profile, sorted by id."""
    rt = request.app[RUNTIME]
    profiles = rt.config.profiles
    listed = [
        {"id": pid, "description": profiles[pid].description, "pins": dict(profiles[pid].pins)}
        for pid in sorted(profiles)
    ]
    return web.json_response({**_state(rt), "profiles": listed})


async def handle_set_active(request: web.Request) -> web.Response:
    """``PUT /api/profiles/active`` with ``{"name": id}``; null or "" makes none active."""
    rt = request.app[RUNTIME]
    raw = await read_body(request, rt.config.client_limits.body_idle_timeout, BODY_LIMIT)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise ClientError(400, 'invalid profile request: expected a JSON object such as {"name": "id"}')
    if "name" not in body:
        raise ClientError(400, "profile name is required")
    name = body["name"]
    if name is not None and not isinstance(name, str):
        raise ClientError(400, "profile name must be a string or null")
    try:
        rt.set_active_profile(name or None)
    except KeyError:
        raise ClientError(404, f"profile {name!r} not found", "profile_not_found") from None
    return web.json_response(_state(rt))


def install(app: web.Application) -> None:
    app.router.add_get("/api/profiles", handle_profiles)
    app.router.add_put("/api/profiles/active", handle_set_active)
