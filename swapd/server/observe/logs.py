"""Log history and live log streams.

The ring, the monitors (proxy, upstream, per model), ``/logs`` and
``/logs/stream``, and ``logToStdout``.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from aiohttp import web

from swapd.logging import PROXY_STREAM, ProxyLog, get_logger
from swapd.logring import LogLine, LogRing
from swapd.server.errors import error_response
from swapd.server.keys import RUNTIME

if TYPE_CHECKING:  # events imports this module
    from swapd.server.observe.events import EventHub

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
    assert monitor is not None  # "" is the combined view, which always exists
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
