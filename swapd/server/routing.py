"""Model-routed handlers: find the model, rewrite the body, get a lease, relay.

The model comes from the JSON body, a multipart form field, the query string
or an ``/upstream/<model>/`` path. The name is resolved in this order: the
active profile's pin, a selector's pick (swapd.server.selectors), a model id
or alias, a peer model. Local models go through the scheduler; ``peer/model``
names go straight to the remote peer.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import re
import time
from contextlib import nullcontext
from urllib.parse import quote, unquote

from aiohttp import web
from yarl import URL

from swapd.backend import StartError, State
from swapd.config import Config, Filters, ModelConfig, PeerConfig
from swapd.logging import get_logger
from swapd.scheduler import Lease, SchedulerError
from swapd.server import profiles, selectors, websocket
from swapd.server.bodies import TopLevelScanner
from swapd.server.errors import ClientError
from swapd.server.inflight import tracked
from swapd.server.keys import BODY_BUDGET, RUNTIME
from swapd.server.relay import CREDENTIAL_HEADERS, UpstreamError, relay
from swapd.server.slowclient import check_declared_length, next_chunk, stream_body
from swapd.telemetry.record import Capture, RequestRecord, Wait, operation_for, session_id

log = get_logger("swapd.server")

# A streaming chat request to a cold model may get progress while it loads
# (llama-swap's sendLoadingState); only chat clients render reasoning_content.
LOADING_PATHS = ("/v1/chat/completions",)
LOADING_TICK_SECONDS = 0.75

# How much of a multipart upload may be held while looking for its model field.
MULTIPART_SNIFF_LIMIT = 256 * 1024 * 1024


def _bad_model(name, config: Config) -> ClientError:
    if not isinstance(name, str) or not name:
        return ClientError(404, "no model id could be identified in the request", "model_not_found")
    shown = name if len(name) <= 200 else name[:200] + "..."
    message = f"model {shown!r} not found"
    if len(name) <= 200:
        known = [m for m, mc in config.models.items() if not mc.unlisted]
        known += [a for m in known for a in config.models[m].aliases]
        known += [sid for sid, sc in config.selectors.items() if not sc.unlisted]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if close:
            message += f"; did you mean {close[0]!r}?"
    return ClientError(404, message, "model_not_found")


def lookup_model(config: Config, name) -> ModelConfig | tuple[PeerConfig, str]:
    """A local model (id or alias; these win) or a (peer, model) pair."""
    if isinstance(name, str) and name:
        model = config.resolve(name)
        if model is not None:
            return model
        peer = config.resolve_peer(name)
        if peer is not None:
            return peer
    raise _bad_model(name, config)


def resolve(request: web.Request, name) -> tuple[str, ModelConfig | tuple[PeerConfig, str]]:
    """The request's model name after the active profile's pin and a selector's pick, and what it names.

    The name goes on the request (``swapd.model_name``), and a selector's id
    (``swapd.selector``) for its record; a name the active profile switches
    off raises 404.
    """
    rt = request.app[RUNTIME]
    if isinstance(name, str) and name:
        choice = selectors.choose(rt, name)
        if choice.selector:
            request["swapd.selector"] = choice.selector
        name = request["swapd.model_name"] = choice.name
    return name, lookup_model(rt.config, name)


# -- body rewriting ------------------------------------------------------------


def _set_path(doc: dict, dotted: str, value) -> None:
    node = doc
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def _del_path(doc: dict, dotted: str) -> None:
    node = doc
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            return
        node = child
    node.pop(leaf, None)


def rewrite_body(data: dict, requested: str, use_model_name: str, filters: Filters) -> bool:
    """Apply useModelName and filters in llama-swap's order; return True if anything changed."""
    if not (use_model_name or filters):
        return False
    if use_model_name:
        data["model"] = use_model_name
    for name in filters.strip_params:
        _del_path(data, name)
    for name, value in filters.set_params.items():
        _set_path(data, name, value)
    for name, value in filters.set_params_by_id.get(requested, {}).items():
        _set_path(data, name, value)
    return True


