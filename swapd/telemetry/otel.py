"""OpenTelemetry traces: one span per proxied request, exported over OTLP/HTTP.

Optional: ``pip install 'swapd[otel]'``. Nothing here imports OpenTelemetry at
module level; :func:`make_tracer` does, and only when tracing is asked for,
so swapd without the package runs exactly as it does without tracing.

Tracing is on when the ``telemetry:`` block says ``enabled: true`` (or gives
an ``endpoint``), or when the standard environment names an OTLP endpoint
(``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``)
or ``OTEL_TRACES_EXPORTER=otlp``. ``OTEL_SDK_DISABLED=true`` turns it off
whatever the config says. Where the config block and the environment both
set a value, the config wins (endpoint, service name, each header, export
timeout, sample ratio); everything else (``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_BSP_*``, certificates, compression) comes from the environment, read
by the SDK itself.

What a request leaves (see docs/integrations/opentelemetry.md):

- a SERVER span ``"{gen_ai.operation.name} {gen_ai.request.model}"`` from
  the request's arrival to the end of its response, continuing the
  client's W3C ``traceparent``, with the GenAI semantic-convention
  attributes and swapd's own ``swapd.*``;
- a ``swapd.model_start`` child for a start the request waited on (arrival
  or start, whichever is later, to ready), and under it ``swapd.swap`` for
  the stops a swap made first.

Spans go to a private ``TracerProvider`` (the global one is left alone)
through a ``BatchSpanProcessor``: the request path only appends to its
queue; the export runs on the SDK's worker thread. A failing collector
costs one warning a minute, not latency.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from swapd.logging import get_logger
from swapd.redact import redact_url
from swapd.telemetry.record import RequestRecord, operation_for

if TYPE_CHECKING:
    from swapd.config._model import TelemetrySettings

log = get_logger("swapd.telemetry.otel")

DEFAULT_SERVICE_NAME = "swapd"
PROVIDER_NAME = "swapd"  # gen_ai.provider.name: not one of the well-known hosted providers
WARN_EVERY_S = 60.0  # export failures: at most one warning this often
CLOSE_TIMEOUT_S = 5.0  # close(): the last flush may take this long, then spans still queued are dropped
_HTTP_STATUS_ERROR = 500

INSTALL_HINT = "pip install 'swapd[otel]'"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() == "true"


def _env_asks() -> bool:
    """The standard OTEL_* environment asks for OTLP traces."""
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        return True
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return True
    exporters = {e.strip().lower() for e in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",")}
    return "otlp" in exporters


def _env_refuses() -> bool:
    """OTEL_TRACES_EXPORTER names exporters, none of them otlp (``none``, ``console``)."""
    raw = os.environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not raw:
        return False
    return "otlp" not in {e.strip().lower() for e in raw.split(",")}


def wanted(settings: TelemetrySettings | None) -> bool:
    """Whether tracing is asked for (by the config block or the environment)."""
    if _env_true("OTEL_SDK_DISABLED"):
        return False
    if settings is not None and settings.enabled:
        return True
    return _env_asks() and not _env_refuses()


def make_tracer(config: Any) -> OtelTracer | None:
    """The tracer for ``config`` (a Config, or its TelemetrySettings), or None when tracing is off.

    Returns None (with one warning) when tracing is asked for but the
    OpenTelemetry packages are missing.
    """
    settings = _settings_of(config)
    if _explicitly_off(config):
        return None  # ``telemetry: {enabled: false}`` wins over an OTEL_* environment
    if _env_true("OTEL_SDK_DISABLED"):
        if settings is not None and settings.enabled:
            log.info("telemetry.tracing_off", reason="OTEL_SDK_DISABLED=true")
        return None
    if not wanted(settings):
        return None
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        log.warning(
            "telemetry.otel_missing",
            message=f"tracing is configured but OpenTelemetry is not installed; install it with: {INSTALL_HINT}",
            error=str(exc),
        )
        return None
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    )
    if protocol.strip() and protocol.strip().lower() != "http/protobuf":
        log.warning("telemetry.protocol_ignored", protocol=protocol, message="swapd exports OTLP over http/protobuf")
    try:
        return OtelTracer(settings)
    except Exception as exc:  # a bad OTEL_* value (certificate, credential provider): serve untraced
        log.error("telemetry.tracing_failed", error=f"{type(exc).__name__}: {exc}", message="tracing is off")
        return None


def _explicitly_off(config: Any) -> bool:
    raw = getattr(config, "raw", None)
    block = raw.get("telemetry") if isinstance(raw, Mapping) else None
    return isinstance(block, Mapping) and block.get("enabled") is False


def _settings_of(config: Any) -> TelemetrySettings | None:
    observe = getattr(config, "observe", None)
    if observe is not None:
        return observe.telemetry
    return config  # already a TelemetrySettings (or None)


def _ratio(settings: TelemetrySettings | None) -> float:
    """The sample ratio: the config's, or OTEL_TRACES_SAMPLER_ARG for a ratio sampler when the config left 1.0."""
    ratio = settings.sample_ratio if settings is not None else 1.0
    if ratio != 1.0:
        return ratio
    sampler = os.environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler in ("traceidratio", "parentbased_traceidratio"):
        try:
            value = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1"))
        except ValueError:
            return 1.0
        if 0.0 <= value <= 1.0:
            return value
    return 1.0


