"""Requests being answered right now, as llama-swap lists them, and ``POST /api/inflight/{id}/cancel``.

:class:`InflightRegistry` is the one owner of this state (an app key,
``INFLIGHT``): an entry per model-routed request from the moment its model is
known until its handler returns. Ids are llama-swap's: a counter, as decimal
strings ("1", "2", ...), never reused while swapd runs.

There is no listing route in llama-swap and none here: clients learn the
ids from ``/api/events`` messages of type ``inflight``, whose data is
``{"operation": "snapshot", "requests": [...]}`` when a client connects,
then ``{"operation": "upsert", "request": {...}}`` and
``{"operation": "remove", "id": "..."}``. An entry carries llama-swap's
fields (``id``, ``timestamp``, ``model``, ``req_path``, ``method``,
``req_headers`` with secrets redacted, ``remote_ip``, ``resp_headers``,
``resp_bytes``, ``elapsed_ms``, ``metadata``). Upserts for the response's
headers and byte count are sent at most every ``UPDATE_SECONDS`` per
entry, from one timer that runs only while requests are in flight and
someone listens. Nothing is sent per chunk: the upstream response counts
its body bytes as they arrive (one addition per read, ``received``) and the
timer reads the count.

Tracked, as in llama-swap: the model-routed routes (JSON, multipart and
``?model=`` ones) and ``/upstream/<model>/<path>`` when ``<path>`` is one of
them, for local, remote and peer models alike; not websockets, ``/comfyui``
or swapd's own Ollama routes.

Cancelling (``InflightRegistry.cancel``) cancels the request's handler task.
The cancellation travels the same path as a client that hangs up: the
scheduler forgets a queued request, and the relay's ``finally`` closes the
backend connection, which is how llama-server learns to stop generating.
:func:`tracked` then turns it into an answer for the client that sent the
request, instead of aiohttp's dropped connection: before any byte of the
answer went out, a 499 ``request_cancelled`` error (a 4xx, so OpenAI's SDKs
do not send the request again, as they do after llama-swap's 502); in an
event stream, an SSE ``error`` event and a proper end of the stream; in any
other body, the connection is closed so a cut body cannot pass for a whole
one.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from swapd.logging import get_logger
from swapd.server.errors import ClientError
from swapd.server.keys import RUNTIME
from swapd.server.observe import encode_event
from swapd.telemetry.captures import header_map

log = get_logger("swapd.server")

UPDATE_SECONDS = 0.25  # llama-swap's inflightUpdateInterval
CANCELLED_STATUS = 499  # nginx's "client closed request": a 4xx that clients do not retry


class Entry:
    """One request in flight (its JSON is built only when someone listens)."""

    __slots__ = ("id", "timestamp", "t0", "model", "method", "path", "request", "task")

    def __init__(self, entry_id: str, request: web.Request, model: str, path: str) -> None:
        self.id = entry_id
        self.timestamp = time.time()
        self.t0 = time.monotonic()
        self.model = model
        self.method = request.method
        self.path = path
        self.request = request
        self.task = asyncio.current_task()

    def progress(self) -> tuple[int, int]:
        """(response status or 0, body bytes so far): what an upsert reports beyond the request itself."""
        upstream = self.request.get("swapd.upstream")
        if upstream is None:
            return 0, 0
        return upstream.status, getattr(upstream, "received", 0)

    def as_json(self) -> dict[str, Any]:
        upstream = self.request.get("swapd.upstream")
        out: dict[str, Any] = {
            "id": self.id,
            "timestamp": datetime.fromtimestamp(self.timestamp).astimezone().isoformat(timespec="microseconds"),
            "model": self.model,
            "req_path": self.path,
            "method": self.method,
            "req_headers": header_map(self.request.headers),
            "remote_ip": client_ip(self.request),
            "resp_headers": header_map(upstream.headers) if upstream is not None else {},
            "resp_bytes": getattr(upstream, "received", 0) if upstream is not None else 0,
            "elapsed_ms": int(max(0.0, time.monotonic() - self.t0) * 1000),
        }
        record = self.request.get("swapd.record")
        metadata = getattr(record, "metadata", None)
        if metadata:
            out["metadata"] = dict(metadata)
        return out


def client_ip(request: web.Request) -> str:
    """llama-swap's client address: the first X-Forwarded-For entry, else X-Real-IP, else the peer."""
    forwarded = request.headers.get("X-Forwarded-For", "")
    if forwarded:
        return forwarded.split(",", 1)[0].strip()
    real = request.headers.get("X-Real-IP", "")
    if real:
        return real.strip()
    return request.remote or ""


