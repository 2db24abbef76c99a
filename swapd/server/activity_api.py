"""llama-swap's activity routes: ``/api/metrics/activity``, ``/api/metrics/stats``, ``/api/captures/{id}``.

``install(app)`` creates the stores from ``config.observe`` when the app
starts (the activity store, the capture buffer, the ``logRequests`` sink),
adds them to the runtime's telemetry sinks, registers the routes, and closes
the store (writing what is queued) when the app stops.
"""

from __future__ import annotations

import functools
import json
import math
import re
from datetime import datetime
from typing import TYPE_CHECKING

from aiohttp import web

from swapd.logging import get_logger
from swapd.server.errors import ClientError
from swapd.server.keys import RUNTIME
from swapd.telemetry.activity import MAX_LIMIT, SORT_COLUMNS, ActivityQuery, ActivityStore, RequestLogSink
from swapd.telemetry.captures import CaptureStore

if TYPE_CHECKING:
    from swapd.config import ObserveSettings
    from swapd.server.runtime import Runtime

log = get_logger("swapd.activity")

ACTIVITY = web.AppKey("swapd.activity", ActivityStore)

_compact = functools.partial(json.dumps, separators=(",", ":"))  # as Go's encoder writes it

_INT = re.compile(r"[+-]?\d+")


def _atoi(raw: str) -> int | None:
    """Go's ``strconv.Atoi``: an optional sign and decimal digits, nothing else."""
    return int(raw) if _INT.fullmatch(raw) else None


def install_sinks(rt: Runtime, settings: ObserveSettings) -> ActivityStore:
    """Create the stores and add them to ``rt.telemetry.sinks``; the caller opens and closes the store."""
    telemetry = rt.telemetry
    captures = CaptureStore(settings.capture_buffer_bytes)
    store = ActivityStore(
        settings.metrics_max_in_memory,
        settings.store_path,
        captures=captures,
        on_activity=rt.events.on_activity,
    )
    store.activity_wanted = rt.events.has_event_subscribers
    telemetry.sinks.append(store)
    if settings.log_requests:
        telemetry.sinks.append(RequestLogSink())
    return store


def install(app: web.Application) -> None:
    """Add the activity store to ``app``'s lifecycle and its routes to the router."""

    async def activity_lifecycle(app: web.Application):
        rt = app[RUNTIME]
        store = app[ACTIVITY] = install_sinks(rt, rt.config.observe)
        await store.open()
        yield

    async def close_store(app: web.Application) -> None:
        # After every cleanup context: the scheduler has stopped the backends
        # and every request has been recorded; write the queue out and close.
        store = app.get(ACTIVITY)
        if store is not None:
            await store.close()

    app.cleanup_ctx.append(activity_lifecycle)
    app.on_cleanup.append(close_store)
    app.router.add_get("/api/metrics/activity", handle_activity)
    app.router.add_get("/api/metrics/stats", handle_stats)
    app.router.add_get("/api/captures/{id}", handle_capture)


def _store(request: web.Request) -> ActivityStore:
    store = request.app.get(ACTIVITY)
    if store is None:
        raise ClientError(500, "failed to get activity", "internal_error")
    return store


def _time(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name, "").strip()
    if not raw:
        return None
    try:
        if "T" not in raw and "t" not in raw:
            raise ValueError(raw)
        parsed = datetime.fromisoformat(raw)
        if parsed.tzinfo is None:
            raise ValueError(raw)
    except ValueError:
        raise ClientError(400, f"invalid '{name}' timestamp, use RFC3339 format") from None
    return math.floor(parsed.timestamp())


def _id(request: web.Request, name: str) -> int:
    raw = request.query.get(name, "").strip()
    if not raw:
        return 0
    value = _atoi(raw)
    if value is None or value < 1:
        raise ClientError(400, f"{name} must be >= 1")
    return value


def parse_query(request: web.Request) -> ActivityQuery:
    """llama-swap's ``parseActivityQuery``: the same parameters, defaults, limits and messages."""
    query = ActivityQuery()
    query.models = [m.strip() for m in request.query.getall("model", []) if m.strip()]
    start, end = _time(request, "start"), _time(request, "end")
    if start is not None and end is not None and start > end:
        raise ClientError(400, "start must be before end")
    query.start, query.end = start, end
    query.min_id, query.max_id = _id(request, "min_id"), _id(request, "max_id")
    if query.min_id and query.max_id and query.min_id > query.max_id:
        raise ClientError(400, "min_id must be <= max_id")
    raw = request.query.get("limit", "").strip()
    if raw:
        limit = _atoi(raw)
        if limit is None:
            raise ClientError(400, "invalid limit")
        if not 0 < limit <= MAX_LIMIT:
            raise ClientError(400, f"limit must be between 1 and {MAX_LIMIT}")
        query.limit = limit
    raw = request.query.get("page", "").strip()
    if raw:
        page = _atoi(raw)
        if page is None or page < 1:
            raise ClientError(400, "page must be >= 1")
        query.page = page
    raw = request.query.get("sort", "").strip()
    if raw:
        if raw not in SORT_COLUMNS:
            raise ClientError(400, "invalid sort column")
        query.sort = raw
    raw = request.query.get("order", "").strip()
    if raw:
        if raw.lower() not in ("asc", "desc"):
            raise ClientError(400, "order must be asc or desc")
        query.order = raw.lower()
    return query


async def handle_activity(request: web.Request) -> web.Response:
    query = parse_query(request)
    store = _store(request)
    try:
        page = await store.list_activity(query)
    except Exception as exc:
        log.warning("activity.query_failed", error=str(exc))
        raise ClientError(500, "failed to get activity", "internal_error") from None
    return web.json_response(page, dumps=_compact)


async def handle_stats(request: web.Request) -> web.Response:
    store = _store(request)
    try:
        result = await store.stats(request.query.get("model", "").strip())
    except Exception as exc:
        log.warning("activity.query_failed", error=str(exc))
        raise ClientError(500, "failed to get activity stats", "internal_error") from None
    return web.json_response(result, dumps=_compact)


async def handle_capture(request: web.Request) -> web.Response:
    capture_id = _atoi(request.match_info["id"])
    if capture_id is None:
        raise ClientError(400, "invalid capture ID")
    store = request.app.get(ACTIVITY)
    item = store.captures.get(capture_id) if store is not None and store.captures is not None else None
    if item is None:
        raise ClientError(404, "capture not found")
    return web.json_response(item.to_json(), dumps=_compact)