# -- forwarding ------------------------------------------------------------------


class LoadingStream:
    """The SSE a streaming chat client sees while its model loads.

    The 200 and the event-stream headers go out at once; progress is sent as
    ``reasoning_content`` deltas (dots, and the backend's latest output line),
    and the model's own stream follows on the same response.
    """

    def __init__(self, request: web.Request, model_id: str, rt) -> None:
        self.request = request
        self.model_id = model_id
        self.rt = rt
        self.response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._ticker: asyncio.Task | None = None
        self._t0 = time.monotonic()

    async def send(self, text: str) -> None:
        event = {"choices": [{"index": 0, "delta": {"reasoning_content": text}}]}
        await self.response.write(b"data: " + json.dumps(event).encode() + b"\n\n")

    async def start(self) -> None:
        await self.response.prepare(self.request)
        self.request["swapd.response"] = self.response  # headers sent: a cancel ends it in-band (inflight)
        await self.send(f"swapd loading model: {self.model_id}\n")
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    def abandon(self) -> None:
        """Stop the progress at once (the request is going away without an answer from the model)."""
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    async def _tick(self) -> None:
        backend = self.rt.backends.get(self.model_id)
        last = None
        while True:
            await asyncio.sleep(LOADING_TICK_SECONDS)
            tail = backend.tail()[-1:] if backend is not None else []
            line = tail[0].strip()[:200] if tail else None
            if line and line != last:
                last = line
                await self.send(f"\n{line} ")
            else:
                await self.send(".")

    async def finish(self, error: Exception | None = None) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
            self._ticker = None
        if error is None:
            await self.send(f"\nDone! ({time.monotonic() - self._t0:.2f}s)\n\n")
            return
        message = error.detail() if isinstance(error, StartError) else str(error)
        event = {"error": {"message": message, "type": "server_error", "code": "backend_start_failed"}}
        await self.response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()


@tracked(lambda model, kw: model.id)
async def forward_local(
    request: web.Request,
    model: ModelConfig,
    path_qs: str,
    body,
    *,
    loading: bool = False,
    content_length: int | None = None,
    requested: str = "",
) -> web.StreamResponse:
    if model.remote:
        return await forward_remote(request, model, path_qs, body, content_length=content_length, requested=requested)
    rt = request.app[RUNTIME]
    scheduler = rt.scheduler
    t0 = time.monotonic()
    record = begin_record(request, rt, model.id, requested, body, t0)
    ticket = scheduler.request(model.id)  # 429 here, before any loading stream
    loader = None
    try:
        if loading and not scheduler.serving_now(model.id):
            loader = LoadingStream(request, model.id, rt)
            await loader.start()
        try:
            lease = await scheduler.wait(ticket)
        except (SchedulerError, StartError) as exc:
            if loader is None:
                raise
            await loader.finish(exc)
            return loader.response
    except BaseException:
        scheduler.abandon(ticket)
        if loader is not None:
            loader.abandon()
        raise
    if loader is not None:
        await loader.finish()
    backend_model = lease.backend.model
    key_headers = model_headers(backend_model)
    if record is not None:
        note_wait(record, lease, t0)
        key_headers = trace_headers(rt, record, key_headers)
    try:
        return await _relay_logged(
            request,
            backend_model.proxy.rstrip("/") + path_qs,
            body,
            model.id,
            t0,
            {"model": model.id, "wait_s": round(time.monotonic() - t0, 4)},
            prepared=loader.response if loader is not None else None,
            timeouts=backend_model.timeouts,
            content_length=content_length,
            extra_headers=key_headers,
            drop_headers=CREDENTIAL_HEADERS if backend_model.api_key else frozenset(),
            record=record,
        )
    finally:
        lease.release()


def note_wait(record: RequestRecord, lease: Lease, t0: float) -> None:
    """Put on the record how long the request queued and the start or swap it waited on."""
    record.queued_s = time.monotonic() - t0
    waited = lease.waited
    if waited is not None:  # a waiter that joined a swap under way waited only from its own arrival
        record.waits.append(
            Wait(waited.model, max(waited.started, t0), max(waited.stops_done, t0), waited.ready, waited.stopped)
        )


