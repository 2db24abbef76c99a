"""structlog set-up: human-readable on a terminal, JSON lines otherwise."""

from __future__ import annotations

import asyncio
import collections
import datetime
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Literal

import structlog

LogFormat = Literal["auto", "console", "json"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Values that must never reach a log line, whatever the caller passed.
_SECRET_KEYS = frozenset({"authorization", "api_key", "apikey", "x-api-key", "password", "token"})


def _redact(_logger, _name, event_dict):
    if _SECRET_KEYS.isdisjoint(map(str.lower, event_dict)):  # the usual case, checked in C
        return event_dict
    for key in list(event_dict):
        if key.lower() in _SECRET_KEYS:
            event_dict[key] = "[redacted]"
    return event_dict


def _json_fallback(obj):
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


# One encoder for every line: json.dumps with a ``default`` builds a new one per call.
_JSON = json.JSONEncoder(default=_json_fallback)


def _render_json(_logger, _name, event_dict) -> str:
    return _JSON.encode(event_dict)


class LineWriter:
    """The structlog logger: one write per line, one flush per event-loop turn.

    structlog's PrintLogger flushes every line (a write system call each). On
    the event loop's thread this writes into the stream's buffer and flushes
    once, after the callbacks of the current loop turn, so a burst of request
    lines costs one system call. Anywhere else (another thread, no loop) it
    flushes at once.
    """

    def __init__(self, stream) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._flush_pending = False

    def msg(self, message: str) -> None:
        with self._lock:
            try:
                self._stream.write(message + "\n")
            except (OSError, ValueError):  # stream closed: nothing sensible to do
                return
        if self._flush_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_pending = True
        loop.call_soon(self.flush)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg

    def flush(self) -> None:
        self._flush_pending = False
        with self._lock:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                pass


class LineWriterFactory:
    def __init__(self, stream) -> None:
        self._writer = LineWriter(stream)

    def __call__(self, *args) -> LineWriter:
        return self._writer


def configure(level: str = "info", fmt: LogFormat = "auto", stream=None, sink: ProxyLog | None = None) -> None:
    """Configure structlog once for the whole process.

    ``fmt="auto"`` renders for a person when the stream is a terminal and as
    JSON lines otherwise, so journald and log shippers get structured records.
    With a ``sink``, every rendered line is also kept as llama-swap's "proxy"
    log (see :class:`ProxyLog`), which also owns the timestamp format.
    """
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    colors = fmt == "console" and stream.isatty()
    renderer = structlog.dev.ConsoleRenderer(colors=colors) if fmt == "console" else _render_json
    processors = [
        structlog.processors.add_log_level,
        sink.stamp if sink is not None else structlog.processors.TimeStamper(fmt="iso", utc=False),
        _redact,
        structlog.processors.format_exc_info,
        renderer,
    ]
    if sink is not None:
        sink.strip_colors = colors
        processors.append(sink.capture)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=LineWriterFactory(stream),
        cache_logger_on_first_use=True,
    )
    route_stdlib(_LEVELS.get(level, logging.INFO))


# -- the standard library's loggers (aiohttp, asyncio) ------------------------

# Secrets as they appear in free text: header lines (raw bytes, a dict or
# multidict repr), bearer and basic credentials anywhere, and query-string
# parameters. A header value ends at a line break, a quote or a backslash
# (the "\n" of a bytes repr). No word boundary before a name: in a bytes
# repr a header name follows the "n" of "\n".
_TEXT_SECRETS = (
    (
        re.compile(
            r"(?i)((?:proxy-)?authorization|x-api-key|api-key|(?:set-)?cookie)(['\"]?\s*[:=]\s*['\"]?)[^\r\n'\"\\]*"
        ),
        r"\1\2[redacted]",
    ),
    (re.compile(r"(?i)(bearer|basic)\s+[A-Za-z0-9._~+/=\-]+"), r"\1 [redacted]"),
    (
        re.compile(r"(?i)(api[_-]?key|access[_-]?token|token|password|secret)=[^&\s'\"\\]+"),
        r"\1=[redacted]",
    ),
)
_TEXT_LIMIT = 400  # characters of a library's message kept on the line


def redact_text(text: str) -> str:
    """``text`` with credentials replaced by ``[redacted]``."""
    for pattern, replacement in _TEXT_SECRETS:
        text = pattern.sub(replacement, text)
    return text


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > _TEXT_LIMIT:
        text = text[:_TEXT_LIMIT] + "..."
    return text


_ROUTED_LOGGERS = ("aiohttp", "asyncio", "concurrent.futures")


