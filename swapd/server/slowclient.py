"""Bounds on what a client may hold: the wait for a request's headers, idle connections, stalled bodies.

aiohttp has no deadline for receiving a request's headers: a client that
connects and sends nothing, or one byte every few seconds, holds a
connection and a file descriptor until aiohttp's keep-alive timer fires, an
hour by default. ``HeaderDeadline`` wraps aiohttp's protocol:

- the deadline (``clientLimits.headerTimeout``) starts when the connection
  opens, and again with the first byte that arrives after a request has been
  handled;
- it stops when swapd's first middleware sees the request, that is, once
  aiohttp has parsed the request's headers (``request_started``). Nothing
  sniffs bytes: a body, however slowly it comes, never meets this deadline.

Between requests, aiohttp's own keep-alive timer (``clientLimits.
keepaliveTimeout``, set on the AppRunner) closes an idle connection; it also
closes one that left an incomplete request pipelined behind a complete one.
Request bodies are guarded where they are read (an idle timeout per chunk),
since a large upload on a slow link is legitimate while a stalled one is not.

``Listener`` serves aiohttp's ``runner.server`` (the public protocol factory)
through ``loop.create_server`` with this wrapper: no aiohttp site internals.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from swapd.server.errors import ClientError

_IDLE, _ARMED, _IN_REQUEST = 0, 1, 2


class HeaderDeadline(asyncio.Protocol):
    """Delegates to aiohttp's RequestHandler, adding the header deadline."""

    __slots__ = ("_inner", "_timeout", "_transport", "_timer", "_state", "_deadline", "_loop")

    def __init__(self, inner: asyncio.Protocol, timeout: float) -> None:
        self._inner = inner
        self._timeout = timeout
        self._transport: asyncio.BaseTransport | None = None
        # At most one timer per connection, created once: arming a request's
        # deadline only moves ``_deadline``; when the timer fires it checks
        # whether that deadline is still pending, and waits on for a later
        # one. No timer is made and cancelled per request.
        self._timer: asyncio.TimerHandle | None = None
        self._state = _IDLE
        self._deadline = 0.0
        self._loop = asyncio.get_running_loop()

    @staticmethod
    def of(request: web.BaseRequest) -> HeaderDeadline | None:
        transport = request.transport
        if transport is None:
            return None
        protocol = transport.get_protocol()
        return protocol if isinstance(protocol, HeaderDeadline) else None

    def _arm(self) -> None:
        self._state = _ARMED
        if self._timeout > 0:
            self._deadline = self._loop.time() + self._timeout
            if self._timer is None:
                self._timer = self._loop.call_at(self._deadline, self._check)

    def request_started(self) -> None:
        """The request's headers are parsed: no deadline while it is handled."""
        self._state = _IN_REQUEST

    def request_finished(self) -> None:
        self._state = _IDLE

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._arm()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._state == _IDLE:
            self._arm()  # the first byte of the next request
        self._inner.data_received(data)

    def _check(self) -> None:
        self._timer = None
        if self._state != _ARMED:
            return  # handled in time; the next request's first byte arms it again
        if self._loop.time() < self._deadline:  # armed again since this timer was set
            self._timer = self._loop.call_at(self._deadline, self._check)
            return
        if self._transport is not None:
            self._transport.close()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class Listener:
    """One listening socket serving an aiohttp AppRunner, with the header deadline on every connection."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str | None,
        port: int,
        *,
        header_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 1024,
    ) -> None:
        self._runner = runner
        self._host = host
        self._port = port
        self._header_timeout = header_timeout
        self._ssl = ssl_context
        self._backlog = backlog
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        factory: Callable[[], asyncio.Protocol] | None = self._runner.server
        if factory is None:
            raise RuntimeError("call runner.setup() before starting a listener")
        timeout = self._header_timeout
        self._server = await asyncio.get_running_loop().create_server(
            lambda: HeaderDeadline(factory(), timeout),
            self._host,
            self._port,
            ssl=self._ssl,
            backlog=self._backlog,
            reuse_address=True,
        )

    @property
    def ports(self) -> set[int]:
        """The local ports bound (one per address family), once started."""
        if self._server is None:
            return set()
        return {sock.getsockname()[1] for sock in self._server.sockets}

    async def stop(self) -> None:
        """Stop accepting; open connections are left to ``runner.cleanup()``."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


async def next_chunk(request: web.Request, idle_timeout: float) -> bytes:
    """The next piece of a request body (b"" at its end); 408 if the client stalls."""
    try:
        async with asyncio.timeout(idle_timeout):
            return await request.content.readany()
    except TimeoutError:
        raise ClientError(408, f"request body stalled for {idle_timeout:g}s", "request_timeout", close=True) from None


def _too_large(limit: int) -> ClientError:
    return ClientError(413, f"request body too large (limit {limit} bytes)", "request_too_large", close=True)


async def read_body(request: web.Request, idle_timeout: float, limit: int) -> bytearray:
    """Read a whole request body, failing if the client stalls or sends too much."""
    check_declared_length(request, limit)
    body = bytearray()  # one buffer, no join: a 100 MB body is held once
    while chunk := await next_chunk(request, idle_timeout):
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return body


async def stream_body(
    request: web.Request, idle_timeout: float, limit: int, prefix: bytes | bytearray = b""
) -> AsyncIterator[bytes]:
    """Yield a request body as it arrives (after ``prefix``), with the same limits as ``read_body``.

    A stall or an oversized body raises ``ClientError`` (408 or 413) inside
    the upload to the backend: the upload is aborted, the backend connection
    dropped, and the client gets the error with its connection closed. It is
    the client's fault, never reported as the backend's.
    """
    size = len(prefix)
    if prefix:
        yield bytes(prefix)
    while chunk := await next_chunk(request, idle_timeout):
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        yield chunk


def check_declared_length(request: web.Request, limit: int) -> None:
    if request.content_length is not None and request.content_length > limit:
        raise ClientError(
            413,
            f"request body too large ({request.content_length} bytes; limit {limit})",
            "request_too_large",
            close=True,
        )