async def lease_model(rt, model_id: str, record: RequestRecord | None, t0: float) -> Lease:
    """Admit a request for ``model_id`` (429/404/503 here), wait for its lease, and note the wait on the record."""
    scheduler = rt.scheduler
    ticket = scheduler.request(model_id)
    try:
        lease = await scheduler.wait(ticket)
    except BaseException:
        scheduler.abandon(ticket)
        raise
    if record is not None:
        note_wait(record, lease, t0)
    return lease


def begin_record(request: web.Request, rt, model_id: str, requested: str, body, t0: float, peer: str = ""):
    """The request's telemetry record (POST requests, as llama-swap meters them); the middleware finishes it."""
    if request.method != "POST":
        return None
    telemetry = rt.telemetry
    record = telemetry.begin(
        "POST", request.path, model_id, requested=requested, peer=peer, headers=request.headers, t0=t0
    )
    record.operation = operation_for(request.path)
    record.client_stream = request.get("swapd.client_stream", False)
    record.session_id = session_id(request.headers, rt.config.observe.session_id_headers)
    if "swapd.selector" in request:
        record.metadata["selector"] = request["swapd.selector"]  # as llama-swap's activity rows show it
    if telemetry.capture_bytes and isinstance(body, (bytes, bytearray)) and len(body) <= telemetry.capture_bytes:
        record.capture = Capture(request.headers, bytes(body))  # the parsed headers are immutable: no copy
    request["swapd.record"] = record
    return record


def trace_headers(rt, record, headers: dict[str, str] | None) -> dict[str, str] | None:
    tracer = rt.telemetry.tracer
    if tracer is None or record is None or record.span is None:
        return headers
    outgoing = tracer.outgoing(record)
    if not outgoing:
        return headers
    return {**(headers or {}), **outgoing}


def model_headers(model: ModelConfig) -> dict[str, str] | None:
    """What swapd adds to every request to ``model``: its ``headers``, then its own ``apiKey`` (which wins)."""
    if not model.headers and not model.api_key:
        return None
    out = dict(model.headers)
    if model.api_key:
        out.update(own_key_headers(model.api_key) or {})
    return out


def remote_url(proxy: str, path_qs: str) -> str:
    """A remote model's URL for a request path: ``proxy`` + path, without a doubled ``/v1``.

    OpenAI-style base URLs end in ``/v1`` (``https://openrouter.ai/api/v1``) while
    clients send ``/v1/chat/completions``; the second ``/v1`` goes.
    """
    base = proxy.rstrip("/")
    if base.endswith("/v1") and (path_qs == "/v1" or path_qs.startswith(("/v1/", "/v1?"))):
        path_qs = path_qs[3:]
    return base + path_qs


async def forward_remote(
    request: web.Request,
    model: ModelConfig,
    path_qs: str,
    body,
    *,
    content_length: int | None = None,
    requested: str = "",
) -> web.StreamResponse:
    """A remote model (``proxy``, no ``cmd``): always ready, so no lease, no TTL, no swap; relayed as it is.

    Its ``headers`` and ``apiKey`` go along; the client's own credential is dropped when the model has an
    ``apiKey`` (and swapd's key never leaves, as everywhere). A refusal of the credentials is named.
    """
    rt = request.app[RUNTIME]
    t0 = time.monotonic()
    record = begin_record(request, rt, model.id, requested, body, t0)
    return await _relay_logged(
        request,
        remote_url(model.proxy, path_qs),
        body,
        f"{model.id} (remote)",
        t0,
        {"model": model.id, "remote": True},
        timeouts=model.timeouts,
        content_length=content_length,
        extra_headers=trace_headers(rt, record, model_headers(model)),
        drop_headers=CREDENTIAL_HEADERS if model.api_key else frozenset(),
        record=record,
        name_refusals=True,
        counted=model.id,
    )


