"""A lean HTTP/1.1 client for the hot path: swapd talking to a local backend.

aiohttp's ``ClientSession`` was the largest single cost of a relayed request
(about half of swapd's CPU per request, see docs/performance.md). This client
does only what a reverse proxy needs, on a bare ``asyncio.Protocol``:

- one write per request (request line, headers and a bytes body together);
- keep-alive connections pooled per backend address, with one retry on a
  fresh connection when a reused one turns out to have been closed by the
  backend before it answered (only for bodies that can be sent again);
- response framing by Content-Length, chunked transfer coding (decoded here,
  trailers dropped) or end of connection; 1xx interim responses skipped;
- bytes are passed through untouched: no decompression, no header rewriting;
- backpressure both ways: reading from the backend pauses while more than
  ``HIGH_WATER`` bytes wait for the client, and a streamed request body
  waits for the backend's socket to drain.

Errors: ``UpstreamConnectError`` (could not connect or send), ``TimeoutError``
from the caller's deadlines, ``UpstreamProtocolError`` (the answer is not
HTTP), and ``UpstreamBroken`` (the connection ended before the response was
complete). https URLs do not come here; relay.py sends them through aiohttp.
"""

from __future__ import annotations

import asyncio
import collections
import time
from urllib.parse import urlsplit

from multidict import CIMultiDict

HIGH_WATER = 256 * 1024  # response bytes buffered for a slow client before reading pauses
LOW_WATER = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024  # status line plus headers
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
MAX_IDLE_PER_ADDRESS = 128
IDLE_REUSE_SECONDS = 4.0  # llama-server and uvicorn close idle keep-alive connections after 5 s


class UpstreamFault(Exception):
    """Base of the errors this client raises."""


class UpstreamConnectError(UpstreamFault):
    """The backend could not be connected to, or the request could not be sent."""


class UpstreamProtocolError(UpstreamFault):
    """The backend's answer is not valid HTTP/1.x."""


class UpstreamBroken(UpstreamFault):
    """The connection ended (or failed) before the response was complete."""


class ClientGone(Exception):
    """The client's connection closed while a spliced body was being forwarded."""


# what a splice sink returns besides 0 (written)
SINK_FULL = 1
SINK_GONE = 2


class _Retry(Exception):
    """A reused connection was closed before any answer: send again on a new one."""


_NO_BODY_STATUS = frozenset((204, 304))
_HEX_DIGITS = b"0123456789abcdefABCDEF"


def _parse_head(head: bytes) -> tuple[int, str, CIMultiDict, bool, str]:
    """Status, reason, headers, keep-alive, and the framing: 'chunked', 'length' or 'close'."""
    lines = head.split(b"\r\n")
    status_line = lines[0]
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
        raise UpstreamProtocolError(f"not an HTTP/1.x status line: {status_line[:100]!r}")
    version = parts[0]
    status = int(parts[1])
    reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
    headers: CIMultiDict = CIMultiDict()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name:
            raise UpstreamProtocolError(f"malformed header line: {line[:100]!r}")
        headers.add(name.decode("latin-1"), value.strip(b" \t").decode("utf-8", "surrogateescape"))
    connection = headers.get("Connection", "").lower()
    if version == b"HTTP/1.0":
        keep_alive = "keep-alive" in connection
    else:
        keep_alive = "close" not in connection
    framing = "close"
    te = headers.get("Transfer-Encoding")
    if te is not None:
        if te.lower().rsplit(",", 1)[-1].strip() != "chunked":
            raise UpstreamProtocolError(f"unsupported Transfer-Encoding: {te[:100]}")
        framing = "chunked"
        # RFC 9112 6.3: chunked framing wins, and a Content-Length beside it
        # must not reach the client, whose body would not match it
        headers.popall("Content-Length", None)
    else:
        cl = headers.getall("Content-Length", None)
        if cl is not None:
            values = {v.strip() for v in cl}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise UpstreamProtocolError(f"invalid Content-Length: {cl!r}")
            framing = "length"
    return status, reason, headers, keep_alive, framing