class InflightRegistry:
    """The requests in flight, by id; the one place they are added, listed and cancelled."""

    def __init__(self, post_paths: Iterable[str] = (), get_paths: Iterable[str] = ()) -> None:
        self._routes = {"POST": frozenset(post_paths), "GET": frozenset(get_paths)}
        self._entries: dict[str, Entry] = {}
        self._next = 0
        self._sent: dict[str, tuple[int, int]] = {}  # what the last upsert of each entry said
        self._timer: asyncio.TimerHandle | None = None
        # set by install(): where updates go (EventHub.publish) and whether anyone listens
        self.publish: Callable[[str, Any], None] | None = None
        self.listening: Callable[[], bool] = lambda: False

    def __len__(self) -> int:
        return len(self._entries)

    # -- which requests ------------------------------------------------------------------
    def path_of(self, request: web.Request, path_qs: str) -> str | None:
        """The ``req_path`` to list ``request`` under, or None when it is not tracked."""
        if "Upgrade" in request.headers:
            return None
        allowed = self._routes.get(request.method)
        if not allowed:
            return None
        if request.path.startswith("/upstream/"):
            path = unquote(path_qs.partition("?")[0])  # the path the backend gets, as llama-swap lists it
            return path if path in allowed else None
        return request.path if request.path in allowed else None

    # -- the entries ---------------------------------------------------------------------
    def add(self, request: web.Request, model: str, path: str) -> Entry:
        self._next += 1
        entry = Entry(str(self._next), request, model, path)
        self._entries[entry.id] = entry
        self._send_upsert(entry)
        return entry

    def remove(self, entry: Entry) -> None:
        if self._entries.pop(entry.id, None) is None:
            return
        self._sent.pop(entry.id, None)
        if self.publish is not None and self.listening():
            self.publish("inflight", {"operation": "remove", "id": entry.id})

    def get(self, entry_id: str) -> Entry | None:
        return self._entries.get(entry_id)

    def cancel(self, entry_id: str) -> bool:
        """Cancel the request's handler; False when no request has that id (it ended, or never was)."""
        entry = self._entries.get(entry_id)
        if entry is None or entry.task is None or entry.task.done():
            return False
        if "swapd.cancelled" in entry.request:
            return True  # already on its way out: a second cancel must not cut the answer it is writing
        entry.request["swapd.cancelled"] = entry.id
        entry.task.cancel()
        log.info("request.cancel", id=entry.id, model=entry.model, method=entry.method, path=entry.path)
        return True

    def snapshot(self) -> dict[str, Any]:
        """llama-swap's ``snapshot`` message: every entry, oldest first."""
        entries = sorted(self._entries.values(), key=lambda e: (e.timestamp, int(e.id)))
        if entries:
            self._arm()
        return {"operation": "snapshot", "requests": [e.as_json() for e in entries]}

    # -- updates ---------------------------------------------------------------------------
    def _send_upsert(self, entry: Entry) -> None:
        if self.publish is None or not self.listening():
            return
        self._sent[entry.id] = entry.progress()
        self.publish("inflight", {"operation": "upsert", "request": entry.as_json()})
        self._arm()

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(UPDATE_SECONDS, self._tick)

    def _tick(self) -> None:
        """Send an upsert for each entry whose response headers or byte count changed since its last one."""
        self._timer = None
        if not self._entries or self.publish is None or not self.listening():
            return
        for entry in list(self._entries.values()):
            if self._sent.get(entry.id) != entry.progress():
                self._send_upsert(entry)
        self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


