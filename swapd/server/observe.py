"""Watching swapd: log history and live streams, model events, version.

llama-swap keeps three log monitors and swapd serves the same views of its
one log ring:

- ``proxy``: swapd's own log lines (captured by :class:`swapd.logging.ProxyLog`);
- ``upstream``: every backend's output, each line tagged ``[model]``;
- ``{model}``: one model's output, untagged;
- the combined view (``/logs``, ``/logs/stream``): everything, each line
  tagged with its source.

``/logs/stream[/...]`` writes the history, then live lines, as chunked plain
text until the client goes away; ``?no-history`` skips the history.
``/api/events`` is llama-swap's Server-Sent Events feed: ``event:message``
records whose data is ``{"type": ..., "data": <JSON text>}``, with types
``modelStatus`` (every model and its state, sent on each state change) and
``logData`` (``{"source": "proxy"|"upstream", "data": text}``).

Nothing here can slow a backend or a request: every client has a bounded
buffer that drops its oldest entries when the client falls behind.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import heapq
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from aiohttp import web

from swapd import __version__
from swapd.logging import PROXY_STREAM, ProxyLog, get_logger
from swapd.logring import LogLine, LogRing
from swapd.server.errors import error_response
from swapd.server.keys import RUNTIME

log = get_logger("swapd.observe")

LOG_TO_STDOUT_VALUES = ("proxy", "upstream", "both", "none")
# How often an idle stream checks that its client is still there.
_IDLE_CHECK_SECONDS = 15.0


# -- the log ring --------------------------------------------------------------


class ObservedLogRing(LogRing):
    """The runtime's LogRing, with separate proxy history and line listeners.

    swapd's own lines (stream ``"proxy"``) are kept apart from backend output,
    as llama-swap keeps one buffer per monitor, so a busy request log never
    pushes a model's load output out of the history. ``lines()`` still returns
    at most ``max_lines`` of both together, oldest first.

    ``listeners`` are called with every appended line, synchronously; they must
    be cheap and must not log.
    """

    def __init__(self, max_lines: int = 2000, proxy_lines: int = 1000, subscriber_queue: int = 1000) -> None:
        super().__init__(max_lines, subscriber_queue)
        self._max_lines = max_lines
        self._proxy: collections.deque[LogLine] = collections.deque(maxlen=proxy_lines)
        self.listeners: list[Callable[[LogLine], None]] = []

    def append(self, source: str, stream: str, text: str) -> LogLine:
        if stream == PROXY_STREAM:
            line = LogLine(time.time(), source, stream, text)
            self._proxy.append(line)
            for queue in self._subscribers:  # the base class's subscribers, same policy
                if queue.full():
                    try:
                        queue.get_nowait()
                    except asyncio.QueueEmpty:  # pragma: no cover
                        pass
                queue.put_nowait(line)
        else:
            line = super().append(source, stream, text)
        for listener in self.listeners:
            listener(line)
        return line

    def proxy_lines(self) -> list[LogLine]:
        return list(self._proxy)

    def upstream_lines(self, source: str | None = None) -> list[LogLine]:
        return super().lines(source)

    def lines(self, source: str | None = None) -> list[LogLine]:
        merged = list(heapq.merge(self._proxy, self._lines, key=lambda line: line.ts))
        if source is not None:
            merged = [line for line in merged if line.source == source]
        return merged[-self._max_lines :]

    def tail(self, source: str, n: int) -> list[str]:
        return [line.text for line in self.lines(source)[-n:]] if n > 0 else []


class UpstreamEcho:
    """Prints backend output to stdout (``logToStdout: upstream|both``), raw as llama-swap does.

    Lines are written as they arrive and flushed once per loop iteration, so a
    flood costs one write call per batch, not per line.
    """

    def __init__(self, stream=None) -> None:
        self._stream = stream or sys.stdout
        self._flush_scheduled = False
        self.enabled = False

    def __call__(self, line: LogLine) -> None:
        if not self.enabled or line.stream == PROXY_STREAM:
            return
        try:
            self._stream.write(line.text + "\n")
        except (OSError, ValueError):  # stdout closed: stop trying
            self.enabled = False
            return
        if not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self._flush)
            except RuntimeError:
                self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        try:
            self._stream.flush()
        except (OSError, ValueError):
            self.enabled = False


def apply_log_settings(config, sink: ProxyLog | None, echo: UpstreamEcho | None = None) -> list[str]:
    """Apply ``logToStdout`` and ``logTimeFormat``; return warnings to log.

    ``logToStdout`` picks what reaches the console: ``proxy`` (default) swapd's
    own log, ``upstream`` the backends' output on stdout, ``both``, or
    ``none``. Every line stays in the log ring for ``/logs`` either way.
    Unlike llama-swap, which needs a restart for ``logToStdout``, both keys
    also take effect on a reload.
    """
    warnings = []
    raw = config.raw
    mode = str(raw.get("logToStdout") or "proxy").strip().lower()
    if mode not in LOG_TO_STDOUT_VALUES:  # the loader rejects these; be safe anyway
        mode = "proxy"
    if echo is not None:
        echo.enabled = mode in ("upstream", "both")
    if sink is not None:
        sink.printed = mode in ("proxy", "both")
        problem = sink.set_time_format(raw.get("logTimeFormat") if "logTimeFormat" in raw else None)
        if problem:
            warnings.append(problem)
    return warnings


# -- fan-out -----------------------------------------------------------------


class Subscription:
    """One client's bounded buffer; the oldest entries go when it falls behind."""

    __slots__ = ("kind", "accept", "items", "dropped", "closed", "_ready")

    def __init__(self, kind: str, size: int, accept: Callable[[LogLine], bool] | None = None) -> None:
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
            "state": backend.state.value if backend is not None else "stopped",
            "unlisted": mc.unlisted,
            "peerID": "",
        }
        if mc.aliases:
            entry["aliases"] = list(mc.aliases)
        out.append(entry)
    for peer_id, peer in (getattr(config, "peers", None) or {}).items():
        for model in peer.models:
            out.append({"id": f"{peer_id}/{model}", "name": "", "description": "", "state": "", "unlisted": False, "peerID": peer_id})
    return out


