"""A lean HTTP/1.1 client for the hot path: swapd talking to a local backend.

aiohttp's ``ClientSession`` was the largest single cost of a relayed request
(about half of swapd's CPU per request, see docs/performance.md). This client
does only what a reverse proxy needs, on a bare ``asyncio.BufferedProtocol``:

- one write per request (request line, headers and a bytes body together);
- keep-alive connections pooled per backend address; a pooled connection is
  checked with one ``poll`` before it is used, and a request is sent again on
  a new connection only when none of it reached the old one (see ``request``);
- the response's bytes are parsed by llhttp (``upstream_parse``): framing by
  Content-Length, chunked coding (decoded here, trailers dropped) or the end
  of the connection; 1xx interim responses skipped;
- bytes are passed through untouched: no decompression, no header rewriting;
- backpressure both ways, in one ``FlowControl`` per connection: reading
  from the backend pauses while more than ``HIGH_WATER`` bytes wait for the
  client, and a streamed request body waits for the backend's socket.

Each request on a connection gets its own ``_Exchange``: the state of one
response lives in one object that is thrown away with it.

Errors: ``UpstreamConnectError`` (could not connect or send), ``TimeoutError``
from the caller's deadlines, ``UpstreamProtocolError`` (the answer is not
HTTP, or could not be relayed unchanged), and ``UpstreamBroken`` (the
connection ended before the response was complete). https URLs do not come
here; relay.py sends them through aiohttp.
"""

from __future__ import annotations

import asyncio
import collections
import select
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast
from urllib.parse import urlsplit

from multidict import CIMultiDict

from swapd.server.upstream_parse import ResponseParser, UpstreamFault, UpstreamProtocolError

__all__ = [
    "SINK_FULL",
    "SINK_GONE",
    "ClientGone",
    "UpstreamBroken",
    "UpstreamConnectError",
    "UpstreamFault",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamResponse",
]

HIGH_WATER = 256 * 1024  # response bytes buffered for a slow client before reading pauses
MAX_IDLE_PER_ADDRESS = 128
IDLE_REUSE_SECONDS = 4.0  # llama-server and uvicorn close idle keep-alive connections after 5 s
READ_SIZE = 256 * 1024  # as much as asyncio's own recv() asks for


class UpstreamConnectError(UpstreamFault):
    """The backend could not be connected to, or the request could not be sent."""


class UpstreamBroken(UpstreamFault):
    """The connection ended (or failed) before the response was complete."""


class ClientGone(Exception):
    """The client's connection closed while a spliced body was being forwarded."""


# what a splice sink returns besides 0 (written)
SINK_FULL = 1
SINK_GONE = 2

Sink = Callable[[bytes], int]


class _Unsent(Exception):
    """A pooled connection was found closed before any byte of the request was written."""