class StdlibBridge(logging.Handler):
    """aiohttp's and asyncio's log records, as swapd's structlog events.

    Those libraries log tracebacks whose exception text carries the raw
    request, headers and all (a malformed request's ``Authorization`` among
    them). Each record becomes one event, named after its logger, with the
    message and the exception's type and text redacted and flattened to one
    line, plus where the exception was raised; no traceback. A flood of one
    kind (same logger, message template and exception type) is cut to one
    line per ``window`` seconds; the next line of that kind says how many
    were ``suppressed`` in between.
    """

    MAX_KINDS = 256

    def __init__(self, window: float = 10.0) -> None:
        super().__init__()
        self.window = window
        self._kinds: dict[tuple, list] = {}  # kind -> [last emitted (monotonic), suppressed since]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            exc = record.exc_info[1] if record.exc_info else None
            kind = (
                record.name,
                record.msg if isinstance(record.msg, str) else type(record.msg).__name__,
                type(exc).__name__ if exc is not None else None,
            )
            now = time.monotonic()
            state = self._kinds.get(kind)
            if state is not None and now - state[0] < self.window:
                state[1] += 1
                return
            suppressed = state[1] if state is not None else 0
            if state is None and len(self._kinds) >= self.MAX_KINDS:
                self._kinds.clear()
            self._kinds[kind] = [now, 0]
            fields: dict[str, str | int] = {"message": _one_line(redact_text(record.getMessage()))}
            if exc is not None:
                fields["error"] = _one_line(redact_text(f"{type(exc).__name__}: {exc}"))
                tb = exc.__traceback__
                while tb is not None and tb.tb_next is not None:
                    tb = tb.tb_next
                if tb is not None:
                    fields["where"] = f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}"
            if suppressed:
                fields["suppressed"] = suppressed
            if record.levelno >= logging.ERROR:
                method = "error"
            elif record.levelno >= logging.WARNING:
                method = "warning"
            elif record.levelno >= logging.INFO:
                method = "info"
            else:
                method = "debug"
            getattr(structlog.get_logger(record.name), method)(record.name, **fields)
        except Exception:  # a log line must never break the caller
            pass


_BRIDGE: StdlibBridge | None = None


def route_stdlib(level: int = logging.INFO) -> StdlibBridge:
    """Send the standard library loggers swapd's dependencies use through structlog (idempotent)."""
    global _BRIDGE
    if _BRIDGE is None:
        _BRIDGE = StdlibBridge()
    for name in _ROUTED_LOGGERS:
        lib = logging.getLogger(name)
        if _BRIDGE not in lib.handlers:
            lib.addHandler(_BRIDGE)
        lib.propagate = False
        lib.setLevel(level)
    return _BRIDGE


# -- llama-swap's logTimeFormat ---------------------------------------------

# Go's named time layouts (llama-swap's logTimeFormat values), rendered the way
# Go renders them: "_2" is a space-padded day, "Z07:00" prints "Z" for UTC,
# "3:04PM" has no padding. Each takes nanoseconds since the epoch.


def _parts(ns: int) -> tuple[datetime.datetime, int]:
    seconds, frac = divmod(ns, 1_000_000_000)
    return datetime.datetime.fromtimestamp(seconds).astimezone(), frac


def _zone_colon(dt: datetime.datetime) -> str:
    offset = dt.utcoffset() or datetime.timedelta(0)
    if not offset:
        return "Z"
    text = dt.strftime("%z")  # +hhmm
    return f"{text[:3]}:{text[3:5]}"


def _layout(fmt: str, frac_digits: int = 0, *, trim: bool = False) -> Callable[[int], str]:
    def render(ns: int) -> str:
        dt, frac = _parts(ns)
        text = dt.strftime(fmt.replace("{_2}", f"{dt.day:2d}").replace("{Z07:00}", _zone_colon(dt)))
        if frac_digits:
            digits = f"{frac:09d}"[:frac_digits]
            if trim:
                digits = digits.rstrip("0")
            if digits:
                text = text.replace("{frac}", "." + digits)
            else:
                text = text.replace("{frac}", "")
        return text

    return render


def _kitchen(ns: int) -> str:
    dt, _ = _parts(ns)
    return f"{dt.hour % 12 or 12}:{dt.minute:02d}{'AM' if dt.hour < 12 else 'PM'}"


