"""Watching swapd: log history and live streams (``logs``), model events (``events``), version (``version``).

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

from swapd.server.observe.events import EventHub, Subscription, encode_event, handle_events, model_status
from swapd.server.observe.logs import (
    LOG_TO_STDOUT_VALUES,
    ObservedLogRing,
    UpstreamEcho,
    apply_log_settings,
    handle_log_stream,
    handle_logs,
)
from swapd.server.observe.version import build_info, handle_version

__all__ = [
    "LOG_TO_STDOUT_VALUES",
    "EventHub",
    "ObservedLogRing",
    "Subscription",
    "UpstreamEcho",
    "apply_log_settings",
    "build_info",
    "encode_event",
    "handle_events",
    "handle_log_stream",
    "handle_logs",
    "handle_version",
    "model_status",
]
