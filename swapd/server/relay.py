"""The hot path: forward one request to a backend and stream the answer back.

Nothing here buffers a stream: each chunk the backend sends is written to
the client as soon as it arrives. The one exception is a whole answer of at
most ``WHOLE_BODY_LIMIT`` bytes with a declared length (a JSON completion),
which has usually arrived with its headers and goes out in one write. If the client goes away, aiohttp cancels the
handler and the ``finally`` closes the upstream connection at once, which is
how llama-server learns to stop generating.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from swapd.config import Timeouts
from swapd.server.client_sink import client_sink
from swapd.server.cors import RESPONSE_HEADERS as CORS_HEADERS
from swapd.server.upstream import (
    ClientGone,
    UpstreamBroken,
    UpstreamFault,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamResponse,
)
from swapd.telemetry.record import RequestRecord

# aiohttp's session used 30 s; a model's timeouts.connect overrides it
DEFAULT_CONNECT_TIMEOUT = 30.0

# RFC 9110 §7.6.1 connection-specific headers, plus the ones aiohttp sets itself.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        "Expect",  # aiohttp already answered 100-continue to the client
    )
)
# A backend's own CORS headers go too: swapd's policy (swapd.server.cors) is the only source, so a client
# never gets two Access-Control-Allow-Origin lines (llama-swap #85, #1133). Same set lookup, no extra cost.
_RESPONSE_DROP = frozenset(
    (*(h.lower() for h in ("Connection", "Keep-Alive", "Transfer-Encoding", "Trailer", "Upgrade")), *CORS_HEADERS)
)

# A whole answer (declared length, not an event stream) up to this size is read
# and sent as one web.Response: status line, headers and body in one write.
WHOLE_BODY_LIMIT = 64 * 1024


class UpstreamError(Exception):
    """The backend could not be reached or broke before answering."""

    def __init__(self, status: int, message: str, code: str = "backend_unreachable") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


CREDENTIAL_HEADERS = frozenset(("authorization", "x-api-key"))


def forward_headers(request: web.Request, drop: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """The client's headers as a backend should get them.

    Hop-by-hop headers go, and so does the credential that authenticated the
    client to swapd (the access middleware names it in
    ``request["swapd.credential"]``): swapd's own key never leaves swapd.
    ``drop`` names more headers to leave out (lower case).
    """
    headers: CIMultiDict[str] = CIMultiDict()
    connection_tokens = {t.strip().lower() for t in request.headers.get("Connection", "").split(",") if t.strip()}
    used_credential = request.get("swapd.credential", frozenset())
    for name, value in request.headers.items():
        lname = name.lower()
        if lname in _HOP_BY_HOP or lname in connection_tokens or lname in used_credential or lname in drop:
            continue
        headers.add(name, value)
    peer = request.remote
    if peer:
        prior = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    return headers


class _AiohttpUpstream:
    """An aiohttp response behind the same interface as upstream.UpstreamResponse (https backends and peers)."""

    __slots__ = ("_resp", "status", "reason", "headers", "received")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.reason = resp.reason or ""
        self.headers = resp.headers
        self.received = 0  # body bytes so far (the in-flight view reads it)

    async def read_chunk(self) -> bytes:
        try:
            chunk = await self._resp.content.readany()
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise UpstreamBroken(str(exc)) from exc
        self.received += len(chunk)
        return chunk

    read = UpstreamResponse.read

    def release(self) -> None:
        self._resp.release()

    def close(self) -> None:
        self._resp.close()


async def _open(
    rt_pool: UpstreamPool,
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body,
    headers: CIMultiDict,
    content_length: int | None,
    timeouts: Timeouts | None,
):
    connect_timeout = timeouts.connect if timeouts is not None else DEFAULT_CONNECT_TIMEOUT  # None: no limit
    if url.startswith("http://"):
        return await rt_pool.request(
            method,
            url,
            headers,
            body,
            content_length=content_length,
            connect_timeout=connect_timeout,
            keepalive=timeouts.keepalive if timeouts is not None else None,
            idle_window=timeouts.idle_conn if timeouts is not None else None,
        )
    if content_length is not None:
        headers["Content-Length"] = str(content_length)
    # aiohttp times the TCP connect and the TLS handshake as one step (sock_connect): both limits together bound it
    tls = timeouts.tls_handshake if timeouts is not None and timeouts.tls_handshake else 0.0
    sock_connect = connect_timeout + tls if connect_timeout is not None else None
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=sock_connect)
    # encoded=True: the path and query go out exactly as the client sent them
    resp = await session.request(
        method, URL(url, encoded=True), data=body, headers=headers, allow_redirects=False, timeout=timeout
    )
    return _AiohttpUpstream(resp)


async def open_upstream(
    pool: UpstreamPool,
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body,
    headers: CIMultiDict,
    model_id: str,
    *,
    timeouts: Timeouts | None = None,
    content_length: int | None = None,
):
    """Send the request and wait for the backend's response head; failures become ``UpstreamError`` (502, 504).

    Returns an ``UpstreamResponse`` (``http://``) or the same interface over
    aiohttp (``https://``); the caller reads its body and releases or closes it.
    """
    header_timeout = timeouts.response_header if timeouts is not None and timeouts.response_header else None
    try:
        if header_timeout is None:
            return await _open(pool, session, method, url, body, headers, content_length, timeouts)
        async with asyncio.timeout(header_timeout):
            return await _open(pool, session, method, url, body, headers, content_length, timeouts)
    except TimeoutError as exc:
        raise UpstreamError(504, f"model {model_id}: backend did not answer in time (timeouts)") from exc
    except UpstreamProtocolError as exc:
        raise UpstreamError(
            502, f"model {model_id}: backend sent an invalid response: {exc}", "backend_bad_response"
        ) from exc
    except (UpstreamFault, aiohttp.ClientError, OSError) as exc:
        raise UpstreamError(502, f"model {model_id}: backend unreachable: {exc}") from exc


async def relay(
    request: web.Request,
    pool: UpstreamPool,
    session: aiohttp.ClientSession,
    url: str,
    body,
    model_id: str,
    *,
    prepared: web.StreamResponse | None = None,
    timeouts: Timeouts | None = None,
    content_length: int | None = None,
    extra_headers: dict[str, str] | None = None,
    drop_headers: frozenset[str] = frozenset(),
    record: RequestRecord | None = None,
    name_refusals: bool = False,
) -> web.StreamResponse:
    """Send ``body`` to ``url`` and stream the backend's response to the client.

    ``prepared`` is a response whose headers already went out (the loading
    stream); then only the backend's body follows on it. ``extra_headers``
    are set on the request (a backend's or peer's own key); ``drop_headers``
    are left out of it. ``record`` (telemetry) gets the status, the time of
    the first body byte and the tokens read from the ends of the body once
    it has gone out (``swapd.telemetry.usage``); nothing is held back for it.
    """
    headers = forward_headers(request, drop_headers)
    if extra_headers:
        headers.update(extra_headers)
    upstream = await open_upstream(
        pool, session, request.method, url, body, headers, model_id, timeouts=timeouts, content_length=content_length
    )
    request["swapd.upstream"] = upstream  # the in-flight view reads its status, headers and byte count
    if name_refusals and upstream.status in (401, 403):
        await _refused_credentials(upstream, model_id, record)
    if prepared is not None:
        request["swapd.status"] = prepared.status
        if record is not None:
            record.status = prepared.status
            record.content_type = "text/event-stream"
            record.stream = True
        return await _relay_into(request, prepared, upstream, model_id, record)

    clean = False
    request["swapd.status"] = upstream.status
    head = tail = b""
    first = 0.0
    event_stream = False
    try:
        upstream_headers = upstream.headers
        content_type = upstream_headers.get("Content-Type", "")
        event_stream = content_type.startswith("text/event-stream")
        length = upstream_headers.get("Content-Length")
        if record is not None:
            record.status = upstream.status
            record.content_type = content_type
            record.stream = event_stream
            if record.capture is not None:
                record.capture.response_headers = upstream_headers
        if (
            not event_stream
            and length is not None
            and int(length) <= WHOLE_BODY_LIMIT
            and request.method != "HEAD"
            and upstream.status not in (204, 304)
        ):
            # a whole JSON answer: usually already here with the headers; one write to the client
            try:
                body_bytes = await upstream.read()
            except UpstreamFault as exc:
                raise UpstreamError(
                    502, f"model {model_id}: backend broke off its response: {exc}", "backend_bad_response"
                ) from exc
            out: CIMultiDict[str] = CIMultiDict()
            _copy_headers(upstream_headers, out, skip_length=True)
            clean = True
            if record is not None:
                tail = body_bytes
                if record.capture is not None:
                    record.capture.response_body.append(body_bytes)
            return web.Response(status=upstream.status, reason=upstream.reason or None, body=body_bytes, headers=out)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason or None)
        _copy_headers(upstream_headers, response.headers)
        if event_stream:
            response.headers["X-Accel-Buffering"] = "no"
            response.headers.setdefault("Cache-Control", "no-cache")
        await response.prepare(request)
        request["swapd.response"] = response  # headers sent: a cancel (swapd.server.inflight) ends it in-band
        try:
            sink = client_sink(request, response) if isinstance(upstream, UpstreamResponse) and length is None else None
            if sink is not None:
                if record is not None and record.capture is not None:
                    upstream.capture_into(record.capture.response_body)
                try:
                    await upstream.splice(sink[0], request.writer.drain, sink[1])
                finally:
                    if record is not None:
                        first, head, tail = upstream.observed()
            elif record is None:
                read_chunk = upstream.read_chunk
                write = response.write
                while chunk := await read_chunk():
                    await write(chunk)
            else:
                first, head, tail = await _relay_loop(upstream, response, record)
        except ClientGone:
            response["swapd.error"] = "client_disconnected"
            return response
        except UpstreamFault as exc:
            return await _broken_mid_response(request, response, model_id, exc, event_stream)
        await response.write_eof()
        clean = True
        return response
    finally:
        # After an event stream the connection is not reused: llama-server (cpp-httplib) may close it
        # just after the stream ends, and a POST already written to it could not be sent again.
        if clean and not event_stream:
            upstream.release()
        else:
            upstream.close()
        if record is not None:
            keep_body_ends(record, first, head, tail)


async def _relay_loop(upstream, response: web.StreamResponse, record: RequestRecord) -> tuple[float, bytes, bytes]:
    """The write loop, keeping what telemetry reads: first byte time, first piece, last four pieces."""
    read_chunk = upstream.read_chunk
    write = response.write
    pieces = record.capture.response_body if record.capture is not None else None
    first = 0.0
    head = p3 = p2 = prev = last = b""
    try:
        while chunk := await read_chunk():
            if not first:
                first = time.monotonic()
                head = chunk
            p3, p2, prev, last = p2, prev, last, chunk
            if pieces is not None:
                pieces.append(chunk)
            await write(chunk)
    finally:
        record.first_byte = first
    return first, head, b"".join((p3, p2, prev, last))


async def _refused_credentials(upstream, model_id: str, record: RequestRecord | None) -> None:
    """A remote endpoint refused the credentials: an OpenAI-shaped error with its status, naming the model."""
    status = upstream.status
    try:
        body = await upstream.read()
    except UpstreamFault:
        body = b""
    finally:
        upstream.close()
    detail = ""
    try:
        doc = json.loads(body)
        err = doc.get("error") if isinstance(doc, dict) else None
        detail = str(err.get("message") or "") if isinstance(err, dict) else str(err or "")
    except (ValueError, UnicodeDecodeError):
        detail = body[:200].decode("utf-8", "replace").strip()
    if record is not None:
        record.status = status
    message = f"model {model_id}: the remote endpoint refused swapd's credentials ({status})"
    raise UpstreamError(status, message + (f": {detail}" if detail else ""), "remote_auth_failed")


def keep_body_ends(record: RequestRecord, first: float, head: bytes, tail: bytes) -> None:
    """Keep what telemetry reads once the request is finished: the first byte's time and the body's ends."""
    if first and not record.first_byte:
        record.first_byte = first
    if record.capture is not None:
        record.capture.response_size = sum(map(len, record.capture.response_body))
    if tail and record.status < 400:
        record.body_ends = (head, tail)  # read by telemetry.usage.account, after the answer went out


def _copy_headers(source: CIMultiDict[str], out: CIMultiDict[str], skip_length: bool = False) -> None:
    for name, value in source.items():
        lname = name.lower()
        if lname in _RESPONSE_DROP or (skip_length and lname == "content-length"):
            continue
        out.add(name, value)


async def _broken_mid_response(
    request: web.Request, response: web.StreamResponse, model_id: str, exc: Exception, event_stream: bool
) -> web.StreamResponse:
    """The backend died mid-response, after the status line went out.

    A streaming client is told in-band; then the connection is cut so no
    client mistakes a truncated body for a complete one.
    """
    if event_stream:
        event = {
            "error": {
                "message": f"model {model_id}: backend failed mid-stream: {exc}",
                "type": "server_error",
                "code": "backend_failed",
            }
        }
        try:
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        except (ConnectionError, RuntimeError):
            pass
    if request.transport is not None:
        request.transport.close()
    response["swapd.error"] = f"backend failed mid-response: {exc}"
    return response


async def _relay_into(
    request: web.Request, response: web.StreamResponse, upstream, model_id: str, record: RequestRecord | None = None
) -> web.StreamResponse:
    """Continue an already-started event stream with the backend's body."""
    head = tail = b""
    first = 0.0
    try:
        if upstream.status != 200:
            try:
                detail = (await upstream.read(2000))[:2000].decode("utf-8", "replace")
            except UpstreamFault as exc:
                detail = f"(body unreadable: {exc})"
            event = {
                "error": {
                    "message": f"model {model_id}: backend answered {upstream.status}: {detail}",
                    "type": "server_error",
                    "code": "backend_error",
                }
            }
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            response["swapd.error"] = f"backend answered {upstream.status}"
        else:
            try:
                if record is None:
                    while chunk := await upstream.read_chunk():
                        await response.write(chunk)
                else:
                    first, head, tail = await _relay_loop(upstream, response, record)
            except UpstreamFault as exc:
                return await _broken_mid_response(request, response, model_id, exc, True)
        await response.write_eof()
        upstream.release()
        return response
    finally:
        upstream.close()
        if record is not None:
            if upstream.status != 200:
                record.error = f"backend answered {upstream.status}"
            keep_body_ends(record, first, head, tail)