# -- export failures: counted and reported once a minute ----------------------


class _OtelLogTap(logging.Handler):
    """The OpenTelemetry loggers' records, on swapd's terms.

    The OTLP exporter logs every retry and every failed batch; with a dead
    collector that is a line every few seconds. Those records (loggers under
    ``opentelemetry.exporter``) are kept, not printed: swapd reports failed
    exports itself (``telemetry.export_failed``, rate-limited) and quotes the
    last of them as the reason. Anything else the SDK has to say (a full
    queue, a malformed ``OTEL_*`` value) becomes a ``telemetry.otel_log``
    warning, once a minute at most for each kind of message.
    """

    def __init__(self, every: float = WARN_EVERY_S) -> None:
        super().__init__(level=logging.WARNING)
        self.last = ""
        self.every = every
        self._seen: dict[tuple[str, str], float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()[:300]
            if record.name.startswith("opentelemetry.exporter"):
                self.last = message
                return
            kind = (record.name, str(record.msg))
            now = time.monotonic()
            if now - self._seen.get(kind, -1e18) < self.every:
                return
            if len(self._seen) > 256:
                self._seen.clear()
            self._seen[kind] = now
            log.warning("telemetry.otel_log", logger=record.name, level=record.levelname, message=message)
        except Exception:  # pragma: no cover - a log line must never break the exporter
            pass


_TAP: _OtelLogTap | None = None
_TAP_LOCK = threading.Lock()


def _tap() -> _OtelLogTap:
    global _TAP
    with _TAP_LOCK:
        if _TAP is None:
            _TAP = _OtelLogTap()
            otel = logging.getLogger("opentelemetry")
            otel.addHandler(_TAP)
            otel.propagate = False
        return _TAP


class _Reporter:
    """Counts failed exports; one warning per ``WARN_EVERY_S``, one info line when exports recover."""

    def __init__(self, endpoint: str, every: float = WARN_EVERY_S) -> None:
        self.endpoint = endpoint
        self.every = every
        self.failed_batches = 0
        self.dropped_spans = 0  # since the last warning
        self.failing = False
        self._last_warn = -1e18
        self._lock = threading.Lock()

    def failed(self, spans: int, reason: str) -> None:
        with self._lock:
            self.failed_batches += 1
            self.dropped_spans += spans
            self.failing = True
            now = time.monotonic()
            if now - self._last_warn < self.every:
                return
            self._last_warn = now
            dropped, self.dropped_spans = self.dropped_spans, 0
        log.warning(
            "telemetry.export_failed",
            endpoint=self.endpoint,
            dropped_spans=dropped,
            reason=reason,
            message=f"spans are dropped; the next warning comes after {self.every:g}s at the earliest",
        )

    def succeeded(self) -> None:
        if not self.failing:
            return
        with self._lock:
            self.failing = False
            dropped, self.dropped_spans = self.dropped_spans, 0
        log.info("telemetry.export_recovered", endpoint=self.endpoint, dropped_spans=dropped)


def _guarded_exporter(inner: Any, reporter: _Reporter, tap: _OtelLogTap) -> Any:
    """A SpanExporter around ``inner`` that reports failures and stops at once on close."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class GuardedExporter(SpanExporter):
        def __init__(self) -> None:
            self.closing = False

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            if self.closing:
                return SpanExportResult.FAILURE
            try:
                result = inner.export(spans)
            except Exception as exc:
                reporter.failed(len(spans), f"{type(exc).__name__}: {exc}")
                return SpanExportResult.FAILURE
            if result is SpanExportResult.SUCCESS:
                reporter.succeeded()
            else:
                reporter.failed(len(spans), tap.last or "export failed")
            return result

        def shutdown(self) -> None:
            if self.closing:
                return
            self.closing = True
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return bool(inner.force_flush(timeout_millis))

    return GuardedExporter()


# -- the tracer ---------------------------------------------------------------


def _traces_url(endpoint: str) -> str:
    base = endpoint.rstrip("/")
    return base if base.endswith("/v1/traces") else base + "/v1/traces"


class OtelTracer:
    """The ``Tracer`` (swapd.telemetry.hub) that exports OTLP/HTTP spans."""

    def __init__(self, settings: TelemetrySettings | None = None, *, exporter: Any = None) -> None:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from swapd import __version__

        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self._server = trace.SpanKind.SERVER
        self._internal = trace.SpanKind.INTERNAL
        self._status_error = trace.StatusCode.ERROR
        self._Status = trace.Status

        attributes: dict[str, Any] = {SERVICE_VERSION: __version__}
        if settings is not None and settings.service_name:
            attributes[SERVICE_NAME] = settings.service_name
        resource = Resource.create(attributes)  # reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
        self.resource = resource

        if exporter is None:
            kwargs: dict[str, Any] = {}
            if settings is not None:
                if settings.endpoint:
                    kwargs["endpoint"] = _traces_url(settings.endpoint)
                if settings.headers:
                    kwargs["headers"] = dict(settings.headers)  # merged over OTEL_EXPORTER_OTLP_HEADERS
                env_timeout = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or os.environ.get(
                    "OTEL_EXPORTER_OTLP_TIMEOUT"
                )
                if settings.export_timeout != 10.0 or not env_timeout:  # 10 s is the block's default
                    kwargs["timeout"] = settings.export_timeout
            exporter = OTLPSpanExporter(**kwargs)
        self.endpoint = redact_url(str(getattr(exporter, "_endpoint", "") or ""))  # for log lines
        self.reporter = _Reporter(self.endpoint)
        self._exporter = _guarded_exporter(exporter, self.reporter, _tap())
        self._processor = BatchSpanProcessor(self._exporter)  # OTEL_BSP_* are read here
        ratio = _ratio(settings)
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(ratio)), resource=resource, shutdown_on_exit=False
        )
        self.provider.add_span_processor(self._processor)
        self._tracer = self.provider.get_tracer("swapd", __version__)
        self._closed = False
        log.info(
            "telemetry.tracing",
            endpoint=self.endpoint,
            service=str(resource.attributes.get(SERVICE_NAME, "")),
            sample_ratio=ratio,
        )

    # -- Tracer ------------------------------------------------------------
    def start(self, record: RequestRecord) -> None:
        if self._closed:
            return
        context = None
        if record.traceparent:
            carrier = {"traceparent": record.traceparent}
            if record.tracestate:
                carrier["tracestate"] = record.tracestate
            context = self._propagator.extract(carrier)
        operation = record.operation or operation_for(record.path)
        requested = record.requested or record.model
        attributes: dict[str, Any] = {
            "gen_ai.request.model": requested,
            "gen_ai.provider.name": PROVIDER_NAME,
            "http.request.method": record.method,
            "url.path": record.path,
            "swapd.model": record.model,
        }
        if operation:
            attributes["gen_ai.operation.name"] = operation
        record.span = self._tracer.start_span(
            _span_name(operation, requested, record.method),
            context=context,
            kind=self._server,
            attributes=attributes,
            start_time=int(record.timestamp * 1e9),
        )

    def outgoing(self, record: RequestRecord) -> dict[str, str]:
        span = record.span
        if span is None:
            return {}
        ctx = span.get_span_context()
        if not ctx.is_valid:
            return {}
        headers = {"traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"}
        state = ctx.trace_state.to_header()
        if state:
            headers["tracestate"] = state
        return headers

    def finish(self, record: RequestRecord) -> None:
        span = record.span
        if span is None:
            return
        record.span = None
        base_ns = record.timestamp * 1e9 - record.t0 * 1e9  # monotonic seconds -> epoch ns

        def at(mono: float) -> int:
            return int(base_ns + mono * 1e9)

        end_ns = at(record.end or time.monotonic())
        if not span.is_recording():
            span.end(end_time=end_ns)
            return
        operation = record.operation or operation_for(record.path)
        requested = record.requested or record.model
        span.update_name(_span_name(operation, requested, record.method))
        attributes: dict[str, Any] = {
            "swapd.waited": record.waited,
            "swapd.queued_s": round(record.queued_s, 6),
            # the client's ask (routing reads the body's "stream"); an event-stream answer also says it asked
            "gen_ai.request.stream": record.client_stream or record.stream,
        }
        if operation:
            attributes["gen_ai.operation.name"] = operation
        if record.status:
            attributes["http.response.status_code"] = record.status
        if record.response_model:
            attributes["gen_ai.response.model"] = record.response_model
        if record.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = list(record.finish_reasons)
        if record.peer:
            attributes["swapd.peer"] = record.peer
        tokens = record.tokens
        if tokens is not None:
            if tokens.input >= 0:
                attributes["gen_ai.usage.input_tokens"] = tokens.input
            if tokens.output >= 0:
                attributes["gen_ai.usage.output_tokens"] = tokens.output
            if tokens.cache >= 0:
                attributes["gen_ai.usage.cache_read.input_tokens"] = tokens.cache
            if tokens.tokens_per_second >= 0:
                attributes["swapd.tokens_per_second"] = round(tokens.tokens_per_second, 3)
        ttft = record.ttft_s
        if ttft is not None:
            attributes["swapd.time_to_first_token_s"] = round(ttft, 6)
        failed = record.status >= _HTTP_STATUS_ERROR or bool(record.error)
        if failed:
            attributes["error.type"] = record.error or str(record.status)
        span.set_attributes(attributes)
        if failed:
            span.set_status(self._Status(self._status_error, record.error or f"HTTP {record.status}"))

        if record.waits:
            parent = self._trace.set_span_in_context(span)
            for wait in record.waits:
                stopped = list(wait.stopped)
                start_attrs: dict[str, Any] = {"swapd.model": wait.model, "swapd.waited": wait.kind}
                if stopped:
                    start_attrs["swapd.stopped_models"] = stopped
                child = self._tracer.start_span(
                    "swapd.model_start",
                    context=parent,
                    kind=self._internal,
                    attributes=start_attrs,
                    start_time=at(wait.started),
                )
                if stopped:
                    swap = self._tracer.start_span(
                        "swapd.swap",
                        context=self._trace.set_span_in_context(child),
                        kind=self._internal,
                        attributes={"swapd.model": wait.model, "swapd.stopped_models": stopped},
                        start_time=at(wait.started),
                    )
                    swap.end(end_time=at(wait.stops_done))
                child.end(end_time=at(wait.ready))
        span.end(end_time=end_ns)

    async def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Flush what is queued (up to ``timeout`` seconds), then shut the provider down.

        The work runs on a daemon thread of its own, not the loop's default
        executor: an export stuck on an unresponsive collector can hold
        neither the event loop nor the process's exit.
        """
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def run() -> None:
            try:
                self._shutdown(timeout)
            finally:
                try:
                    loop.call_soon_threadsafe(finished)
                except RuntimeError:  # the loop is already closed
                    pass

        threading.Thread(target=run, name="swapd-otel-close", daemon=True).start()
        try:
            await asyncio.wait_for(done, timeout + 2.0)
        except TimeoutError:
            log.warning("telemetry.close_timeout", seconds=timeout, message="spans still queued were dropped")

    def _shutdown(self, timeout: float) -> None:
        # The SDK's force_flush ignores its timeout (opentelemetry-python#4568) and
        # blocks for as long as the exporter retries, so it gets a thread and a join.
        flusher = threading.Thread(target=self._flush_quietly, name="swapd-otel-flush", daemon=True)
        flusher.start()
        flusher.join(timeout)
        # Stop the exporter first: it aborts a retry back-off under way, and what is
        # left is dropped without a network call; then the processor's worker ends.
        self._exporter.shutdown()
        try:
            self.provider.shutdown()
        except Exception as exc:  # pragma: no cover
            log.warning("telemetry.shutdown_failed", error=str(exc))

    def _flush_quietly(self) -> None:
        try:
            self._processor.force_flush()
        except Exception as exc:  # pragma: no cover
            log.warning("telemetry.flush_failed", error=str(exc))

    def force_flush(self, timeout: float = 5.0) -> bool:
        """Export what is queued now (tests, benchmarks); blocks, so not for the event loop."""
        return bool(self._processor.force_flush(int(timeout * 1000)))


def _span_name(operation: str, model: str, method: str) -> str:
    if operation:
        return f"{operation} {model}" if model else operation
    return f"{method} {model}" if model else method
