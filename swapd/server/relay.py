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

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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


async def relay(
    request: web.Request,
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
    if content_length is not None:
        headers["Content-Length"] = str(content_length)
    timeout = None
    if timeouts is not None and timeouts.connect:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect)
    call = session.request(request.method, url, data=body, headers=headers, allow_redirects=False, timeout=timeout)
    try:
        if timeouts is not None and timeouts.response_header:
            async with asyncio.timeout(timeouts.response_header):
                upstream = await call
        else:
            upstream = await call
    except TimeoutError as exc:
        raise UpstreamError(504, f"model {model_id}: backend did not answer in time (timeouts)") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamError(502, f"model {model_id}: backend unreachable: {exc}") from exc
    if prepared is not None:
        request["swapd.status"] = prepared.status
        return await _relay_into(prepared, upstream, model_id)

    clean = False
    request["swapd.status"] = upstream.status
    try:
        content_type = upstream.headers.get("Content-Type", "")
        event_stream = content_type.startswith("text/event-stream")
        whole = not event_stream and "Content-Length" in upstream.headers
        cls = _CoalescedResponse if whole else web.StreamResponse
        response = cls(status=upstream.status, reason=upstream.reason)
        out = response.headers
        for name, value in upstream.headers.items():
            if name.lower() not in _RESPONSE_DROP:
                out.add(name, value)
        if event_stream:
            out["X-Accel-Buffering"] = "no"
            out.setdefault("Cache-Control", "no-cache")
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            # The backend died mid-response. The status line is gone already,
            # so tell a streaming client in-band, then cut the connection so
            # no client mistakes a truncated body for a complete one.
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
        await response.write_eof()
        clean = True
        return response
    finally:
        if clean:
            upstream.release()
        else:
            upstream.close()


async def _relay_into(response: web.StreamResponse, upstream: aiohttp.ClientResponse, model_id: str) -> web.StreamResponse:
    """Continue an already-started event stream with the backend's body."""
    try:
        if upstream.status != 200:
            detail = (await upstream.read())[:2000].decode("utf-8", "replace")
            event = {"error": {"message": f"model {model_id}: backend answered {upstream.status}: {detail}",
                               "type": "server_error", "code": "backend_error"}}
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            response["swapd.error"] = f"backend answered {upstream.status}"
        else:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        await response.write_eof()
        upstream.release()
        return response
    finally:
        upstream.close()