# -- handlers ----------------------------------------------------------------


class _Monitor:
    __slots__ = ("name", "accept", "fmt", "history")

    def __init__(self, name, accept, fmt, history) -> None:
        self.name = name
        self.accept = accept
        self.fmt = fmt
        self.history = history


def _tagged(line: LogLine) -> str:
    return f"[{line.source}] {line.text}\n"


def _plain(line: LogLine) -> str:
    return line.text + "\n"


def _is_proxy(line: LogLine) -> bool:
    return line.stream == PROXY_STREAM


def _is_upstream(line: LogLine) -> bool:
    return line.stream != PROXY_STREAM


def _monitor(runtime, name: str) -> _Monitor | None:
    logs: ObservedLogRing = runtime.logs
    if name == "":
        return _Monitor("", lambda line: True, _tagged, logs.lines)
    if name == "proxy":
        return _Monitor(name, _is_proxy, _plain, logs.proxy_lines)
    if name == "upstream":
        return _Monitor(name, _is_upstream, _tagged, logs.upstream_lines)
    model = runtime.config.resolve(name)
    if model is None:
        return None
    model_id = model.id
    return _Monitor(
        model_id,
        lambda line: line.source == model_id and line.stream != PROXY_STREAM,
        _plain,
        lambda: logs.upstream_lines(model_id),
    )


def _render(monitor: _Monitor, lines: Iterable[LogLine]) -> bytes:
    return "".join(map(monitor.fmt, lines)).encode("utf-8", "replace")


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def handle_logs(request: web.Request) -> web.Response:
    """The combined history as plain text (llama-swap's ``GET /logs``)."""
    monitor = _monitor(request.app[RUNTIME], "")
    return web.Response(body=_render(monitor, monitor.history()), content_type="text/plain", charset="utf-8")


