"""``Telemetry``: the one owner of request records and the sinks they go to.

Producers call in synchronously and never wait:

- the routing layer: :meth:`Telemetry.begin` when a proxied request arrives,
  :meth:`Telemetry.finish` when its response has ended (however it ended);
- the backends and the scheduler: :meth:`on_backend_state`,
  :meth:`on_stop`, :meth:`on_crash`.

Each sink gets every finished record (``request_done``). A sink that raises
is logged and skipped; a sink that does I/O (the activity store's SQLite,
the OTLP exporter) does it off the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from swapd.logging import get_logger
from swapd.telemetry import usage
from swapd.telemetry.record import RequestRecord

log = get_logger("swapd.telemetry")


class RequestSink(Protocol):
    def request_done(self, record: RequestRecord) -> None: ...


class Tracer(Protocol):
    """What the OpenTelemetry room provides (``swapd.telemetry.otel``)."""

    def start(self, record: RequestRecord) -> None:
        """Open the request's span (continuing ``record.traceparent``) and keep it in ``record.span``."""

    def outgoing(self, record: RequestRecord) -> dict[str, str]:
        """Headers that carry the trace to the backend (``traceparent``, ``tracestate``)."""
        ...

    def finish(self, record: RequestRecord) -> None:
        """Add the GenAI attributes and the child spans, end the span; never blocks."""

    async def close(self) -> None: ...


class ModelSink(Protocol):
    """Model lifecycle: a start that reached ready (or failed), a stop with its reason."""

    def model_started(self, model: str, seconds: float, ok: bool) -> None: ...

    def model_stopped(self, model: str, reason: str) -> None: ...


class Telemetry:
    def __init__(self) -> None:
        self.sinks: list[RequestSink] = []
        self.model_sinks: list[ModelSink] = []
        self.tracer: Tracer | None = None
        self.on_request: list[Callable[[RequestRecord], None]] = []
        self._starting: dict[str, float] = {}
        self.capture_bytes = 0  # captureBuffer: requests up to this size are captured (0: none)

    # -- model lifecycle -------------------------------------------------------
    def on_backend_state(self, backend: Any, old: Any, new: Any) -> None:
        """Backend state changes (Backend's on_state): a start is timed from starting to ready."""
        name = getattr(new, "value", str(new))
        model = backend.id
        if name == "starting":
            self._starting[model] = time.monotonic()
            return
        t0 = self._starting.pop(model, None)
        if t0 is None:
            return
        ok = name == "ready"
        for sink in self.model_sinks:
            sink.model_started(model, time.monotonic() - t0, ok)

    def on_stop(self, report: Any) -> None:
        """A finished stop (the scheduler's ``on_stop``): counted once per stop of a running backend."""
        if report.root_pid is None and not report.pids:
            return  # nothing was running (a stop of a stopped or crashed backend)
        for sink in self.model_sinks:
            sink.model_stopped(report.model_id, report.reason)

    def on_crash(self, model: str) -> None:
        for sink in self.model_sinks:
            sink.model_stopped(model, "crash")

    def begin(
        self,
        method: str,
        path: str,
        model: str,
        *,
        requested: str = "",
        peer: str = "",
        headers: Any = None,
        t0: float | None = None,
    ) -> RequestRecord:
        record = RequestRecord(
            timestamp=time.time(),
            t0=time.monotonic() if t0 is None else t0,
            method=method,
            path=path,
            model=model,
            requested=requested or model,
            peer=peer,
        )
        if headers is not None:
            record.traceparent = headers.get("traceparent", "")
            record.tracestate = headers.get("tracestate", "")
        tracer = self.tracer
        if tracer is not None:
            try:
                tracer.start(record)
            except Exception:  # pragma: no cover - tracing must never fail a request
                log.exception("telemetry.trace_failed", stage="start")
        return record

    def finish(self, record: RequestRecord) -> None:
        if not record.end:
            record.end = time.monotonic()
        if record.body_ends is not None:
            usage.account(record)
        for sink in self.sinks:
            try:
                sink.request_done(record)
            except Exception:
                log.exception("telemetry.sink_failed", sink=type(sink).__name__)
        tracer = self.tracer
        if tracer is not None:
            try:
                tracer.finish(record)
            except Exception:  # pragma: no cover
                log.exception("telemetry.trace_failed", stage="finish")
        for callback in self.on_request:
            callback(record)
