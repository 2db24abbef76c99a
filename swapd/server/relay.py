"""The hot path: forward one request to a backend and stream the answer back.

Nothing here buffers a response: each chunk the backend sends is written to
the client as soon as it arrives. If the client goes away, aiohttp cancels the
handler and the ``finally`` closes the upstream connection at once, which is
how llama-server learns to stop generating.
"""

from __future__ import annotations

import json

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

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
) -> web.StreamResponse:
    """Send ``body`` to ``url`` and stream the backend's response to the client."""
    try:
        upstream = await session.request(
            request.method,
            url,
            data=body,
            headers=forward_headers(request),
            allow_redirects=False,
        )
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamError(502, f"model {model_id}: backend unreachable: {exc}") from exc

    clean = False
    request["swapd.status"] = upstream.status
    try:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        out = response.headers
        for name, value in upstream.headers.items():
            if name.lower() not in _RESPONSE_DROP:
                out.add(name, value)
        content_type = upstream.headers.get("Content-Type", "")
        if content_type.startswith("text/event-stream"):
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
            if content_type.startswith("text/event-stream"):
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
