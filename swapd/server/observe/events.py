"""llama-swap's ``/api/events`` feed: subscriptions with bounded buffers, the event hub, model status."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from swapd.logging import PROXY_STREAM, get_logger
from swapd.logring import LogLine
from swapd.server import capabilities
from swapd.server.keys import RUNTIME
from swapd.server.observe.logs import _IDLE_CHECK_SECONDS, ObservedLogRing, _client_gone, _plain, _tagged

log = get_logger("swapd.observe")


class Subscription:
    """One client's bounded buffer; the oldest entries go when it falls behind."""

    __slots__ = ("kind", "accept", "items", "dropped", "closed", "_ready")

    def __init__(self, kind: str, size: int, accept: Callable[[LogLine], bool] = lambda line: True) -> None:
        self.kind = kind  # "logs" (LogLine items) or "events" (encoded SSE records)
        self.accept = accept
        self.items: collections.deque = collections.deque(maxlen=size)
        self.dropped = 0
        self.closed = False
        self._ready = asyncio.Event()

    def offer(self, item) -> None:
        if len(self.items) == self.items.maxlen:
            self.dropped += 1
        self.items.append(item)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def batch(self, timeout: float) -> list | None:
        """Everything buffered, waiting up to ``timeout`` for something; None once closed."""
        if not self.items and not self.closed:
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return []
        self._ready.clear()
        items = list(self.items)
        self.items.clear()
        if not items and self.closed:
            return None
        return items


class EventHub:
    """Fans log lines and model state changes out to stream and SSE clients.

    Producers (the log ring, backends) call in synchronously and never wait:
    each subscriber has a bounded buffer. Model status is computed once per
    change and only when an SSE client is listening.
    """

    def __init__(self, status: Callable[[], list[dict[str, Any]]], buffer: int = 1024) -> None:
        self._status = status
        self._buffer = buffer
        self._logs: set[Subscription] = set()
        self._events: set[Subscription] = set()
        self._closed = False
        # more records for a new /api/events client, after the built-in ones (in-flight requests, uiConfig)
        self.greetings: list[Callable[[], bytes]] = []

    @property
    def subscribers(self) -> int:
        return len(self._logs) + len(self._events)

    def subscribe_logs(self, accept: Callable[[LogLine], bool]) -> Subscription:
        sub = Subscription("logs", self._buffer * 4, accept)
        return self._add(self._logs, sub)

    def subscribe_events(self) -> Subscription:
        return self._add(self._events, Subscription("events", self._buffer))

    def _add(self, group: set[Subscription], sub: Subscription) -> Subscription:
        if self._closed:
            sub.close()
        else:
            group.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._logs.discard(sub)
        self._events.discard(sub)

    def close(self) -> None:
        """End every stream (server shutdown), so none holds the shutdown up."""
        self._closed = True
        for sub in (*self._logs, *self._events):
            sub.close()

    # -- producers ---------------------------------------------------------
    def on_log_line(self, line: LogLine) -> None:
        for sub in self._logs:
            if sub.accept(line):
                sub.offer(line)
        if self._events:
            proxy = line.stream == PROXY_STREAM
            data = (line.text if proxy else f"[{line.source}] {line.text}") + "\n"
            record = encode_event("logData", {"source": "proxy" if proxy else "upstream", "data": data})
            for sub in self._events:
                sub.offer(record)

    def on_backend_state(self, backend, old, new) -> None:
        self.models_changed()

    def has_event_subscribers(self) -> bool:
        return bool(self._events)

    def publish(self, kind: str, payload: Any) -> None:
        """One event of ``kind`` to every /api/events client (encoded once; nothing when nobody listens)."""
        if not self._events:
            return
        record = encode_event(kind, payload)
        for sub in self._events:
            sub.offer(record)

    def on_activity(self, entry: dict[str, Any]) -> None:
        """A request was recorded: llama-swap's ``activity`` message carries only the row id."""
        if not self._events:
            return
        record = encode_event("activity", {"id": entry["id"]})
        for sub in self._events:
            sub.offer(record)

    def profile_changed(self, active: str | None) -> None:
        """The active profile changed (llama-swap's ``profileChanged``, then the model list, as it sends them)."""
        if not self._events:
            return
        record = encode_event("profileChanged", {"active": active})
        for sub in self._events:
            sub.offer(record)
        self.models_changed()

    def models_changed(self) -> None:
        if not self._events:
            return
        try:
            record = encode_event("modelStatus", self._status())
        except Exception:  # pragma: no cover - never let a status snapshot break a backend
            return
        for sub in self._events:
            sub.offer(record)