async def handle_log_stream(request: web.Request) -> web.StreamResponse:
    """``/logs/stream[/proxy|/upstream|/{model}]``: history, then live lines."""
    rt = request.app[RUNTIME]
    name = request.match_info.get("monitor", "").strip("/")
    monitor = _monitor(rt, name)
    if monitor is None:
        return error_response(request, 400, "invalid logger. Use 'proxy', 'upstream' or a model's ID", "invalid_logger")
    hub: EventHub = rt.events
    # Subscribe and snapshot in one step (no await between): no line is lost
    # or repeated between the history and the live part.
    sub = hub.subscribe_logs(monitor.accept)
    history = [] if "no-history" in request.query else monitor.history()
    t0 = time.monotonic()
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/plain; charset=utf-8",
            "X-Content-Type-Options": "nosniff",
            "X-Accel-Buffering": "no",  # keep nginx from buffering the stream
            "Cache-Control": "no-cache",
        }
    )
    response.enable_chunked_encoding()
    try:
        await response.prepare(request)
        if history:
            await response.write(_render(monitor, history))
        while True:
            lines = await sub.batch(_IDLE_CHECK_SECONDS)
            if lines is None:
                break
            if not lines:
                if _client_gone(request):
                    break
                continue
            data = _render(monitor, lines)
            if sub.dropped:
                data = f"\n— {sub.dropped} lines dropped —\n".encode() + data
                sub.dropped = 0
            await response.write(data)
    except ConnectionResetError:  # the client went away mid-write
        pass
    finally:
        hub.unsubscribe(sub)
        log.info(
            "stream.closed",
            path=request.path,
            monitor=monitor.name or "all",
            seconds=round(time.monotonic() - t0, 3),
            subscribers=hub.subscribers,
        )
    return response


async def handle_events(request: web.Request) -> web.StreamResponse:
    """``/api/events``: Server-Sent Events of model status and log data."""
    rt = request.app[RUNTIME]
    hub: EventHub = rt.events
    logs: ObservedLogRing = rt.logs
    sub = hub.subscribe_events()
    initial = [
        encode_event("logData", {"source": "proxy", "data": "".join(map(_plain, logs.proxy_lines()))}),
        encode_event("logData", {"source": "upstream", "data": "".join(map(_tagged, logs.upstream_lines()))}),
        encode_event("modelStatus", model_status(rt)),
    ]
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


def _git_commit(root: Path) -> str | None:
    """The short commit of the source checkout at ``root``, read without running git."""
    try:
        git = root / ".git"
        if git.is_file():  # a linked worktree: "gitdir: <path>"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head[:7] or None
        ref = head.split(":", 1)[1].strip()
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        for base in dict.fromkeys((git, common)):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()[:7] or None
            if (base / "packed-refs").is_file():
                for line in (base / "packed-refs").read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split(" ", 1)[0][:7]
    except (OSError, IndexError, ValueError):
        return None
    return None


@functools.lru_cache(maxsize=1)
def build_info() -> dict[str, str]:
    """llama-swap's ``/api/version`` fields with swapd's values.

    ``SWAPD_COMMIT`` / ``SWAPD_BUILD_DATE`` (set by a packager) win; otherwise
    the commit comes from the source checkout swapd runs from, and the build
    date is "unknown", as in an unstamped llama-swap build.
    """
    root = Path(__file__).resolve().parent.parent.parent
    return {
        "version": __version__,
        "commit": os.environ.get("SWAPD_COMMIT") or _git_commit(root) or "unknown",
        "build_date": os.environ.get("SWAPD_BUILD_DATE") or "unknown",
    }


async def handle_version(request: web.Request) -> web.Response:
    return web.json_response(build_info())