INFLIGHT = web.AppKey("swapd.inflight", InflightRegistry)


# -- the request side -------------------------------------------------------------------------


def tracked(model_of: Callable[[Any, dict[str, Any]], str]):
    """Decorate a forwarding function ``fn(request, target, path_qs, body, **kw)``: list it while it runs.

    ``model_of(target, kw)`` names the model as the entry shows it. A cancel
    (:meth:`InflightRegistry.cancel`) that reaches the function becomes an
    answer to the client (module docstring); any other cancellation goes on.
    """

    def wrap(fn: Callable[..., Awaitable[web.StreamResponse]]):
        @functools.wraps(fn)
        async def run(request: web.Request, target: Any, path_qs: str, body: Any, **kw: Any) -> web.StreamResponse:
            registry = request.app.get(INFLIGHT)
            path = registry.path_of(request, path_qs) if registry is not None else None
            if registry is None or path is None or "swapd.inflight" in request:
                return await fn(request, target, path_qs, body, **kw)
            entry = registry.add(request, model_of(target, kw), path)
            request["swapd.inflight"] = entry.id
            try:
                return await fn(request, target, path_qs, body, **kw)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if request.get("swapd.cancelled") != entry.id or task is None or task.uncancel() > 0:
                    raise  # not (only) ours: the client went away, or swapd is shutting down
                return await answer_cancelled(request, entry)
            finally:
                registry.remove(entry)

        return run

    return wrap


async def answer_cancelled(request: web.Request, entry: Entry) -> web.StreamResponse:
    """What the client of a cancelled request gets (module docstring)."""
    message = f"request {entry.id} was cancelled (POST /api/inflight/{entry.id}/cancel)"
    response: web.StreamResponse | None = request.get("swapd.response")
    if response is None or not response.prepared:
        raise ClientError(CANCELLED_STATUS, message, "request_cancelled")
    response["swapd.error"] = "cancelled"
    if response.headers.get("Content-Type", "").startswith("text/event-stream"):
        event = {"error": {"message": message, "type": "invalid_request_error", "code": "request_cancelled"}}
        try:
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            await response.write_eof()
            return response
        except (ConnectionError, RuntimeError):
            pass
    if request.transport is not None:  # a cut body must not pass for a whole one
        request.transport.close()
    return response


# -- the route and the wiring -------------------------------------------------------------------


async def handle_cancel(request: web.Request) -> web.Response:
    """``POST /api/inflight/{id}/cancel``: 200 ``{"msg": "ok"}``, or 404 for an id not in flight (llama-swap's)."""
    if not request.app[INFLIGHT].cancel(request.match_info["id"]):
        raise ClientError(404, "inflight request not found", "not_found")
    return web.json_response({"msg": "ok"})


def install(app: web.Application, post_paths: Iterable[str], get_paths: Iterable[str]) -> InflightRegistry:
    """The registry for the model-routed ``post_paths`` and ``get_paths``, its route, and its events."""
    registry = app[INFLIGHT] = InflightRegistry(post_paths, get_paths)

    async def lifecycle(app: web.Application):
        rt = app[RUNTIME]
        hub = rt.events
        registry.publish = hub.publish
        registry.listening = hub.has_event_subscribers
        hub.greetings.append(lambda: encode_event("uiConfig", ui_config(rt.config)))
        hub.greetings.append(lambda: encode_event("inflight", registry.snapshot()))
        yield
        registry.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/api/inflight/{id}/cancel", handle_cancel)
    return registry


def ui_config(config: Any) -> dict[str, Any]:
    """llama-swap's ``uiConfig`` message: the UI's settings from ``ui:``."""
    return {"activity": {"session_id": list(config.observe.session_id_headers)}}
