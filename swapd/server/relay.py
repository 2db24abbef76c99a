"""The hot path: forward one request to a backend and stream the answer back.

Nothing here buffers a response: each chunk the backend sends is written to
the client as soon as it arrives. If the client goes away, aiohttp cancels the
handler and the ``finally`` closes the upstream connection at once, which is
how llama-server learns to stop generating.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from swapd.config import Timeouts
from swapd.server.upstream import (
    SINK_FULL,
    SINK_GONE,
    ClientGone,
    UpstreamBroken,
    UpstreamFault,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamResponse,
)

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
_RESPONSE_DROP = frozenset(h.lower() for h in ("Connection", "Keep-Alive", "Transfer-Encoding", "Trailer", "Upgrade"))


class _CoalescedResponse(web.StreamResponse):
    """A relayed response whose length the backend declared (a whole JSON answer).

    Its status line and headers leave in the same write as the first body
    bytes (as ``web.Response`` does) instead of in a write of their own: one
    send and one client wake-up fewer per request. Streams (event streams,
    chunked bodies) keep ``web.StreamResponse``, whose headers go out at
    once, so a client sees the status before the first token.
    """

    _send_headers_immediately = False


class UpstreamError(Exception):
    """The backend could not be reached or broke before answering."""

    def __init__(self, status: int, message: str, code: str = "backend_unreachable") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def forward_headers(request: web.Request) -> CIMultiDict:
    headers = CIMultiDict()
    connection_tokens = {
        t.strip().lower() for t in request.headers.get("Connection", "").split(",") if t.strip()
    }
    for name, value in request.headers.items():
        lname = name.lower()
        if lname in _HOP_BY_HOP or lname in connection_tokens:
            continue
        headers.add(name, value)
    peer = request.remote
    if peer:
        prior = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    return headers


class _AiohttpUpstream:
    """An aiohttp response behind the same interface as upstream.UpstreamResponse (https backends and peers)."""

    __slots__ = ("_resp", "status", "reason", "headers")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.reason = resp.reason or ""
        self.headers = resp.headers

    async def read_chunk(self) -> bytes:
        try:
            return await self._resp.content.readany()
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise UpstreamBroken(str(exc)) from exc

    read = UpstreamResponse.read

    def release(self) -> None:
        self._resp.release()

    def close(self) -> None:
        self._resp.close()


def _client_sink(request: web.Request):
    """A sink for UpstreamResponse.splice: body bytes go to the client's socket as they arrive.

    The response's headers are already out. aiohttp chose the framing in
    ``prepare``: chunked for HTTP/1.1 (the splice keeps it, and ``write_eof``
    sends the last chunk), raw until close for HTTP/1.0.
    """
    transport = request.transport
    high = transport.get_write_buffer_limits()[1]
    write = transport.write
    buffered = transport.get_write_buffer_size
    is_closing = transport.is_closing

    def sink(data: bytes) -> int:
        if is_closing():
            return SINK_GONE
        write(data)
        return SINK_FULL if buffered() > high else 0

    return sink


async def _open(rt_pool: UpstreamPool, session: aiohttp.ClientSession, request: web.Request, url: str, body,
                headers: CIMultiDict, content_length: int | None, connect_timeout: float | None):
    if url.startswith("http://"):
        return await rt_pool.request(request.method, url, headers, body, content_length=content_length,
                                     connect_timeout=connect_timeout)
    if content_length is not None:
        headers["Content-Length"] = str(content_length)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout) if connect_timeout else None
    resp = await session.request(request.method, url, data=body, headers=headers, allow_redirects=False,
                                 timeout=timeout)
    return _AiohttpUpstream(resp)


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
) -> web.StreamResponse:
    """Send ``body`` to ``url`` and stream the backend's response to the client.

    ``prepared`` is a response whose headers already went out (the loading
    stream); then only the backend's body follows on it.
    """
    headers = forward_headers(request)
    if extra_headers:
        headers.update(extra_headers)
    connect_timeout = timeouts.connect if timeouts is not None and timeouts.connect else DEFAULT_CONNECT_TIMEOUT
    header_timeout = timeouts.response_header if timeouts is not None and timeouts.response_header else None
    try:
        if header_timeout is None:
            upstream = await _open(pool, session, request, url, body, headers, content_length, connect_timeout)
        else:
            async with asyncio.timeout(header_timeout):
                upstream = await _open(pool, session, request, url, body, headers, content_length, connect_timeout)
    except TimeoutError as exc:
        raise UpstreamError(504, f"model {model_id}: backend did not answer in time (timeouts)") from exc
    except UpstreamProtocolError as exc:
        raise UpstreamError(502, f"model {model_id}: backend sent an invalid response: {exc}",
                            "backend_bad_response") from exc
    except (UpstreamFault, aiohttp.ClientError, OSError) as exc:
        raise UpstreamError(502, f"model {model_id}: backend unreachable: {exc}") from exc
    if prepared is not None:
        request["swapd.status"] = prepared.status
        return await _relay_into(request, prepared, upstream, model_id)

    clean = False
    request["swapd.status"] = upstream.status
    try:
        upstream_headers = upstream.headers
        content_type = upstream_headers.get("Content-Type", "")
        event_stream = content_type.startswith("text/event-stream")
        whole = not event_stream and "Content-Length" in upstream_headers
        cls = _CoalescedResponse if whole else web.StreamResponse
        response = cls(status=upstream.status, reason=upstream.reason or None)
        out = response.headers
        for name, value in upstream_headers.items():
            if name.lower() not in _RESPONSE_DROP:
                out.add(name, value)
        if event_stream:
            out["X-Accel-Buffering"] = "no"
            out.setdefault("Cache-Control", "no-cache")
        await response.prepare(request)
        try:
            if not whole and isinstance(upstream, UpstreamResponse) and request.transport is not None:
                chunked = response.headers.get("Transfer-Encoding", "").lower() == "chunked"
                await upstream.splice(_client_sink(request), request.writer.drain, chunked)
            else:
                read_chunk = upstream.read_chunk
                write = response.write
                while chunk := await read_chunk():
                    await write(chunk)
        except ClientGone:
            response["swapd.error"] = "client_disconnected"
            return response
        except UpstreamFault as exc:
            return await _broken_mid_response(request, response, model_id, exc, event_stream)
        await response.write_eof()
        clean = True
        return response
    finally:
        if clean:
            upstream.release()
        else:
            upstream.close()


async def _broken_mid_response(request: web.Request, response: web.StreamResponse, model_id: str,
                               exc: Exception, event_stream: bool) -> web.StreamResponse:
    """The backend died mid-response, after the status line went out.

    A streaming client is told in-band; then the connection is cut so no
    client mistakes a truncated body for a complete one.
    """
    if event_stream:
        event = {"error": {"message": f"model {model_id}: backend failed mid-stream: {exc}",
                           "type": "server_error", "code": "backend_failed"}}
        try:
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        except (ConnectionError, RuntimeError):
            pass
    if request.transport is not None:
        request.transport.close()
    response["swapd.error"] = f"backend failed mid-response: {exc}"
    return response


async def _relay_into(request: web.Request, response: web.StreamResponse, upstream, model_id: str) -> web.StreamResponse:
    """Continue an already-started event stream with the backend's body."""
    try:
        if upstream.status != 200:
            try:
                detail = (await upstream.read(2000))[:2000].decode("utf-8", "replace")
            except UpstreamFault as exc:
                detail = f"(body unreadable: {exc})"
            event = {"error": {"message": f"model {model_id}: backend answered {upstream.status}: {detail}",
                               "type": "server_error", "code": "backend_error"}}
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            response["swapd.error"] = f"backend answered {upstream.status}"
        else:
            try:
                while chunk := await upstream.read_chunk():
                    await response.write(chunk)
            except UpstreamFault as exc:
                return await _broken_mid_response(request, response, model_id, exc, True)
        await response.write_eof()
        upstream.release()
        return response
    finally:
        upstream.close()