class FlowControl:
    """Backpressure on one backend connection, both ways.

    Reading pauses when the client cannot keep up (``pause_reading``); our
    writes wait in ``drain`` while the backend's socket buffer is full (the
    transport calls ``pause_writing``/``resume_writing``).
    """

    __slots__ = ("_transport", "read_paused", "write_paused", "_drain_waiter")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.read_paused = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    def pause_reading(self) -> None:
        if not self.read_paused and not self._transport.is_closing():
            self.read_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            if not self._transport.is_closing():
                self._transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    def connection_lost(self) -> None:
        self._wake()

    def _wake(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        if self.write_paused and not self._transport.is_closing():
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None


class _Exchange:
    """One request's response on a connection: its parser, head, body queue and splice sink."""

    __slots__ = (
        "conn",
        "parser",
        "head_waiter",
        "head",
        "keep_alive",
        "chunks",
        "buffered",
        "body_waiter",
        "done",
        "error",
        "sink",
        "sink_chunked",
        "sink_blocked",
        "got_any",
        "spoilt",
        "first_at",
        "head_piece",
        "prev3_piece",
        "prev2_piece",
        "prev_piece",
        "last_piece",
        "tap",
        "received",
    )

    def __init__(self, conn: _Connection, no_body: bool, parser: ResponseParser | None) -> None:
        self.conn = conn
        self.parser = parser.reset(self, no_body) if parser is not None else ResponseParser(self, no_body)
        self.head_waiter: asyncio.Future[None] = conn.loop.create_future()
        self.head: tuple[int, str, CIMultiDict[str]] | None = None
        self.keep_alive = False
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.body_waiter: asyncio.Future[None] | None = None
        self.done = False
        self.error: BaseException | None = None
        self.sink: Sink | None = None
        self.sink_chunked = False
        self.sink_blocked = False
        self.got_any = False
        self.spoilt = False  # bytes after the response: the connection's framing cannot be trusted
        # what telemetry reads once the body has ended: when the first body byte came, the first
        # piece and the last four (usage and timings sit at the end), and every piece when captured
        self.first_at = 0.0
        self.head_piece = b""
        self.prev3_piece = b""
        self.prev2_piece = b""
        self.prev_piece = b""
        self.last_piece = b""
        self.tap: list[bytes] | None = None
        self.received = 0  # body bytes so far (the in-flight view reads it)

    # -- from the connection -------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self.got_any = True
        if self.done:
            self.bytes_after_response()
            return
        try:
            self.parser.feed(data)
        except (UpstreamFault, ClientGone) as exc:  # ClientGone: raised by the sink while delivering
            self.fail(exc)
        except Exception as exc:  # never leave a waiter hanging, whatever broke
            self.fail(UpstreamProtocolError(f"response could not be read: {type(exc).__name__}: {exc}"))

    def lost(self, exc: Exception | None) -> None:
        if self.head is None:
            reason = f": {exc}" if exc else ""
            self._fail_head(UpstreamBroken(f"backend closed the connection before answering{reason}"))
        elif not self.done:
            if exc is None and self.parser.eof():
                return
            reason = f" ({exc})" if exc else ""
            self.fail(UpstreamBroken(f"backend closed the connection mid-response{reason}"))

    # -- ResponseHandler -------------------------------------------------------------

    def head_received(self, status: int, reason: str, headers: CIMultiDict[str], keep_alive: bool) -> None:
        self.head = (status, reason, headers)
        self.keep_alive = keep_alive
        if not self.head_waiter.done():
            self.head_waiter.set_result(None)

    def body_received(self, data: bytes) -> None:
        self.received += len(data)
        if not self.first_at:
            self.first_at = time.monotonic()
            self.head_piece = data
        self.prev3_piece = self.prev2_piece
        self.prev2_piece = self.prev_piece
        self.prev_piece = self.last_piece
        self.last_piece = data
        if self.tap is not None:
            self.tap.append(data)
        sink = self.sink
        if sink is not None:
            self._deliver(sink, b"%x\r\n%b\r\n" % (len(data), data) if self.sink_chunked else data)
            return
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER:
            self.conn.flow.pause_reading()
        self._wake()

    def message_done(self) -> None:
        self.done = True
        self._wake()

    def bytes_after_response(self) -> None:
        self.spoilt = True

    # -- failures ----------------------------------------------------------------------

    def fail(self, exc: BaseException) -> None:
        if self.head is None:
            self._fail_head(exc)
            return
        if not self.done:
            self.error = exc
            self.done = True
        self.spoilt = True
        self._wake()
        self.conn.close()

    def _fail_head(self, exc: BaseException) -> None:
        self.spoilt = True
        if not self.head_waiter.done():
            self.head_waiter.set_exception(exc)
        self.conn.close()

    def _wake(self) -> None:
        waiter = self.body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _deliver(self, sink: Sink, data: bytes) -> None:
        """Write bytes, already framed for the client, through the splice sink."""
        verdict = sink(data)
        if verdict:
            if verdict == SINK_GONE:
                raise ClientGone("the client went away")
            self.sink_blocked = True  # the client's socket is full: stop reading until it drains
            self.conn.flow.pause_reading()
            self._wake()

    @property
    def reusable(self) -> bool:
        return self.done and self.error is None and self.keep_alive and not self.spoilt and not self.chunks

    # -- reading -------------------------------------------------------------------------

    async def _wait(self) -> None:
        self.body_waiter = self.conn.loop.create_future()
        try:
            await self.body_waiter
        finally:
            self.body_waiter = None

    async def read_chunk(self) -> bytes:
        while True:
            chunks = self.chunks
            if chunks:
                # everything that arrived since the last read goes out in one write
                chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self.buffered = 0
                self.conn.flow.resume_reading()
                return chunk
            if self.done:
                if self.error is not None:
                    raise self.error
                return b""
            await self._wait()

    async def splice(self, sink: Sink, drain: Callable[[], Awaitable[None]], chunked: bool) -> None:
        self.sink = sink
        self.sink_chunked = chunked
        flow = self.conn.flow
        try:
            if self.chunks:
                pending = b"".join(self.chunks)
                self.chunks.clear()
                self.buffered = 0
                self._deliver(sink, b"%x\r\n%b\r\n" % (len(pending), pending) if chunked else pending)
            while True:
                if self.sink_blocked:
                    await drain()
                    self.sink_blocked = False
                flow.resume_reading()
                if self.done:
                    break
                await self._wait()
        finally:
            self.sink = None
        if self.error is not None:
            raise self.error


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection to a backend; carries one exchange at a time.

    A BufferedProtocol: asyncio then reads with ``recv_into`` into one
    buffer that the pool's connections share, instead of ``recv(256 KiB)``,
    which allocates (and on glibc often maps and unmaps) a 256 KiB object for
    every read however few bytes arrived. Sharing is safe because asyncio
    calls ``get_buffer``, reads and calls ``buffer_updated`` in one step on
    the pool's loop, and ``buffer_updated`` copies the bytes out at once.
    """

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self._pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl
        self._read_view = pool.read_view
        self.closed = False
        self.idle_since = 0.0
        self.idle_window = IDLE_REUSE_SECONDS  # how long it may wait idle in the pool (timeouts.idleConn)
        self.exchange: _Exchange | None = None
        self._last_parser: ResponseParser | None = None  # llhttp keeps its state across keep-alive responses
        self._poller: select.poll | None = None

    # -- asyncio.BufferedProtocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        self.flow = FlowControl(self.transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        exchange = self.exchange
        if exchange is None:
            # bytes nobody asked for: the connection's framing cannot be trusted
            self.close()
            return
        exchange.feed(bytes(self._read_view[:nbytes]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if self.exchange is not None:
            self.exchange.lost(exc)
        self.flow.connection_lost()

    def eof_received(self) -> bool:
        return False  # close our side too

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    # -- used by the pool --------------------------------------------------------------

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def begin(self, no_body: bool) -> _Exchange:
        last = self._last_parser
        self.exchange = _Exchange(self, no_body, last if last is not None and last.can_continue() else None)
        self._last_parser = self.exchange.parser
        return self.exchange

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def looks_alive(self) -> bool:
        """Has the backend closed this idle connection (a FIN not yet seen by the loop)?

        One ``poll`` with no wait: an idle keep-alive socket must not be
        readable; if it is, it holds an EOF or bytes nobody asked for.
        """
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        poller = self._poller
        if poller is None:
            sock = self.transport.get_extra_info("socket")
            if sock is None:
                return True
            poller = self._poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
        return not poller.poll(0)


class UpstreamResponse:
    """A backend's response: status and headers now, the body chunk by chunk."""

    __slots__ = ("_exchange", "status", "reason", "headers", "_done")

    def __init__(self, exchange: _Exchange, status: int, reason: str, headers: CIMultiDict[str]) -> None:
        self._exchange = exchange
        self.status = status
        self.reason = reason
        self.headers = headers
        self._done = False

    async def read_chunk(self) -> bytes:
        """The next piece of the body as it arrived; b"" at its end."""
        return await self._exchange.read_chunk()

    async def read(self, limit: int | None = None) -> bytes:
        """The rest of the body, or at least its first ``limit`` bytes."""
        exchange = self._exchange
        if exchange.done and exchange.error is None:  # the usual JSON answer: already here, whole
            chunks = exchange.chunks
            body = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            exchange.buffered = 0
            return body
        parts = []
        size = 0
        while True:
            chunk = await self.read_chunk()
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
            if limit is not None and size >= limit:
                break
        return b"".join(parts)

    def observed(self) -> tuple[float, bytes, bytes]:
        """(monotonic time of the first body byte or 0, the first piece, the last four pieces joined).

        Four: a stream's end is often one read per event (the finish_reason chunk,
        the usage chunk, ``[DONE]``), and each may come alone.
        """
        ex = self._exchange
        return ex.first_at, ex.head_piece, b"".join((ex.prev3_piece, ex.prev2_piece, ex.prev_piece, ex.last_piece))

    @property
    def received(self) -> int:
        """Body bytes received from the backend so far."""
        return self._exchange.received

    def capture_into(self, pieces: list[bytes]) -> None:
        """Also append every body piece still to come to ``pieces`` (captures)."""
        self._exchange.tap = pieces

    async def splice(self, sink: Sink, drain: Callable[[], Awaitable[None]], chunked: bool = False) -> None:
        """Hand the rest of the body to ``sink`` straight from the connection's reads.

        No task step and no queue per chunk: this is the streaming hot path.
        ``sink(data)`` writes bytes verbatim to the client and returns 0,
        ``SINK_FULL`` when the client's socket buffer is over its limit
        (reading from the backend then pauses until ``await drain()``
        returns), or ``SINK_GONE``. With ``chunked`` each read's body bytes
        go out as one chunk, and the caller sends the last chunk. Returns
        when the body is complete; raises ``UpstreamBroken``,
        ``UpstreamProtocolError`` or ``ClientGone`` otherwise.
        """
        await self._exchange.splice(sink, drain, chunked)

    def release(self) -> None:
        """Done with the response: a complete, reusable connection goes back to the pool."""
        if self._done:
            return
        self._done = True
        exchange = self._exchange
        conn = exchange.conn
        conn.exchange = None
        if exchange.reusable and not conn.closed:
            conn._pool.put(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection (the client left, or the body broke)."""
        if self._done:
            return
        self._done = True
        conn = self._exchange.conn
        conn.exchange = None
        conn.close()


_SPLIT_CACHE: dict[str, tuple[str, int, str, str]] = {}


def _split_base(url: str) -> tuple[str, int, str, str]:
    """(host, port, Host header, target) for an http:// URL."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not a plain http URL: {url}")
    port = parts.port or 80
    netloc = parts.netloc.rpartition("@")[2]
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return parts.hostname, port, netloc, target


def set_keepalive(sock: socket.socket | None, seconds: float) -> None:
    """TCP keep-alive probes after ``seconds`` idle, then every ``seconds`` (Go's ``net.Dialer.KeepAlive``)."""
    if sock is None:
        return
    interval = max(1, int(seconds))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, interval)
        if hasattr(socket, "TCP_KEEPINTVL"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    except OSError:  # a socket that cannot take the option still carries requests
        pass


def _check_header(name: str, value: str) -> None:
    if "\r" in value or "\n" in value or "\0" in value or "\r" in name or "\n" in name or ":" in name:
        raise UpstreamConnectError(f"header {name!r} has characters that cannot be sent")


class UpstreamPool:
    """Keep-alive connections to backends, keyed by (host, port)."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self.read_view = memoryview(bytearray(READ_SIZE))  # shared by this pool's connections
        self._all: set[_Connection] = set()
        self._closed = False
        self._sweep: asyncio.TimerHandle | None = None  # closes connections idle past their window
        self._sweep_at = 0.0

    def forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def put(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if self._closed or len(idle) >= MAX_IDLE_PER_ADDRESS:
            conn.close()
            return
        now = conn.idle_since = time.monotonic()
        idle.append(conn)
        expires = now + conn.idle_window
        if self._sweep is None or expires < self._sweep_at:
            self._arm_sweep(expires)

    def _arm_sweep(self, at: float) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_at = at
        self._sweep = asyncio.get_running_loop().call_later(max(0.0, at - time.monotonic()), self._expire_idle)

    def _expire_idle(self) -> None:
        """Close the connections idle past their window (``timeouts.idleConn``), as Go's IdleConnTimeout."""
        self._sweep = None
        now = time.monotonic()
        nearest = 0.0
        for idle in self._idle.values():
            for conn in list(idle):
                expires = conn.idle_since + conn.idle_window
                if expires <= now:
                    idle.remove(conn)
                    conn.close()
                elif not nearest or expires < nearest:
                    nearest = expires
        if nearest and not self._closed:
            self._arm_sweep(nearest)

    def _take(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: least likely to have timed out
            if now - conn.idle_since > conn.idle_window or not conn.looks_alive():
                conn.close()
                continue
            return conn
        return None

    async def _connect(
        self, key: tuple[str, int], connect_timeout: float | None, keepalive: float | None = None
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                transport, conn = await loop.create_connection(lambda: _Connection(self, key), key[0], key[1])
        except TimeoutError:
            raise
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to {key[0]}:{key[1]}: {exc.strerror or exc}") from exc
        if keepalive:
            set_keepalive(transport.get_extra_info("socket"), keepalive)
        self._all.add(conn)
        return conn

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def open_count(self) -> int:
        return len(self._all)

    async def request(
        self,
        method: str,
        url: str,
        headers: CIMultiDict[str],
        body: bytes | bytearray | memoryview | AsyncIterator[bytes] | None = None,
        *,
        content_length: int | None = None,
        connect_timeout: float | None = None,
        keepalive: float | None = None,
        idle_window: float | None = None,
    ) -> UpstreamResponse:
        """Send a request; return once the response's status and headers arrived.

        ``body`` is None, bytes, or an async iterator of bytes (streamed with
        ``content_length`` when known, chunked otherwise). The caller bounds
        the wait for the headers with its own deadline. ``keepalive`` turns on
        TCP keep-alive probes on a new connection (every that many seconds,
        once idle that long); ``idle_window`` is how long the connection may
        then wait idle in the pool (None: ``IDLE_REUSE_SECONDS``).

        When to send again: only when a pooled connection closed before any
        byte of this request was written to it, so the backend cannot have
        seen any of it. A request that was written and then met a closed
        connection is never repeated, whatever its method: the backend may
        have acted on it. ``looks_alive`` keeps that case rare by checking a
        pooled socket for a pending EOF before writing.
        """
        if self._closed:
            raise UpstreamConnectError("swapd is shutting down")
        split = _SPLIT_CACHE.get(url)
        if split is None:
            split = _split_base(url)
            if len(_SPLIT_CACHE) < 4096:
                _SPLIT_CACHE[url] = split
        host, port, host_header, target = split
        key = (host, port)
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {host_header}\r\n"]
        for name, value in headers.items():
            _check_header(name, value)
            lines.append(f"{name}: {value}\r\n")
        streamed = body is not None and not isinstance(body, (bytes, bytearray, memoryview))
        if streamed:
            if content_length is not None:
                lines.append(f"Content-Length: {content_length}\r\n")
            else:
                lines.append("Transfer-Encoding: chunked\r\n")
        elif body is not None:
            lines.append(f"Content-Length: {len(body)}\r\n")  # type: ignore[arg-type]
        elif method in ("POST", "PUT", "PATCH"):
            lines.append("Content-Length: 0\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("utf-8", "surrogateescape")
        no_body = method == "HEAD"
        while True:
            conn = None if streamed else self._take(key)
            if conn is None:
                conn = await self._connect(key, connect_timeout, keepalive)
            if idle_window is not None:
                conn.idle_window = idle_window
            exchange = conn.begin(no_body)
            try:
                if conn.closed:
                    raise _Unsent()
                if streamed:
                    await self._send_streamed(conn, exchange, head, body, content_length is None)  # type: ignore[arg-type]
                elif body is not None and len(body) > 65536:  # type: ignore[arg-type]
                    conn.write(head)  # a large body is not copied to be joined to its head
                    conn.write(body)  # type: ignore[arg-type]
                else:
                    conn.write(head + body if body else head)  # type: ignore[operator]
                await exchange.head_waiter
            except _Unsent:
                conn.exchange = None
                continue  # nothing of the request left swapd: a new connection is safe
            except BaseException:
                conn.exchange = None
                conn.close()
                raise
            assert exchange.head is not None
            status, reason, resp_headers = exchange.head
            return UpstreamResponse(exchange, status, reason, resp_headers)

    async def _send_streamed(
        self, conn: _Connection, exchange: _Exchange, head: bytes, body: AsyncIterator[bytes], chunked: bool
    ) -> None:
        conn.write(head)
        async for chunk in body:
            if conn.closed or exchange.head is not None:
                break  # the backend answered (or hung up) before taking the whole body
            if not chunk:
                continue
            conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            await conn.flow.drain()
        else:
            if chunked and not conn.closed:
                conn.write(b"0\r\n\r\n")
            return
        exchange.spoilt = True
        if conn.closed and exchange.head is None:
            raise UpstreamBroken("backend closed the connection while the request body was being sent")

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)