def own_key_headers(api_key: str) -> dict[str, str] | None:
    """A backend's or peer's own key, in both places OpenAI- and Anthropic-style servers look."""
    return {"Authorization": f"Bearer {api_key}", "x-api-key": api_key} if api_key else None


@tracked(lambda peer, kw: f"{peer.id}/{kw.get('model_name', '')}")
async def forward_peer(
    request: web.Request,
    peer: PeerConfig,
    path_qs: str,
    body,
    *,
    content_length: int | None = None,
    model_name: str = "",
    requested: str = "",
) -> web.StreamResponse:
    # a peer is another host: it gets its configured key or no credential at all, never the client's
    rt = request.app[RUNTIME]
    t0 = time.monotonic()
    record = begin_record(request, rt, f"{peer.id}/{model_name}", requested or model_name, body, t0, peer.id)
    return await _relay_logged(
        request,
        peer.proxy + path_qs,
        body,
        f"{peer.id} (peer)",
        t0,
        {"peer": peer.id},
        extra_headers=trace_headers(rt, record, own_key_headers(peer.api_key)),
        drop_headers=CREDENTIAL_HEADERS,
        timeouts=peer.timeouts,
        content_length=content_length,
        record=record,
        counted=f"{peer.id}/{model_name}",
    )


async def _relay_logged(
    request: web.Request, url: str, body, label: str, t0: float, fields: dict, *, counted: str = "", **relay_kw
):
    """Relay, then log one ``request`` line with its outcome, however it ended.

    ``counted``: a peer or remote model the scheduler does not see; its
    requests are counted while relayed (selectors.SelectorState, for spillover).
    """
    outcome = "client_disconnected"
    try:
        rt = request.app[RUNTIME]
        with rt.selector_state.relaying(counted) if counted else nullcontext():
            response = await relay(request, rt.pool, rt.session, url, body, label, **relay_kw)
        outcome = response.get("swapd.error", "ok")
        return response
    except UpstreamError as exc:
        outcome = str(exc)
        raise
    except ClientError as exc:  # the client's own upload stalled or ran over its limit
        outcome = exc.message
        request["swapd.status"] = exc.status
        raise
    finally:
        if outcome == "client_disconnected" and "swapd.cancelled" in request:
            outcome = "cancelled"  # POST /api/inflight/{id}/cancel (swapd.server.inflight)
        request["swapd.logged"] = True
        log.info(
            "request",
            **fields,
            method=request.method,
            path=request.path,
            status=request.get("swapd.status", 502 if outcome != "client_disconnected" else 499),
            outcome=outcome,
            total_s=round(time.monotonic() - t0, 4),
        )


# -- handlers --------------------------------------------------------------------


# A JSON body up to this size is parsed on the event loop (a chat request is a
# few kB); a larger one is scanned as it arrives and parsed in a thread only
# when a filter must rewrite it.
INLINE_PARSE_LIMIT = 1024 * 1024
# A body still arriving is scanned for its model when it declares more than
# this, or once it passes it: a smaller one is soon whole, and is parsed then.
SCAN_FROM = 64 * 1024


def _parse_object(body: bytes | bytearray) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ClientError(400, "request body is not valid JSON", "invalid_json") from None
    if not isinstance(data, dict):
        raise ClientError(400, "request body must be a JSON object", "invalid_body")
    return data


def _needs_rewrite(target: ModelConfig | tuple[PeerConfig, str], requested, name=None) -> bool:
    """Whether the body must change: ``name`` (resolve's) differs from the ``requested`` one, or the target rewrites."""
    if name is not None and name != requested:
        return True
    if isinstance(target, ModelConfig):
        return bool(target.use_model_name or target.filters)
    peer, model_name = target
    return model_name != requested or bool(peer.filters)


def _rewrite(data: dict, target: ModelConfig | tuple[PeerConfig, str], requested) -> bytes | None:
    """The rewritten body, or None when nothing changed.

    ``requested`` is the name after pins and selectors (resolve's): the body
    carries it from here on, and filters' ``setParamsByID`` look it up.
    """
    renamed = isinstance(requested, str) and data.get("model") != requested
    if renamed:
        data["model"] = requested
    if isinstance(target, ModelConfig):
        changed = rewrite_body(data, requested, target.use_model_name, target.filters)
    else:
        peer, model_name = target
        changed = rewrite_body(data, requested, model_name if model_name != requested else "", peer.filters)
    return json.dumps(data).encode() if changed or renamed else None


