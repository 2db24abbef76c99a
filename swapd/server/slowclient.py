"""Protection against clients that trickle a request (slowloris).

aiohttp has no deadline for receiving a request's headers: a client that
sends one byte every few seconds holds a connection (and a file descriptor)
forever. ``HeaderDeadline`` wraps aiohttp's protocol: from the first byte of a
request until the blank line that ends its headers, the client has
``header_timeout`` seconds, or the connection is closed. Request bodies are
guarded where they are read (an idle timeout per chunk), since a large upload
on a slow link is legitimate while a stalled one is not.
"""

from __future__ import annotations

import asyncio


class HeaderDeadline(asyncio.Protocol):
    """Delegates to aiohttp's RequestHandler, adding a header-receipt deadline."""

    def __init__(self, inner: asyncio.Protocol, timeout: float) -> None:
        self._inner = inner
        self._timeout = timeout
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._first = True
        self._loop = asyncio.get_running_loop()

    def _between_requests(self) -> bool:
        if self._first:
            return True
        # aiohttp sets _current_request while a request is being handled; if a
        # future aiohttp renames it, only each connection's first request is
        # guarded (the classic slowloris) rather than guessing.
        return getattr(self._inner, "_current_request", object()) is None

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is None:
            if self._between_requests():
                if b"\r\n\r\n" in data:
                    self._first = False  # the usual case: all headers in one read, nothing to guard
                else:
                    self._tail = data[-3:]
                    self._timer = self._loop.call_later(self._timeout, self._expire)
        else:
            window = self._tail + data
            if b"\r\n\r\n" in window:
                self._timer.cancel()
                self._timer = None
                self._first = False
            else:
                self._tail = window[-3:]
        self._inner.data_received(data)

    def _expire(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.close()

    def eof_received(self):
        return self._inner.eof_received()

    def connection_lost(self, exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def guarded_factory(factory, header_timeout: float):
    """Wrap aiohttp's protocol factory (``runner.server``) with the header deadline."""

    def make() -> HeaderDeadline:
        return HeaderDeadline(factory(), header_timeout)

    return make


async def next_chunk(request, idle_timeout: float) -> bytes:
    """The next piece of a request body (b"" at its end); 408 if the client stalls."""
    from swapd.server.errors import ClientError

    try:
        async with asyncio.timeout(idle_timeout):
            return await request.content.readany()
    except TimeoutError:
        raise ClientError(408, f"request body stalled for {idle_timeout:g}s", "request_timeout") from None


async def read_body(request, idle_timeout: float, limit: int) -> bytearray:
    """Read a whole request body, failing if the client stalls or sends too much."""
    from swapd.server.errors import ClientError

    check_declared_length(request, limit)
    body = bytearray()  # one buffer, no join: a 100 MB body is held once
    while chunk := await next_chunk(request, idle_timeout):
        body += chunk
        if len(body) > limit:
            raise ClientError(413, f"request body too large (limit {limit} bytes)", "request_too_large")
    return body


async def stream_body(request, idle_timeout: float, limit: int, prefix: bytes | bytearray = b""):
    """Yield a request body as it arrives (after ``prefix``), with the same limits as ``read_body``.

    A stall or an oversized body raises inside the upload to the backend,
    which aborts that upload; the client's connection is then closed.
    """
    size = len(prefix)
    if prefix:
        yield prefix
    from swapd.server.errors import ClientError

    while True:
        try:
            chunk = await next_chunk(request, idle_timeout)
        except ClientError as exc:  # mid-upload there is no response to send: abort it
            raise ConnectionAbortedError(exc.message) from None
        if not chunk:
            return
        size += len(chunk)
        if size > limit:
            raise ConnectionAbortedError(f"request body larger than {limit} bytes")
        yield chunk


def check_declared_length(request, limit: int) -> None:
    from swapd.server.errors import ClientError

    if request.content_length is not None and request.content_length > limit:
        raise ClientError(413, f"request body too large ({request.content_length} bytes; limit {limit})", "request_too_large")


class GuardedTCPSite:
    """Factory for an aiohttp TCPSite whose connections get the header deadline."""

    @staticmethod
    def create(runner, host, port, *, header_timeout: float, **kwargs):
        from aiohttp import web

        class _Site(web.TCPSite):
            async def start(self) -> None:
                # TCPSite.start, with aiohttp's protocol factory wrapped.
                await web.BaseSite.start(self)
                loop = asyncio.get_running_loop()
                self._server = await loop.create_server(
                    guarded_factory(self._runner.server, header_timeout),
                    self._host,
                    self._port,
                    ssl=self._ssl_context,
                    backlog=self._backlog,
                    reuse_address=self._reuse_address,
                    reuse_port=self._reuse_port,
                )

        return _Site(runner, host, port, **kwargs)
