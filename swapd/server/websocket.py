"""Websockets through ``/upstream/<model>/...``: the handshake goes to the backend, then the bytes are spliced.

Why a splice and not two websocket endpoints (aiohttp's ``WebSocketResponse``
to the client and ``ws_connect`` to the backend, relaying messages): a relay
of messages re-frames them. It joins fragmented messages, renegotiates
``permessage-deflate`` on each side (and cannot offer any other extension),
picks a subprotocol from its own list, and answers pings itself. A splice
does none of that: the client's handshake (``Sec-WebSocket-Key``,
``-Version``, ``-Protocol``, ``-Extensions``) reaches the backend as sent,
the backend's 101 (its ``Sec-WebSocket-Accept``, the subprotocol and
extensions it chose) reaches the client, and then every byte of every frame
goes through untouched, both ways, until either side closes. Close frames
and their codes, pings and pongs are frames like any other. This is what
llama-swap does (Go's ``httputil.ReverseProxy`` hijacks both connections
after a 101 and copies bytes).

The path of one websocket:

1. ``routing.handle_upstream`` sees ``Connection: upgrade`` and ``Upgrade:
   websocket`` on a GET and calls ``relay``.
2. A lease, as for any request (``routing.lease_model``): a cold model is
   started, ``concurrencyLimit`` counts the socket, and the lease is held
   until the socket closes, so the model is in flight (``/running``) and no
   TTL stops it meanwhile. With ``compat.ignoreWebsockets`` (llama-swap's,
   forced on for ``comfyui_auto``) there is no lease: a model that is not
   ready answers 409 and is not started; one that is gets the socket, which
   counts for nothing and dies if the model is stopped.
3. A new connection to the backend (never pooled): swapd's usual request
   headers (``relay.forward_headers``: no hop-by-hop headers, no swapd key,
   ``X-Forwarded-For``; the model's ``headers``/``apiKey``) plus
   ``Connection: Upgrade`` and the client's ``Upgrade``. The answer's head is
   read with llhttp (``ResponseParser(upgrade=True)``), bounded by
   ``timeouts.connect`` and ``timeouts.responseHeader`` like an HTTP request.
4. Not a 101: a refusal. The backend's status, headers and body go to the
   client as any proxied answer (streamed, flow-controlled), and the client's
   connection stays usable.
5. A 101: swapd sends it to the client with the backend's headers (CORS
   headers are swapd's, as on every answer), then the bytes the backend sent
   after its head, then splices: bytes from the backend are written to the
   client's transport from the protocol callback, bytes from the client (fed
   by aiohttp's protocol to a payload parser swapd installs) to the backend's.
   Each direction pauses reading its source while the other side's transport
   holds more than its high-water mark, so nothing buffers without bound.
6. The end: the backend closing its connection ends the handler, and aiohttp
   closes the client's after writing what is queued; the client closing (or
   vanishing) closes the backend's. Shutdown closes every open splice. No
   task is made per socket: the handler's own task waits, and the two
   sockets are the only descriptors.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import Any, cast
from urllib.parse import urlsplit

from aiohttp import web
from multidict import CIMultiDict

from swapd.backend import State
from swapd.config import ModelConfig, Timeouts
from swapd.logging import get_logger
from swapd.server.cors import RESPONSE_HEADERS as CORS_HEADERS
from swapd.server.errors import ClientError
from swapd.server.keys import RUNTIME
from swapd.server.relay import CREDENTIAL_HEADERS, DEFAULT_CONNECT_TIMEOUT, UpstreamError, forward_headers
from swapd.server.upstream_parse import MAX_HEAD_BYTES, ResponseParser, UpstreamFault

log = get_logger("swapd.server")

HIGH_WATER = 256 * 1024  # bytes held for a side that cannot take them yet before reading pauses
CLOSE_GRACE = 5.0  # seconds a closing backend connection may take to accept what is queued for it

# dropped from a refusal passed through (they describe the backend's connection, not the answer)
_ANSWER_DROP = frozenset(("connection", "keep-alive", "transfer-encoding", "trailer", "upgrade", *CORS_HEADERS))
# dropped from a 101: its Connection and Upgrade headers are the point of it
_SWITCH_DROP = frozenset(("keep-alive", "transfer-encoding", "trailer", "content-length", *CORS_HEADERS))


def _has_token(values: list[str], token: str) -> bool:
    for value in values:
        for part in value.split(","):
            if part.strip().lower() == token:
                return True
    return False


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    """``Connection: upgrade`` and ``Upgrade: websocket`` (tokens, any case, in lists or repeated lines)."""
    headers = request.headers
    return _has_token(headers.getall("Upgrade", []), "websocket") and _has_token(
        headers.getall("Connection", []), "upgrade"
    )


class _ClientFeed:
    """What aiohttp's protocol feeds a client's bytes to once it is spliced (its ``set_parser`` hook)."""

    __slots__ = ("_link",)

    def __init__(self, link: _BackendLink) -> None:
        self._link = link

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._link.to_backend(data)
        return False, b""

    def feed_eof(self) -> None:
        self._link.client_closed()


class _BackendLink(asyncio.Protocol):
    """The connection to the backend: its answer's head, then (after a 101) its half of the splice."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser(self, False, upgrade=True)
        self.head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.pieces: collections.deque[bytes] = collections.deque()  # a refusal's body, or bytes after a 101
        self.buffered = 0
        self.answer_done = False  # a refusal's body is complete
        self.closed = False  # the backend connection is gone
        self.closed_by_client = False
        self.error: Exception | None = None
        self.reading_paused = False
        self.held_for_client = False  # reading paused until the client's transport drains
        self._client_transport: asyncio.Transport | None = None
        self._client_protocol: Any = None
        self._waiter: asyncio.Future[None] | None = None
        self.response: web.StreamResponse | None = None  # the client's 101, once sent

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        client = self._client_transport
        if client is not None:  # spliced: straight to the client
            if client.is_closing():
                return
            client.write(data)
            if self._client_protocol.writing_paused and not self.held_for_client:
                self.held_for_client = True
                self._pause()
                self._wake()
            return
        if self.parser.switched:  # the 101 is read; the client's 101 is not written yet
            self._hold(data)
            return
        try:
            self.parser.feed(data)
        except UpstreamFault as exc:
            self._fail(exc)
            return
        if self.parser.switched and self.parser.upgrade_tail:
            self._hold(self.parser.upgrade_tail)
            self.parser.upgrade_tail = b""

    def eof_received(self) -> bool | None:
        return None  # close: a websocket ends with its connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.head.done():
            self._fail(UpstreamFault(f"backend closed the connection before answering{_because(exc)}"))
        elif not self.parser.switched and not self.answer_done:
            if self.parser.eof():
                self.answer_done = True
            else:
                self.error = UpstreamFault(f"backend broke off its answer{_because(exc)}")
        self._wake()

    def pause_writing(self) -> None:  # the backend is slow to read what the client sends
        protocol = self._client_protocol
        if protocol is not None:
            protocol.pause_reading()

    def resume_writing(self) -> None:
        protocol = self._client_protocol
        if protocol is not None and not self.closed:
            protocol.resume_reading(False)

    # -- ResponseParser's handler ------------------------------------------------------

    def head_received(self, status: int, reason: str, headers: CIMultiDict[str], keep_alive: bool) -> None:
        self.status, self.reason, self.headers = status, reason, headers
        if not self.head.done():
            self.head.set_result(None)

    def body_received(self, data: bytes) -> None:
        self._hold(data)

    def message_done(self) -> None:
        self.answer_done = True
        self._wake()

    def bytes_after_response(self) -> None:
        pass  # the connection is closed after the answer anyway

    # -- the handler's side ----------------------------------------------------------

    def _hold(self, data: bytes) -> None:
        self.pieces.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER:
            self._pause()
        self._wake()

    def take(self) -> bytes:
        data = b"".join(self.pieces)
        self.pieces.clear()
        self.buffered = 0
        if self.reading_paused and not self.held_for_client:
            self._resume()
        return data

    def _pause(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def _fail(self, exc: Exception) -> None:
        self.error = exc
        if not self.head.done():
            self.head.set_exception(exc)
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until the link has news: bytes, the end of an answer, a pause for the client, or a close."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def splice(self, client: asyncio.Transport, protocol: Any) -> None:
        """Join the client's connection: what the backend sent since its 101 first, then everything."""
        held = self.take()
        if held:
            client.write(held)
        self._client_transport = client
        self._client_protocol = protocol
        protocol.set_parser(_ClientFeed(self))  # the client's bytes (those aiohttp held too) reach to_backend
        if protocol.writing_paused and not self.held_for_client:
            self.held_for_client = True
            self._pause()
            self._wake()

    def client_drained(self) -> None:
        if self.held_for_client:
            self.held_for_client = False
            self._resume()

    def to_backend(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)  # pause_writing stops the client's side past the high-water mark

    def client_closed(self) -> None:
        self.closed_by_client = True
        self.close()
        self._wake()

    def close(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()  # what is queued for the backend (a client's Close frame) still goes
            if transport.get_write_buffer_size():  # ... unless the backend never reads it: no fd held forever
                asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.abort)


# the open splices, closed at shutdown
OPEN: web.AppKey[set[_BackendLink]] = web.AppKey("swapd.websockets", set)


def _because(exc: Exception | None) -> str:
    return f": {exc}" if exc is not None else ""


def _target(url: str) -> tuple[str, int, str, str, ssl.SSLContext | None]:
    """(host, port, Host header, request target, TLS context) for a backend URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamFault(f"cannot open a websocket to {url!r}")
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return (
        parts.hostname,
        port,
        parts.netloc.rpartition("@")[2],
        target,
        ssl.create_default_context() if secure else None,
    )


async def _open(url: str, headers: CIMultiDict[str], model_id: str, timeouts: Timeouts) -> _BackendLink:
    """Connect, send the handshake, and wait for the answer's head (502 and 504 as for HTTP requests)."""
    connect_timeout = timeouts.connect or DEFAULT_CONNECT_TIMEOUT
    loop = asyncio.get_running_loop()
    link: _BackendLink | None = None
    try:
        host, port, host_header, target, tls = _target(url)
        lines = [f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\n"]
        for name, value in headers.items():
            if any(c in value for c in "\r\n\0") or any(c in name for c in "\r\n:"):
                raise UpstreamFault(f"header {name!r} has characters that cannot be sent")
            lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("utf-8", "surrogateescape")
        if len(head) > MAX_HEAD_BYTES * 4:
            raise UpstreamFault("the handshake's headers are too large")
        async with asyncio.timeout(connect_timeout):
            _, link = await loop.create_connection(
                _BackendLink, host, port, ssl=tls, server_hostname=host if tls is not None else None
            )
        assert link.transport is not None
        link.transport.write(head)
        if timeouts.response_header:
            async with asyncio.timeout(timeouts.response_header):
                await link.head
        else:
            await link.head
        return link
    except TimeoutError as exc:
        if link is not None:
            link.close()
        raise UpstreamError(504, f"model {model_id}: backend did not answer the websocket handshake in time") from exc
    except (UpstreamFault, OSError, ssl.SSLError) as exc:
        if link is not None:
            link.close()
        raise UpstreamError(502, f"model {model_id}: websocket handshake failed: {exc}", "backend_unreachable") from exc
    except BaseException:
        if link is not None:
            link.close()
        raise


async def relay(request: web.Request, model: ModelConfig, path_qs: str) -> web.StreamResponse:
    """Open the backend's websocket for ``path_qs`` and splice it to the client's until either closes."""
    from swapd.server.routing import lease_model, model_headers, remote_url  # routing imports this module

    if request.method != "GET" or request.can_read_body or request.version < (1, 1):
        raise ClientError(400, "a websocket handshake is an HTTP/1.1 GET without a body", "invalid_request")
    rt = request.app[RUNTIME]
    t0 = time.monotonic()
    lease = None
    if model.remote:
        target, url = model, remote_url(model.proxy, path_qs)
    elif model.ignore_websockets:
        backend = rt.backends.get(model.id)
        if backend is None or backend.state is not State.READY:
            raise ClientError(
                409, f"model {model.id} is not loaded; ignored websocket requests cannot start it", "model_not_loaded"
            )
        target = backend.model
        url = target.proxy.rstrip("/") + path_qs
    else:
        lease = await lease_model(rt, model.id, None, t0)  # 404/429/503 and start failures as for any request
        target = lease.backend.model
        url = target.proxy.rstrip("/") + path_qs
    status, outcome = 499, "client_disconnected"
    link: _BackendLink | None = None
    try:
        headers = forward_headers(request, CREDENTIAL_HEADERS if target.api_key else frozenset())
        headers.update(model_headers(target) or {})
        headers["Connection"] = "Upgrade"
        headers["Upgrade"] = request.headers.get("Upgrade", "websocket")
        try:
            link = await _open(url, headers, model.id, target.timeouts)
        except UpstreamError as exc:
            status, outcome = exc.status, str(exc)
            raise
        status = link.status
        if link.status != 101:
            outcome = "refused"
            return await _pass_answer(request, link)
        open_links = request.app[OPEN]
        open_links.add(link)
        try:
            outcome = await _splice(request, link)
        finally:
            open_links.discard(link)
        assert link.response is not None
        return link.response
    finally:
        if link is not None:
            link.close()
        if lease is not None:
            lease.release()
        request["swapd.logged"] = True
        log.info(
            "request",
            model=model.id,
            method=request.method,
            path=request.path,
            status=status,
            outcome=outcome,
            websocket=True,
            total_s=round(time.monotonic() - t0, 4),
        )


async def _splice(request: web.Request, link: _BackendLink) -> str:
    """Send the 101, then splice until one side closes; the outcome names which."""
    response = web.StreamResponse(status=101, reason=link.reason or "Switching Protocols")
    for name, value in link.headers.items():
        if name.lower() not in _SWITCH_DROP:
            response.headers.add(name, value)
    response.force_close()  # after the socket, never another request on the client's connection
    link.response = response
    await response.prepare(request)  # CORS added here, as on every answer; the 101 is written
    transport = request.transport
    if transport is None or transport.is_closing():
        return "client_disconnected"
    link.splice(transport, request.protocol)
    writer = request.writer
    while not link.closed:
        if link.held_for_client:
            await writer.drain()
            link.client_drained()
            continue
        await link.wait()
    if link.closed_by_client:
        return "closed by the client"
    return "closed by the backend"


async def _pass_answer(request: web.Request, link: _BackendLink) -> web.StreamResponse:
    """A backend that refused the upgrade: its answer goes to the client as it is."""
    response = web.StreamResponse(status=link.status, reason=link.reason or None)
    for name, value in link.headers.items():
        if name.lower() not in _ANSWER_DROP:
            response.headers.add(name, value)
    await response.prepare(request)
    while True:
        if link.pieces:
            data = link.take()
            await response.write(data)
            continue
        if link.answer_done:
            break
        if link.error is not None or link.closed:
            if request.transport is not None:
                request.transport.close()  # a truncated answer must not look complete
            response["swapd.error"] = f"backend broke off its answer: {link.error}"
            return response
        await link.wait()
    await response.write_eof()
    return response


def install(app: web.Application) -> None:
    """Track open websockets so that shutdown closes them instead of waiting for them."""
    links: set[_BackendLink] = set()
    app[OPEN] = links

    async def close_all(app: web.Application) -> None:
        open_links: set[_BackendLink] = app[OPEN]
        for link in list(open_links):
            link.close()

    app.on_shutdown.append(close_all)
