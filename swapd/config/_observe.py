"""The observability keys: llama-swap's activity store, captures and performance, and swapd's ``telemetry``.

- ``metricsMaxInMemory`` (default 1000): activity rows kept when no ``store.path`` is set.
- ``captureBuffer`` (MB, default 5; 0 turns captures off).
- ``store.path``: a SQLite file, so activity survives a restart.
- ``logRequests``: one log line per proxied request at info level (swapd
  always logs ``request`` lines; with this off they drop to debug).
- ``performance.disabled`` / ``performance.every`` (a Go duration such as
  ``15s`` or ``1m30s``, or seconds; at least 5 s, default 5 s): the system
  and GPU gauges.
- ``telemetry`` (swapd's own): OpenTelemetry traces, see ``TelemetrySettings``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ._model import ObserveSettings, TelemetrySettings
from ._reader import _Context, _describe, _Reader, open_block

KNOWN_STORE_KEYS = ("path",)
KNOWN_UI_KEYS = ("activity",)
KNOWN_UI_ACTIVITY_KEYS = ("session_id",)
DEFAULT_SESSION_ID_HEADERS = ("X-Session-ID", "X-Litellm-Session-Id")
KNOWN_PERFORMANCE_KEYS = ("disabled", "every")
KNOWN_TELEMETRY_KEYS = ("enabled", "endpoint", "serviceName", "headers", "sampleRatio", "exportTimeout")
DEFAULT_METRICS_MAX_IN_MEMORY = 1000
DEFAULT_CAPTURE_BUFFER_MB = 5
DEFAULT_PERFORMANCE_EVERY = 5.0
MIN_PERFORMANCE_EVERY = 5.0

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float | None:
    """Seconds for a Go duration (``"15s"``, ``"1h30m"``, ``"500ms"``) or a bare number of seconds; None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text:
        return None
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return total if pos == len(text) else None


def observe_settings(ctx: _Context, document: Mapping[str, Any]) -> ObserveSettings:
    top = _Reader(ctx, document)
    max_rows = top.int("metricsMaxInMemory", DEFAULT_METRICS_MAX_IN_MEMORY)
    if max_rows <= 0:
        max_rows = DEFAULT_METRICS_MAX_IN_MEMORY  # llama-swap: zero or less means the default
    capture_mb = top.int("captureBuffer", DEFAULT_CAPTURE_BUFFER_MB)
    if capture_mb < 0:
        top.fail("captureBuffer", f"must be >= 0 MB (0 turns captures off), got {capture_mb}")
    log_requests = top.bool("logRequests", False)

    store = open_block(ctx, document.get("store"), "store", KNOWN_STORE_KEYS)
    store_path = (store.str("path", "") or "").strip()

    perf = open_block(ctx, document.get("performance"), "performance", KNOWN_PERFORMANCE_KEYS)
    disabled = perf.bool("disabled", False)
    every = DEFAULT_PERFORMANCE_EVERY
    if perf.mapping.get("every") is not None:
        raw = perf.mapping["every"]
        seconds = parse_duration(raw)
        if seconds is None:
            perf.fail(
                "every", f'expected a duration such as "5s", "1m30s" or a number of seconds, got {_describe(raw)}'
            )
        if seconds < MIN_PERFORMANCE_EVERY:
            perf.fail("every", f"must be at least 5s, got {_describe(raw)}")
        every = seconds

    return ObserveSettings(
        metrics_max_in_memory=max_rows,
        capture_buffer_bytes=capture_mb * 1024 * 1024,
        store_path=store_path,
        log_requests=log_requests,
        performance_disabled=disabled,
        performance_every=every,
        telemetry=_telemetry(ctx, document),
        session_id_headers=_session_id_headers(ctx, document),
    )


def _session_id_headers(ctx: _Context, document: Mapping[str, Any]) -> tuple[str, ...]:
    """``ui.activity.session_id``: header names, trimmed, blanks and case-insensitive repeats dropped, as llama-swap.

    Absent means llama-swap's default; an empty list turns the lookup off.
    """
    ui = open_block(ctx, document.get("ui"), "ui", KNOWN_UI_KEYS)
    activity = open_block(ctx, ui.mapping.get("activity"), "ui.activity", KNOWN_UI_ACTIVITY_KEYS)
    if activity.mapping.get("session_id") is None:
        return DEFAULT_SESSION_ID_HEADERS
    names: list[str] = []
    seen: set[str] = set()
    for raw in activity.str_list("session_id"):
        name = raw.strip()
        if name and name.lower() not in seen:
            seen.add(name.lower())
            names.append(name)
    return tuple(names)


def _telemetry(ctx: _Context, document: Mapping[str, Any]) -> TelemetrySettings:
    """``telemetry:``: traces by config; the standard OTEL_* environment works without it."""
    if document.get("telemetry") is None:
        return TelemetrySettings()
    reader = open_block(ctx, document.get("telemetry"), "telemetry", KNOWN_TELEMETRY_KEYS)
    endpoint = (reader.str("endpoint", "") or "").strip()
    if endpoint and not endpoint.startswith(("http://", "https://")):
        reader.fail("endpoint", f"expected an http:// or https:// URL of an OTLP/HTTP receiver, got {endpoint!r}")
    enabled = reader.bool("enabled", bool(endpoint))
    headers_raw = reader.mapping_of("headers")
    headers = {}
    for name, value in headers_raw.items():
        if isinstance(value, (dict, list)) or value is None:
            ctx.fail(f"expected a string, got {_describe(value)}", None, f"telemetry.headers.{name}")
        headers[str(name)] = str(value)
    ratio_raw = reader.mapping.get("sampleRatio", 1.0)
    if isinstance(ratio_raw, bool) or not isinstance(ratio_raw, (int, float)) or not 0 <= ratio_raw <= 1:
        reader.fail("sampleRatio", f"expected a number from 0 to 1, got {_describe(ratio_raw)}")
    timeout_raw = reader.mapping.get("exportTimeout", 10)
    timeout = parse_duration(timeout_raw)
    if timeout is None or timeout <= 0:
        reader.fail("exportTimeout", f'expected a duration such as "10s", got {_describe(timeout_raw)}')
    return TelemetrySettings(
        enabled=enabled,
        endpoint=endpoint,
        service_name=(reader.str("serviceName", "") or "").strip(),
        headers=tuple(sorted(headers.items())),
        sample_ratio=float(ratio_raw),
        export_timeout=timeout,
    )
