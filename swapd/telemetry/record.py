"""What one proxied request leaves behind: the record every telemetry sink reads.

The routing layer fills a :class:`RequestRecord` while the request runs
(model, path, status, first-byte time, the swap it waited on) and hands it to
``Telemetry.finish`` once the response is complete. Token counts come from
the response's own ``usage`` (and llama-server's ``timings``), read from the
tail of the stream after it ended (see :mod:`swapd.telemetry.usage`), so
counting never holds a chunk back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Tokens:
    """Token counts and rates, with llama-swap's conventions: -1 means "not reported"."""

    input: int = 0  # prompt tokens (usage.prompt_tokens / input_tokens, or timings.prompt_n)
    output: int = 0  # generated tokens (usage.completion_tokens / output_tokens, or timings.predicted_n)
    cache: int = -1  # prompt tokens served from the cache (timings.cache_n, *_tokens_details.cached_tokens)
    draft: int = -1  # speculative decoding: tokens drafted
    draft_accepted: int = -1  # ... and accepted
    prompt_per_second: float = -1.0
    tokens_per_second: float = -1.0
    timings_ms: float = 0.0  # prompt_ms + predicted_ms, when llama-server reported timings


@dataclass(slots=True)
class Wait:
    """A model start (or a swap: stops, then a start) that a request waited on.

    Times are ``time.monotonic()``. ``stopped`` names the models stopped to
    make room (empty for a plain cold start); ``stops_done`` is when the last
    of them was stopped (equal to ``started`` when none was).
    """

    model: str
    started: float
    stops_done: float
    ready: float
    stopped: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "swap" if self.stopped else "start"


@dataclass(slots=True)
class Capture:
    """A request and its response as sent, for ``/api/captures/{id}`` (only when ``captureBuffer`` is set)."""

    request_headers: Mapping[str, str]  # the request's own (immutable) headers, not a copy
    request_body: bytes
    response_headers: Mapping[str, str] = field(default_factory=dict)
    response_body: list[bytes] = field(default_factory=list)  # the pieces as relayed
    response_size: int = 0
    truncated: bool = False


@dataclass(slots=True, eq=False)
class RequestRecord:
    """One proxied request, from arrival to the end of its response."""

    timestamp: float  # wall clock (time.time()) at arrival
    t0: float  # time.monotonic() at arrival
    method: str
    path: str  # the request path as llama-swap's req_path (no query)
    model: str  # the real model id after aliases; a peer model is "peer/model"
    requested: str = ""  # the name the client sent
    peer: str = ""  # the peer id, for a peer model
    operation: str = ""  # GenAI operation: chat, text_completion, embeddings, ... ("" when unknown)
    client_stream: bool = False  # the client asked for a stream
    id: int = 0  # the activity row id, assigned by the activity store
    status: int = 0
    content_type: str = ""
    stream: bool = False  # the response was an event stream
    end: float = 0.0  # time.monotonic() when the response ended
    first_byte: float = 0.0  # time.monotonic() of the first body byte relayed (0: none)
    tokens: Tokens | None = None  # None: the response carried no usage
    finish_reasons: tuple[str, ...] = ()
    response_model: str = ""
    waits: list[Wait] = field(default_factory=list)
    queued_s: float = 0.0  # time between arrival and the lease, all waits included
    error: str = ""  # why it failed ("" for a complete answer)
    traceparent: str = ""  # the incoming W3C traceparent header ("" when none)
    tracestate: str = ""
    span: Any = None  # the tracer's handle while the request runs (swapd.telemetry.otel)
    capture: Capture | None = None
    body_ends: tuple[bytes, bytes] | None = None  # (first piece, last pieces) until telemetry.usage reads them
    metadata: dict[str, str] = field(default_factory=dict)  # llama-swap's activity metadata
    session_id: str = ""  # the first ui.activity.session_id header the request carried ("" when none)

    @property
    def duration_s(self) -> float:
        return max(0.0, self.end - self.t0) if self.end else 0.0

    @property
    def ttft_s(self) -> float | None:
        """Time to the first content byte, for streamed responses only."""
        if not self.stream or not self.first_byte:
            return None
        return max(0.0, self.first_byte - self.t0)

    @property
    def waited(self) -> str:
        """ "swap", "start" or "" : what this request waited on before its backend could answer."""
        if any(w.stopped for w in self.waits):
            return "swap"
        return "start" if self.waits else ""


# GenAI operation names (OpenTelemetry semantic conventions) by route
_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/messages": "chat",
    "/v1/responses": "chat",
    "/v1/completions": "text_completion",
    "/completion": "text_completion",
    "/infill": "text_completion",
    "/v1/embeddings": "embeddings",
    # Ollama's API (swapd.server.ollama)
    "/api/chat": "chat",
    "/api/generate": "text_completion",
    "/api/embed": "embeddings",
    "/api/embeddings": "embeddings",
}


def session_id(headers: Mapping[str, str], names: tuple[str, ...]) -> str:
    """The value of the first of ``names`` (``ui.activity.session_id``) that ``headers`` carry, as llama-swap's UI
    picks it; "" when none does."""
    for name in names:
        value = headers.get(name, "")
        if value:
            return value[:200]
    return ""


def operation_for(path: str) -> str:
    """The GenAI operation for a request path ("" when the route has none), /upstream/<model>/ and /v/ included."""
    op = _OPERATIONS.get(path)
    if op is not None:
        return op
    if path.startswith("/v/"):
        return _OPERATIONS.get("/v1/" + path[3:], "")
    for suffix, name in _OPERATIONS.items():
        if path.endswith(suffix):
            return name
    return ""