def encode_event(kind: str, payload) -> bytes:
    """llama-swap's SSE record: the envelope's ``data`` is itself JSON text."""
    envelope = {"type": kind, "data": json.dumps(payload, separators=(",", ":"))}
    return b"event:message\ndata:" + json.dumps(envelope, separators=(",", ":")).encode() + b"\n\n"


def model_status(runtime) -> list[dict[str, Any]]:
    """llama-swap's modelStatus list: every model with its state, then peer models."""
    config = runtime.config
    out = []
    for model_id in sorted(config.models):
        mc = config.models[model_id]
        backend = runtime.backends.get(model_id)
        entry = {
            "id": model_id,
            "name": mc.name,
            "description": mc.description,
            # a remote model (proxy, no cmd) is always ready and has no backend here
            "state": backend.state.value if backend is not None else "ready" if mc.remote else "stopped",
            "unlisted": mc.unlisted,
            "peerID": "",
        }
        if mc.aliases:
            entry["aliases"] = list(mc.aliases)
        if mc.remote:
            entry["remote"] = True  # swapd addition: never started or stopped here
        # llama-swap renders only the capabilities key here (no GGUF is read on this path)
        fields = capabilities.render(mc.capabilities)
        for key in ("capabilities", "context_length"):
            if key in fields:
                entry[key] = fields[key]
        out.append(entry)
    for peer_id, peer in (getattr(config, "peers", None) or {}).items():
        for model in peer.models:
            out.append(
                {
                    "id": f"{peer_id}/{model}",
                    "name": "",
                    "description": "",
                    "state": "",
                    "unlisted": False,
                    "peerID": peer_id,
                }
            )
    return out


# -- handlers ----------------------------------------------------------------


async def handle_events(request: web.Request) -> web.StreamResponse:
    """``/api/events``: Server-Sent Events of model status and log data.

    It opens with the log history (two ``logData`` records), the model
    status and the active profile (``profileChanged``); ``?no-history`` leaves
    the history out, as on ``/logs/stream``.
    """
    rt = request.app[RUNTIME]
    hub: EventHub = rt.events
    logs: ObservedLogRing = rt.logs
    sub = hub.subscribe_events()
    initial = [
        encode_event("modelStatus", model_status(rt)),
        encode_event("profileChanged", {"active": rt.active_profile}),
    ]
    if "no-history" not in request.query:  # as on /logs/stream: a client that shows no log skips the backlog
        initial[:0] = [
            encode_event("logData", {"source": "proxy", "data": "".join(map(_plain, logs.proxy_lines()))}),
            encode_event("logData", {"source": "upstream", "data": "".join(map(_tagged, logs.upstream_lines()))}),
        ]
    initial += [greet() for greet in hub.greetings]
    t0 = time.monotonic()
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "X-Accel-Buffering": "no",
        }
    )
    try:
        await response.prepare(request)
        await response.write(b"".join(initial))
        while True:
            records = await sub.batch(_IDLE_CHECK_SECONDS)
            if records is None:
                break
            if not records:
                if _client_gone(request):
                    break
                await response.write(b": keepalive\n\n")  # SSE comment; clients ignore it
                continue
            await response.write(b"".join(records))
    except ConnectionResetError:  # the client went away mid-write
        pass
    finally:
        hub.unsubscribe(sub)
        log.info(
            "stream.closed",
            path=request.path,
            monitor="events",
            seconds=round(time.monotonic() - t0, 3),
            subscribers=hub.subscribers,
        )
    return response


# -- version -------------------------------------------------------------------