READ_SIZE = 256 * 1024  # as much as asyncio's own recv() asks for


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection to a backend; carries one request at a time.

    A BufferedProtocol: asyncio then reads with ``recv_into`` into one
    buffer that the pool's connections share, instead of ``recv(256 KiB)``,
    which allocates (and on glibc often maps and unmaps) a 256 KiB object for
    every read however few bytes arrived. Sharing is safe because asyncio
    calls ``get_buffer``, reads and calls ``buffer_updated`` in one step on
    the pool's loop, and ``buffer_updated`` copies the bytes out at once.
    """

    def __init__(self, pool: "UpstreamPool", key: tuple[str, int]) -> None:
        self._pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self._read_view = pool._read_view
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._loop = asyncio.get_running_loop()
        # write side
        self._write_paused = False
        self._drain: asyncio.Future | None = None
        # response side
        self._head_buf = bytearray()
        self._head_waiter: asyncio.Future | None = None
        self._head: tuple | None = None
        self._got_any = False
        self._no_body = False
        self._framing = ""
        self._remaining = 0  # bytes left in a length body or in the current chunk
        self._chunk_state = 0  # 0: size line, 1: data, 2: CRLF after data, 3: trailers
        self._line = bytearray()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._read_paused = False
        self._body_waiter: asyncio.Future | None = None
        self.body_done = False
        self.body_error: BaseException | None = None
        self.reusable = False
        self.in_use = False
        self._sink = None
        self._sink_chunked = False
        self._sink_blocked = False

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self._read_view[:nbytes]))

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._pool._forget(self)
        if self._head is None and self._head_waiter is not None and not self._head_waiter.done():
            if self.reused and not self._got_any:
                self._head_waiter.set_exception(_Retry())
            else:
                reason = f": {exc}" if exc else ""
                self._head_waiter.set_exception(UpstreamBroken(f"backend closed the connection before answering{reason}"))
        elif self._head is not None and not self.body_done:
            if self._framing == "close" and exc is None:
                self._finish_body()
            else:
                reason = f" ({exc})" if exc else ""
                self._fail_body(UpstreamBroken(f"backend closed the connection mid-response{reason}"))
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def eof_received(self):
        return False  # close our side too

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._got_any = True
        if not self.in_use:
            # bytes nobody asked for: the connection's framing cannot be trusted
            self.transport.close()
            return
        if self._head is None:
            self._head_buf += data
            end = self._head_buf.find(b"\r\n\r\n")
            if end == -1:
                if len(self._head_buf) > MAX_HEAD_BYTES:
                    self._fail_head(UpstreamProtocolError(f"response headers exceed {MAX_HEAD_BYTES} bytes"))
                return
            if end > MAX_HEAD_BYTES:
                self._fail_head(UpstreamProtocolError(f"response headers exceed {MAX_HEAD_BYTES} bytes"))
                return
            head = bytes(self._head_buf[:end])
            rest = bytes(self._head_buf[end + 4:])
            self._head_buf.clear()
            try:
                parsed = _parse_head(head)
            except UpstreamProtocolError as exc:
                self._fail_head(exc)
                return
            status = parsed[0]
            if 100 <= status < 200:  # interim (100 Continue, 103 Early Hints): wait for the real one
                if rest:
                    self.data_received(rest)
                return
            self._start_body(parsed)
            if self._head_waiter is not None and not self._head_waiter.done():
                self._head_waiter.set_result(None)
            if not rest:
                return
            if self.body_done:
                self.reusable = False  # bytes after a complete response
                return
            data = rest
        if self.body_done:
            self.reusable = False
            return
        if self._framing == "chunked":
            if self._sink_chunked and self._chunk_state == 0 and not self._line:
                data = self._pass_chunks(data)  # whole chunks go to the client as they came
                if not data:
                    return
            out = self._decode_chunked(data)
        elif self._framing == "length":
            if len(data) >= self._remaining:
                if len(data) > self._remaining:
                    self.reusable = False
                out = data[: self._remaining]
                self._remaining = 0
                self._push(out)
                self._finish_body()
                return
            self._remaining -= len(data)
            out = data
        else:
            out = data
        if out:
            self._push(out)

    # -- response parsing -------------------------------------------------------

    def _start_body(self, parsed) -> None:
        status, reason, headers, keep_alive, framing = parsed
        self._head = (status, reason, headers)
        self.reusable = keep_alive
        self._framing = framing
        if self._no_body or status in _NO_BODY_STATUS:
            self._finish_body()
        elif framing == "length":
            self._remaining = int(headers["Content-Length"])
            if self._remaining == 0:
                self._finish_body()
        elif framing == "close":
            self.reusable = False

    def _decode_chunked(self, data: bytes) -> bytes:
        out = []
        pos = 0
        n = len(data)
        while pos < n and not self.body_done:
            state = self._chunk_state
            if state == 1:  # chunk data
                take = min(self._remaining, n - pos)
                out.append(data[pos:pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._chunk_state = 2
                continue
            # a line: size line, the CRLF after data, or a trailer line
            nl = data.find(b"\n", pos)
            if nl == -1:
                self._line += data[pos:]
                if len(self._line) > MAX_CHUNK_LINE:
                    self._fail_body(UpstreamProtocolError("chunked body: line too long"))
                return b"".join(out)
            if self._line:
                self._line += data[pos:nl]
                line = bytes(self._line)
                self._line.clear()
            else:
                line = data[pos:nl]
            pos = nl + 1
            line = line.rstrip(b"\r")
            if state == 0:
                size_text = line.split(b";", 1)[0].strip(b" \t")
                if not size_text or len(size_text) > 16 or size_text.strip(_HEX_DIGITS):
                    self._fail_body(UpstreamProtocolError(f"chunked body: bad chunk size {size_text[:40]!r}"))
                    return b"".join(out)
                size = int(size_text, 16)
                if size == 0:
                    self._chunk_state = 3
                else:
                    self._remaining = size
                    self._chunk_state = 1
            elif state == 2:
                if line:
                    self._fail_body(UpstreamProtocolError("chunked body: missing CRLF after chunk data"))
                    return b"".join(out)
                self._chunk_state = 0
            else:  # trailers end with an empty line
                if not line:
                    if pos < n:
                        self.reusable = False
                    if out:
                        self._push(b"".join(out))
                    self._finish_body()
                    return b""
        return b"".join(out)

    def _pass_chunks(self, data: bytes) -> bytes:
        """Forward the whole chunks at the start of ``data`` without decoding them.

        The client is chunked too, so valid chunks can go out byte for byte in
        one write. Stops at the last chunk, at anything unusual (extensions,
        a chunk cut by the read) and returns what is left for the decoder.
        """
        pos = 0
        n = len(data)
        find = data.find
        while pos < n:
            eol = find(b"\r\n", pos, pos + 18)
            if eol <= pos:
                break
            size_text = data[pos:eol]
            if size_text.strip(_HEX_DIGITS):
                break
            size = int(size_text, 16)
            end = eol + 2 + size
            if size == 0 or end + 2 > n or data[end:end + 2] != b"\r\n":
                break
            pos = end + 2
        if pos:
            self._deliver(data if pos == n else data[:pos])
            return data[pos:] if pos < n else b""
        return data

    def _push(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._sink is not None:
            self._deliver(b"%x\r\n%b\r\n" % (len(chunk), chunk) if self._sink_chunked else chunk)
            return
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > HIGH_WATER and not self._read_paused and not self.closed:
            self._read_paused = True
            self.transport.pause_reading()
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _deliver(self, data: bytes) -> None:
        """Write bytes, already framed for the client, through the splice sink."""
        verdict = self._sink(data)
        if verdict:
            if verdict == SINK_GONE:
                self._fail_body(ClientGone("the client went away"))
                return
            self._sink_blocked = True  # the client's socket is full: stop reading until it drains
            if not self._read_paused and not self.closed:
                self._read_paused = True
                self.transport.pause_reading()
            waiter = self._body_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _finish_body(self) -> None:
        self.body_done = True
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail_body(self, exc: BaseException) -> None:
        self.reusable = False
        if not self.body_done:
            self.body_error = exc
            self.body_done = True
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def _fail_head(self, exc: BaseException) -> None:
        self.reusable = False
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(exc)
        self.transport.close()

    # -- used by UpstreamResponse and UpstreamPool ---------------------------

    def begin(self, no_body: bool) -> None:
        self.in_use = True
        self._no_body = no_body
        self._head = None
        self._head_buf.clear()
        self._got_any = False
        self._chunks.clear()
        self._buffered = 0
        self._chunk_state = 0
        self._line.clear()
        self.body_done = False
        self.body_error = None
        self.reusable = False
        self._sink = None
        self._sink_chunked = False
        self._sink_blocked = False
        self._head_waiter = self._loop.create_future()

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain = self._loop.create_future()
            await self._drain
            self._drain = None

    async def head(self):
        if self._head is None:
            await self._head_waiter
        return self._head

    async def read_chunk(self) -> bytes:
        while True:
            if self._chunks:
                # everything that arrived since the last read goes out in one write
                chunks = self._chunks
                chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if self._read_paused and self._buffered <= LOW_WATER and not self.closed:
                    self._read_paused = False
                    self.transport.resume_reading()
                return chunk
            if self.body_done:
                if self.body_error is not None:
                    raise self.body_error
                return b""
            self._body_waiter = self._loop.create_future()
            try:
                await self._body_waiter
            finally:
                self._body_waiter = None


    async def splice(self, sink, drain, chunked: bool) -> None:
        """Hand the rest of the body to ``sink`` straight from ``data_received``.

        No task step and no queue per chunk: this is the streaming hot path.
        ``sink(data)`` writes bytes verbatim to the client and returns 0,
        ``SINK_FULL`` when the client's socket buffer is over its limit
        (reading from the backend then pauses until ``await drain()``
        returns), or ``SINK_GONE``. With ``chunked`` the client gets chunked
        framing: the backend's own chunks pass through unchanged where they
        can, anything else is framed here, and the caller sends the last
        chunk. Returns when the body is complete; raises ``UpstreamBroken``,
        ``UpstreamProtocolError`` or ``ClientGone`` otherwise.
        """
        self._sink = sink
        self._sink_chunked = chunked
        if self._chunks:
            pending = b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            self._push(pending)
        try:
            while True:
                if self._sink_blocked:
                    await drain()
                    self._sink_blocked = False
                if self._read_paused and not self.closed:
                    self._read_paused = False
                    self.transport.resume_reading()
                if self.body_done:
                    break
                self._body_waiter = self._loop.create_future()
                try:
                    await self._body_waiter
                finally:
                    self._body_waiter = None
        finally:
            self._sink = None
            self._sink_chunked = False
        if self.body_error is not None:
            raise self.body_error


class UpstreamResponse:
    """A backend's response: status and headers now, the body chunk by chunk."""

    __slots__ = ("_conn", "status", "reason", "headers", "_done")

    def __init__(self, conn: _Connection, status: int, reason: str, headers: CIMultiDict) -> None:
        self._conn = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self._done = False

    async def read_chunk(self) -> bytes:
        """The next piece of the body as it arrived; b"" at its end."""
        return await self._conn.read_chunk()

    async def read(self, limit: int | None = None) -> bytes:
        """The rest of the body, or at least its first ``limit`` bytes."""
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

    async def splice(self, sink, drain, chunked: bool = False) -> None:
        """Stream the rest of the body into ``sink`` (see ``_Connection.splice``)."""
        await self._conn.splice(sink, drain, chunked)

    def release(self) -> None:
        """Done with the response: a complete, reusable connection goes back to the pool."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        conn.in_use = False
        if conn.body_done and conn.body_error is None and not conn._chunks and conn.reusable and not conn.closed:
            conn._pool._put(conn)
        elif conn.transport is not None:
            conn.transport.close()

    def close(self) -> None:
        """Drop the connection (the client left, or the body broke)."""
        if self._done:
            return
        self._done = True
        self._conn.in_use = False
        if self._conn.transport is not None:
            self._conn.transport.close()


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


def _check_header(name: str, value: str) -> None:
    if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
        raise UpstreamConnectError(f"header {name!r} has characters that cannot be sent")


class UpstreamPool:
    """Keep-alive connections to backends, keyed by (host, port)."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._read_view = memoryview(bytearray(READ_SIZE))  # shared by this pool's connections
        self._all: set[_Connection] = set()
        self._closed = False

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def _put(self, conn: _Connection) -> None:
        if self._closed:
            conn.transport.close()
            return
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= MAX_IDLE_PER_ADDRESS:
            conn.transport.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def _take(self, key) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: least likely to have timed out
            if conn.closed or conn.transport.is_closing():
                continue
            if now - conn.idle_since > IDLE_REUSE_SECONDS:
                conn.transport.close()
                continue
            conn.reused = True
            return conn
        return None

    async def _connect(self, key, connect_timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(self, key), key[0], key[1])
        except TimeoutError:
            raise
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to {key[0]}:{key[1]}: {exc.strerror or exc}") from exc
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
        headers,
        body=None,
        *,
        content_length: int | None = None,
        connect_timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send a request; return once the response's status and headers arrived.

        ``body`` is None, bytes, or an async iterator of bytes (streamed with
        ``content_length`` when known, chunked otherwise). The caller bounds
        the wait for the headers with its own deadline.
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
            lines.append(f"Content-Length: {len(body)}\r\n")
        elif method in ("POST", "PUT", "PATCH"):
            lines.append("Content-Length: 0\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("utf-8", "surrogateescape")
        no_body = method == "HEAD"
        for attempt in (0, 1):
            # a streamed body cannot be sent twice, so it never risks a stale connection
            conn = self._take(key) if attempt == 0 and not streamed else None
            if conn is None:
                conn = await self._connect(key, connect_timeout)
            conn.begin(no_body)
            try:
                if streamed:
                    await self._send_streamed(conn, head, body, content_length is None)
                else:
                    conn.transport.write(head + body if body else head)
                await conn.head()
            except _Retry:
                if streamed or attempt == 1:
                    raise UpstreamBroken("backend closed a kept-alive connection before answering") from None
                continue
            except BaseException:
                conn.in_use = False
                conn.transport.close()
                raise
            status, reason, resp_headers = conn._head
            return UpstreamResponse(conn, status, reason, resp_headers)
        raise AssertionError("unreachable")

    async def _send_streamed(self, conn: _Connection, head: bytes, body, chunked: bool) -> None:
        conn.transport.write(head)
        async for chunk in body:
            if conn.closed or conn._head is not None:
                break  # the backend answered (or hung up) before taking the whole body
            if not chunk:
                continue
            if chunked:
                conn.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            else:
                conn.transport.write(chunk)
            await conn.drain()
        else:
            if chunked and not conn.closed:
                conn.transport.write(b"0\r\n\r\n")
            return
        conn.reusable = False
        if conn.closed and conn._head is None:
            raise UpstreamBroken("backend closed the connection while the request body was being sent")

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._all):
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
        await asyncio.sleep(0)