GO_TIME_LAYOUTS: dict[str, Callable[[int], str]] = {
    "ansic": _layout("%a %b {_2} %H:%M:%S %Y"),
    "unixdate": _layout("%a %b {_2} %H:%M:%S %Z %Y"),
    "rubydate": _layout("%a %b %d %H:%M:%S %z %Y"),
    "rfc822": _layout("%d %b %y %H:%M %Z"),
    "rfc822z": _layout("%d %b %y %H:%M %z"),
    "rfc850": _layout("%A, %d-%b-%y %H:%M:%S %Z"),
    "rfc1123": _layout("%a, %d %b %Y %H:%M:%S %Z"),
    "rfc1123z": _layout("%a, %d %b %Y %H:%M:%S %z"),
    "rfc3339": _layout("%Y-%m-%dT%H:%M:%S{Z07:00}"),
    "rfc3339nano": _layout("%Y-%m-%dT%H:%M:%S{frac}{Z07:00}", 9, trim=True),
    "kitchen": _kitchen,
    "stamp": _layout("%b {_2} %H:%M:%S"),
    "stampmilli": _layout("%b {_2} %H:%M:%S{frac}", 3),
    "stampmicro": _layout("%b {_2} %H:%M:%S{frac}", 6),
    "stampnano": _layout("%b {_2} %H:%M:%S{frac}", 9),
}


# -- swapd's own log as llama-swap's "proxy" log --------------------------------

PROXY_SOURCE = "swapd"
PROXY_STREAM = "proxy"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ALWAYS_PRINTED = frozenset({"warning", "error", "critical", "exception"})
_DEFAULT = object()


class ProxyLog:
    """swapd's own log lines, kept as llama-swap's "proxy" log monitor.

    An instance provides two structlog processors (installed by
    :func:`configure`): ``stamp`` writes the timestamp in the configured
    ``logTimeFormat``; ``capture`` runs after the renderer and appends each
    rendered line to the runtime's :class:`~swapd.logring.LogRing` as source
    ``"swapd"``, stream ``"proxy"``. The server attaches its ring once it
    exists; lines logged before that are kept (bounded) and handed over then.

    ``printed`` is whether swapd's info and debug lines reach its console
    (``logToStdout`` proxy or both); warnings and errors always do, so a
    failure is never silent. The ring gets every line either way.

    The per-line cost is a deque append and, with SSE or log-stream clients
    connected, one queue put per client.
    """

    def __init__(self, pending_lines: int = 500) -> None:
        self.printed = True
        self.strip_colors = False
        self._ring = None
        self._loop = None
        self._loop_thread: int | None = None
        self._pending: collections.deque[str] = collections.deque(maxlen=pending_lines)
        self._iso = structlog.processors.TimeStamper(fmt="iso", utc=False)
        self._format: object = _DEFAULT
        self._local = threading.local()

    # -- settings --------------------------------------------------------
    def set_time_format(self, value) -> str | None:
        """Apply ``logTimeFormat``; return a warning for an unknown name.

        ``None`` (key absent) keeps swapd's ISO-8601 timestamp; ``""`` means
        no timestamp (llama-swap's default); a Go layout name selects it.
        llama-swap treats an unknown name as ``""``; so does swapd, with a
        warning.
        """
        if value is None:
            self._format = _DEFAULT
            return None
        name = str(value).strip().lower()
        if name == "":
            self._format = None
            return None
        layout = GO_TIME_LAYOUTS.get(name)
        self._format = layout
        if layout is None:
            return f"logTimeFormat {value!r} is not one of: {', '.join(GO_TIME_LAYOUTS)}; logging without timestamps"
        return None

    def attach(self, ring, loop) -> None:
        """Start appending to ``ring``; ``loop`` is the loop that owns it."""
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._ring = ring
        while self._pending:
            ring.append(PROXY_SOURCE, PROXY_STREAM, self._pending.popleft())

    def detach(self) -> None:
        self._ring = None
        self._loop = None

    # -- processors ------------------------------------------------------
    def stamp(self, logger, method, event_dict):
        self._local.printed = self.printed or event_dict.get("level", method) in _ALWAYS_PRINTED
        fmt = self._format
        if fmt is _DEFAULT:
            return self._iso(logger, method, event_dict)
        if callable(fmt):  # a Go layout; None means no timestamp
            event_dict["timestamp"] = fmt(time.time_ns())
        return event_dict

    def capture(self, logger, method, rendered):
        text = _ANSI.sub("", rendered) if self.strip_colors else rendered
        ring = self._ring
        if ring is None:
            self._pending.append(text)
        elif threading.get_ident() == self._loop_thread:
            ring.append(PROXY_SOURCE, PROXY_STREAM, text)
        else:
            try:
                self._loop.call_soon_threadsafe(ring.append, PROXY_SOURCE, PROXY_STREAM, text)
            except (RuntimeError, AttributeError):  # loop closed or detached meanwhile
                pass
        if not getattr(self._local, "printed", True):
            raise structlog.DropEvent
        return rendered


def get_logger(name: str = "swapd"):
    return structlog.get_logger(name)