async def handle_json_model(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    limits = rt.config.client_limits
    content = request.content
    if content.is_eof() and content.total_bytes <= min(limits.max_body_bytes, INLINE_PARSE_LIMIT):
        # The whole body came with the headers (the usual small JSON request):
        # take it as is, without read_body's per-chunk idle timers.
        body: bytes | bytearray = content.read_nowait()
        data = _parse_object(body)
        requested = data.get("model")
        name, target = resolve(request, requested)
        rewritten = _rewrite(data, target, name)
        return await _route_json(request, target, rewritten or body, data.get("stream") is True, requested)
    return await _handle_held_body(request)


async def _handle_held_body(request: web.Request) -> web.StreamResponse:
    """A JSON body that arrives over several reads: budgeted, scanned for ``model`` as it comes.

    Once ``model`` is known, a model at its concurrencyLimit refuses (429)
    before the rest of the body is read; the body is
    parsed whole only when it is small or a filter must rewrite it, and then
    off the event loop when it is large. A selector picks its target only once
    the whole body is here, just before the request is admitted (past 1 MiB
    the body is parsed and rewritten in a thread in between, so a spillover
    pick may not yet see another such request that is also on its way).
    """
    rt = request.app[RUNTIME]
    limits = rt.config.client_limits
    budget = request.app[BODY_BUDGET]
    cap = limits.max_body_bytes_in_flight
    check_declared_length(request, limits.max_body_bytes)
    reserved = 0
    large = (request.content_length or 0) > SCAN_FROM  # scanned from its first bytes
    if request.content_length:
        budget.reserve(request.content_length, cap)  # 503 before a byte of it is read
        reserved = request.content_length
    try:
        scanner = TopLevelScanner(("model", "stream"))
        target: ModelConfig | tuple[PeerConfig, str] | None = None
        name = None
        body = bytearray()
        while chunk := await next_chunk(request, limits.body_idle_timeout):
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise ClientError(
                    413,
                    f"request body too large (limit {limits.max_body_bytes} bytes)",
                    "request_too_large",
                    close=True,
                )
            if len(body) > reserved:  # chunked, or longer than declared
                budget.reserve(len(body) - reserved, cap)
                reserved = len(body)
            if (large or len(body) > SCAN_FROM) and not scanner.complete(("model", "stream")):
                scanner.feed(body)
                if target is None and "model" in scanner.found:
                    name, target = resolve(request, scanner.found["model"])
                    if isinstance(target, ModelConfig) and "swapd.selector" not in request:
                        rt.scheduler.check_admission(target.id)  # 429 now, before the rest of the body
        requested = scanner.found.get("model")
        stream = scanner.found.get("stream") is True
        if target is not None and "swapd.selector" in request:
            name, target = resolve(request, requested)  # the selector picks now, with nothing left to wait for
        rewritten = None
        if (
            len(body) <= INLINE_PARSE_LIMIT
            or target is None
            or scanner.broken
            or _needs_rewrite(target, requested, name)
        ):
            parse = _parse_object if len(body) <= INLINE_PARSE_LIMIT else _parse_off_loop
            data = await parse(body) if parse is _parse_off_loop else _parse_object(body)
            if target is not None and data.get("model") != requested:
                raise ClientError(400, "the request body names more than one model", "invalid_body")
            requested = data.get("model")
            stream = data.get("stream") is True
            if target is None:
                name, target = resolve(request, requested)
            if len(body) <= INLINE_PARSE_LIMIT:
                rewritten = _rewrite(data, target, name)
            else:
                rewritten = await asyncio.to_thread(_rewrite, data, target, name)
        return await _route_json(request, target, rewritten or body, stream, requested)
    finally:
        budget.release(reserved)


async def _parse_off_loop(body: bytes | bytearray) -> dict:
    return await asyncio.to_thread(_parse_object, body)


async def _route_json(
    request: web.Request, target: ModelConfig | tuple[PeerConfig, str], body, stream: bool, requested=""
) -> web.StreamResponse:
    requested = requested if isinstance(requested, str) else ""
    request["swapd.client_stream"] = stream
    path_qs = request.raw_path
    if path_qs.startswith("/v/"):  # llama-swap's versionless aliases forward without the /v
        path_qs = path_qs[2:]
    elif path_qs.startswith("/audioapi/"):  # audio.cpp's task API: /audioapi/v1/tasks/run reaches it as /v1/tasks/run
        path_qs = path_qs[len("/audioapi") :]
    if isinstance(target, ModelConfig):
        loading = target.send_loading_state and stream and request.path in LOADING_PATHS
        return await forward_local(request, target, path_qs, body, loading=loading, requested=requested)
    return await forward_peer(request, target[0], path_qs, body, model_name=target[1], requested=requested)


async def handle_query_model(request: web.Request) -> web.StreamResponse:
    requested = request.query.get("model")
    name, target = resolve(request, requested)
    path_qs = request.raw_path
    if name != requested:  # a pin or a selector: the backend gets the name it resolved to, as llama-swap sends it
        path_qs = str(request.rel_url.update_query(model=name))
    if isinstance(target, ModelConfig):
        return await forward_local(request, target, path_qs, None)
    return await forward_peer(request, target[0], path_qs, None, model_name=target[1])


_BOUNDARY_RE = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_NAME_RE = re.compile(rb'\bname="([^"]*)"', re.IGNORECASE)


class FormFieldSniffer:
    """Find one simple form field in a multipart body as it arrives.

    ``feed`` is called with the growing prefix and returns the field value's
    ``(start, end)`` once its part is complete. Scanning resumes where it
    stopped, so a large file before the field costs one pass, and only part
    headers are parsed: file contents are never copied.
    """

    def __init__(self, boundary: bytes, field: bytes) -> None:
        self.delim = b"--" + boundary
        self.field = field
        self.pos = 0  # where to look for the next part's delimiter
        self.value_start: int | None = None
        self.scan = 0
        self.is_target = False

    def feed(self, buf: bytes | bytearray) -> tuple[int, int] | None:
        delim = self.delim
        while True:
            if self.value_start is None:
                pos = buf.find(delim, self.pos)
                if pos == -1:
                    self.pos = max(self.pos, len(buf) - len(delim))
                    return None
                header_end = buf.find(b"\r\n\r\n", pos)
                if header_end == -1:
                    self.pos = pos
                    return None
                headers = bytes(buf[pos + len(delim) : header_end])
                match = _NAME_RE.search(headers)
                self.is_target = bool(match and match.group(1) == self.field and b"filename=" not in headers.lower())
                self.value_start = self.scan = header_end + 4
            end = buf.find(b"\r\n" + delim, self.scan)
            if end == -1:
                self.scan = max(self.value_start, len(buf) - len(delim) - 2)
                return None
            if self.is_target:
                return self.value_start, end
            self.pos = end + 2
            self.value_start = None


async def handle_multipart_model(request: web.Request) -> web.StreamResponse:
    """Multipart uploads (audio, image edits): stream through, holding only the prefix up to ``model``."""
    ctype = request.headers.get("Content-Type", "")
    match = _BOUNDARY_RE.search(ctype)
    if not ctype.lower().startswith("multipart/form-data") or not match:
        raise ClientError(400, "expected a multipart/form-data body with a 'model' field", "invalid_body")
    boundary = match.group(1).encode()
    limits = request.app[RUNTIME].config.client_limits
    check_declared_length(request, limits.max_body_bytes)
    sniff_limit = min(MULTIPART_SNIFF_LIMIT, limits.max_body_bytes)
    buf = bytearray()
    sniffer = FormFieldSniffer(boundary, b"model")
    span = None
    while span is None:
        chunk = await next_chunk(request, limits.body_idle_timeout)
        if not chunk:
            break
        buf += chunk
        if len(buf) > sniff_limit:
            raise ClientError(
                413,
                f"the multipart 'model' field must come within the first {sniff_limit} bytes",
                "model_field_too_late",
            )
        span = sniffer.feed(buf)
    if span is None:
        raise ClientError(400, "the multipart form has no 'model' field", "model_not_found")
    requested = buf[span[0] : span[1]].decode("utf-8", "replace").strip()
    name, target = resolve(request, requested)
    new_name = None
    if isinstance(target, ModelConfig):
        new_name = target.use_model_name or (name if name != requested else None)
    elif target[1] != requested:
        new_name = target[1]
    delta = 0
    if new_name:
        encoded = new_name.encode()
        delta = len(encoded) - (span[1] - span[0])
        buf[span[0] : span[1]] = encoded
    content_length = request.content_length + delta if request.content_length is not None else None

    # the sniffed prefix goes out as is, then the rest as it arrives: never copied
    body = stream_body(request, limits.body_idle_timeout, limits.max_body_bytes + delta, prefix=buf)
    if isinstance(target, ModelConfig):
        return await forward_local(request, target, request.raw_path, body, content_length=content_length)
    return await forward_peer(
        request, target[0], request.raw_path, body, content_length=content_length, model_name=target[1]
    )


async def handle_upstream(request: web.Request) -> web.StreamResponse:
    """/upstream/<model>/<path>: talk to a backend's own endpoints, starting it if needed.

    The active profile's pins apply first, by the longest pinned prefix;
    selectors do not apply here (as in llama-swap).
    """
    config = request.app[RUNTIME].config
    raw_path = request.raw_path.split("?", 1)[0]
    segments = raw_path[len("/upstream/") :].split("/")
    pinned = profiles.pin_upstream(request.app[RUNTIME], segments)
    if pinned is not None:
        segments = pinned
    found = None
    for i in range(1, len(segments) + 1):
        name = unquote("/".join(segments[:i]))
        model = config.resolve(name)
        if model is not None:  # keep walking: the longest matching prefix wins
            found = (name, model, "/" + "/".join(segments[i:]))  # the rest stays percent-encoded
    if found is None:
        raise ClientError(404, "model not found", "model_not_found")
    name, model, rest = found
    # the query goes on exactly as the client sent it: decoding it would let %0d%0a, %00 or %23
    # become raw bytes in the backend's request line
    raw_query = request.raw_path.partition("?")[2]
    if rest == "/" and not raw_path.endswith("/"):
        # a pinned name keeps the client's own prefix, so the pin still applies to what follows
        target = (raw_path if pinned is not None else "/upstream/" + quote(name, safe="/")) + "/"
        if raw_query:
            target += "?" + raw_query
        cls = web.HTTPMovedPermanently if request.method in ("GET", "HEAD") else web.HTTPPermanentRedirect
        raise cls(location=URL(target, encoded=True))  # encoded: the query exactly as sent
    if any(part in ("..", ".") for part in unquote(rest).split("/")):
        raise ClientError(400, "path traversal is not allowed in /upstream paths", "invalid_path")
    if any(p.search(unquote(rest)) for p in config.upstream_ignore_paths):
        backend = request.app[RUNTIME].backends.get(model.id)
        if backend is None or backend.state is not State.READY:
            # a browser fetching a favicon must not load a model (llama-swap's ignorePaths)
            raise ClientError(
                409, f"model {model.id} is not loaded; path matches upstream.ignorePaths", "model_not_loaded"
            )
    path_qs = rest + ("?" + raw_query if raw_query else "")
    if websocket.is_websocket_upgrade(request):
        return await websocket.relay(request, model, path_qs)  # held (and in flight) until either side closes
    body = None
    if request.can_read_body:
        limits = config.client_limits
        check_declared_length(request, limits.max_body_bytes)
        body = stream_body(request, limits.body_idle_timeout, limits.max_body_bytes)
    return await forward_local(request, model, path_qs, body, content_length=request.content_length)
