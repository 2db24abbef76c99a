"""swapd.server.upstream, the hot-path HTTP/1.1 client, against scripted servers on real sockets.

Each test runs a TCP server that writes exact bytes (split where the test
wants them split), so framing, keep-alive, retries and backpressure are
checked byte for byte. The swapd-level behaviour through this client is
covered by test_core, test_compat and test_reliability.
"""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict

from swapd.server import upstream
from swapd.server.upstream import (
    SINK_FULL,
    SINK_GONE,
    ClientGone,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamPool,
    UpstreamProtocolError,
)

from helpers import dechunk


class Script:
    """A TCP server; ``handler(reader, writer, n)`` serves connection number n."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self):
        async def serve(reader, writer):
            n = self.connections
            self.connections += 1
            try:
                await self.handler(self, reader, writer, n)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def read_request(self, reader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        body = b""
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                body = await reader.readexactly(int(line.split(b":")[1]))
            if line.lower().startswith(b"transfer-encoding:"):
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    data = await reader.readexactly(size + 2)
                    body += data[:-2]
                    if size == 0:
                        await reader.readuntil(b"\r\n") if data != b"\r\n" else None
                        break
        self.requests.append(head + body)
        return head + body


async def _write_pieces(writer, data: bytes, step: int) -> None:
    for i in range(0, len(data), step):
        writer.write(data[i:i + step])
        await writer.drain()
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def serve(handler, check) -> None:
    """Run ``await check(pool, script)`` against a Script serving ``handler``; close the pool after."""

    async def main():
        pool = UpstreamPool()
        try:
            async with Script(handler) as script:
                await check(pool, script)
        finally:
            await pool.close()

    run(main())


def answering(data: bytes, linger: float = 1.0):
    """A handler that reads one request, writes ``data`` and keeps the connection open ``linger`` seconds."""

    async def handler(script, reader, writer, n):
        await script.read_request(reader)
        writer.write(data)
        await writer.drain()
        if linger:
            await asyncio.sleep(linger)

    return handler


async def _get(pool: UpstreamPool, url: str, path: str = "/x", method: str = "POST", body=b"{}", **kw):
    resp = await pool.request(method, url + path, CIMultiDict({"Content-Type": "application/json"}), body, **kw)
    data = await resp.read()
    resp.release()
    return resp, data


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_content_length_body_split_anywhere_and_connection_reused(step):
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\nX-A: 1\r\n\r\n{\"ok\":true}"

    async def handler(script, reader, writer, n):
        while True:
            await script.read_request(reader)
            await _write_pieces(writer, answer, step)

    async def check(pool, s):
        for _ in range(3):
            resp, data = await _get(pool, s.url)
            assert (resp.status, resp.reason, data) == (200, "OK", b'{"ok":true}')
            assert resp.headers["X-A"] == "1"
        assert s.connections == 1, "keep-alive connection was not reused"
        assert pool.idle_count() == 1

    serve(handler, check)


def test_request_is_one_write_with_host_and_length():
    async def check(pool, s):
        resp, data = await _get(pool, s.url, "/v1/chat/completions?a=b%20c", body=b'{"model":"m"}')
        assert resp.status == 204 and data == b""
        head, _, body = s.requests[0].partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /v1/chat/completions?a=b%20c HTTP/1.1"
        port = s.url.rsplit(":", 1)[1]
        assert f"Host: 127.0.0.1:{port}".encode() in lines
        assert b"Content-Length: 13" in lines and b"Content-Type: application/json" in lines
        assert body == b'{"model":"m"}'

    serve(answering(b"HTTP/1.1 204 No Content\r\n\r\n"), check)


@pytest.mark.parametrize("step", [1, 3, 4096])
def test_chunked_body_with_extensions_and_trailers(step):
    body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: t\r\n\r\n"
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body

    async def handler(script, reader, writer, n):
        while True:
            await script.read_request(reader)
            await _write_pieces(writer, answer, step)

    async def check(pool, s):
        for _ in range(2):
            resp, data = await _get(pool, s.url)
            assert data == b"Wikipedia in\r\n\r\nchunks."
        assert s.connections == 1

    serve(handler, check)


def test_body_until_close_is_read_and_not_pooled():
    async def handler(script, reader, writer, n):
        await script.read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"it")
        await writer.drain()

    async def check(pool, s):
        resp, data = await _get(pool, s.url)
        assert data == b"all of it"
        assert pool.idle_count() == 0

    serve(handler, check)


def test_interim_responses_are_skipped():
    async def handler(script, reader, writer, n):
        await script.read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        await writer.drain()
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nhi")
        await writer.drain()
        await asyncio.sleep(1)

    async def check(pool, s):
        resp, data = await _get(pool, s.url)
        assert (resp.status, data) == (201, b"hi") and "Link" not in resp.headers

    serve(handler, check)


def test_head_response_has_no_body_and_stays_reusable():
    async def handler(script, reader, writer, n):
        while True:
            request = await script.read_request(reader)
            if request.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
            await writer.drain()

    async def check(pool, s):
        resp, data = await _get(pool, s.url, method="HEAD", body=None)
        assert resp.headers["Content-Length"] == "1000" and data == b""
        resp, data = await _get(pool, s.url, method="GET", body=None)
        assert data == b"abc" and s.connections == 1

    serve(handler, check)


@pytest.mark.parametrize(
    "answer, message",
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (upstream.MAX_HEAD_BYTES + 10), "exceed"),
    ],
)
def test_invalid_responses_are_protocol_errors(answer, message):
    async def check(pool, s):
        with pytest.raises(UpstreamProtocolError, match=message):
            await _get(pool, s.url)
        assert pool.idle_count() == 0

    serve(answering(answer), check)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n",
    ],
)
def test_connection_closed_early_is_broken(answer):
    async def check(pool, s):
        with pytest.raises(UpstreamBroken):
            await _get(pool, s.url)

    serve(answering(answer, linger=0), check)


def test_bad_chunk_size_is_a_protocol_error():
    async def check(pool, s):
        resp = await pool.request("GET", s.url + "/", {}, None)
        assert await resp.read_chunk() == b"hello"
        with pytest.raises(UpstreamProtocolError, match="chunk size"):
            await resp.read_chunk()
        resp.close()

    serve(answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"), check)


def test_stale_keepalive_connection_is_retried_once_on_a_new_one():
    async def handler(script, reader, writer, n):
        await script.read_request(reader)
        if n == 0:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
            await writer.drain()
            # the backend's keep-alive timer fires as the next request arrives: close without answering
            await script.read_request(reader)
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
        await writer.drain()
        await asyncio.sleep(1)

    async def check(pool, s):
        assert (await _get(pool, s.url))[1] == b"first"
        assert (await _get(pool, s.url))[1] == b"second"
        assert s.connections == 2 and len(s.requests) == 3

    serve(handler, check)


def test_stale_connection_is_not_retried_twice_and_streamed_bodies_use_fresh_ones():
    async def handler(script, reader, writer, n):
        await script.read_request(reader)
        if n == 0:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await script.read_request(reader)
        # every later connection: take the request and hang up

    async def body():
        yield b"part1 "
        yield b"part2"

    async def check(pool, s):
        await _get(pool, s.url)
        with pytest.raises(UpstreamBroken):
            await _get(pool, s.url)
        assert s.connections == 2  # the stale one, then exactly one retry
        with pytest.raises(UpstreamBroken):
            await _get(pool, s.url, body=body())
        assert s.connections == 3
        assert s.requests[-1].endswith(b"part1 part2")
        assert b"Transfer-Encoding: chunked" in s.requests[-1]

    serve(handler, check)


def test_idle_connections_past_reuse_window_are_not_used(monkeypatch):
    monkeypatch.setattr(upstream, "IDLE_REUSE_SECONDS", 0.05)

    async def handler(script, reader, writer, n):
        while True:
            await script.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async def check(pool, s):
        await _get(pool, s.url)
        await asyncio.sleep(0.2)
        await _get(pool, s.url)
        assert s.connections == 2

    serve(handler, check)


def test_bytes_after_a_complete_response_stop_reuse():
    async def handler(script, reader, writer, n):
        while True:
            await script.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokGARBAGE")
            await writer.drain()

    async def check(pool, s):
        for _ in range(2):
            assert (await _get(pool, s.url))[1] == b"ok"
        assert s.connections == 2

    serve(handler, check)


def test_connect_errors_and_header_injection():
    async def main():
        pool = UpstreamPool()
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        with pytest.raises(UpstreamConnectError, match="cannot connect"):
            await pool.request("GET", f"http://127.0.0.1:{port}/", {}, None)
        async with Script(lambda *a: asyncio.sleep(1)) as s:
            with pytest.raises(UpstreamConnectError, match="cannot be sent"):
                await pool.request("GET", s.url + "/", {"X-Evil": "a\r\nInjected: 1"}, None)
        assert pool.open_count() == 0
        await pool.close()

    run(main())


def test_slow_reader_pauses_the_backend():
    """A client that does not read must not make swapd buffer the backend's whole output."""
    total = 8 * 1024 * 1024
    piece = b"x" * 65536

    async def handler(script, reader, writer, n):
        await script.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        for _ in range(total // len(piece)):
            writer.write(piece)
            await writer.drain()

    async def check(pool, s):
        resp = await pool.request("GET", s.url + "/", {}, None)
        conn = resp._conn
        await asyncio.sleep(0.5)  # the backend could send everything in this time
        assert not conn.transport.is_reading()
        assert conn._buffered <= upstream.HIGH_WATER + 256 * 1024
        received = 0
        while chunk := await resp.read_chunk():
            received += len(chunk)
            assert conn._buffered <= upstream.HIGH_WATER + 256 * 1024
        assert received == total
        resp.release()

    serve(handler, check)


def test_splice_forwards_pauses_on_a_full_sink_and_stops_when_the_client_is_gone():
    events = [b"data: %d\n\n" % i for i in range(50)]
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"

    async def handler(script, reader, writer, n):
        await script.read_request(reader)
        writer.write(answer)
        for event in events:
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0.002)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def check(pool, s):
        got = []
        drains = 0

        def sink(data):
            got.append(data)
            return SINK_FULL if len(got) % 10 == 0 else 0

        async def drain():
            nonlocal drains
            drains += 1
            assert not resp._conn.transport.is_reading()  # reading stopped while the client was full
            await asyncio.sleep(0.01)

        resp = await pool.request("GET", s.url + "/", {}, None)
        await resp.splice(sink, drain)
        resp.release()
        assert b"".join(got) == b"".join(events)
        assert drains >= 1
        assert pool.idle_count() == 1

        def gone(data):
            return SINK_GONE

        resp = await pool.request("GET", s.url + "/", {}, None)
        conn = resp._conn
        with pytest.raises(ClientGone):
            await resp.splice(gone, drain)
        resp.close()
        await asyncio.sleep(0.05)
        assert conn.closed and pool.idle_count() == 0

    serve(handler, check)


@pytest.mark.parametrize("step", [1, 5, 9, 100000])
def test_splice_to_a_chunked_client_keeps_valid_framing(step):
    """Whole chunks pass through as they came; cut or unusual ones (extensions) are re-framed; the last chunk is left to the caller."""
    chunks = b"7\r\ndata: 1\r\n19;name=x\r\ndata: a longer event here\r\nA\r\nfirst half\r\n2\r\n\n\n\r\n"
    tail = b"0\r\nX-Trailer: y\r\n\r\n"

    async def handler(script, reader, writer, n):
        await script.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)  # the splice is in place before the body comes
        await _write_pieces(writer, chunks + tail, step)
        await asyncio.sleep(1)

    async def check(pool, s):
        got = []
        resp = await pool.request("GET", s.url + "/", {}, None)
        await resp.splice(lambda data: got.append(data) or 0, asyncio.sleep, chunked=True)
        resp.release()
        out = b"".join(got)
        assert dechunk(out + b"0\r\n\r\n") == b"data: 1data: a longer event herefirst half\n\n"
        if step == 100000:  # one read: the chunks before the unusual one went out byte for byte
            assert out.startswith(b"7\r\ndata: 1\r\n")

    serve(handler, check)


def test_content_length_beside_chunked_is_dropped():
    async def handler(script, reader, writer, n):
        await script.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def check(pool, s):
        resp, data = await _get(pool, s.url)
        assert data == b"hello" and "Content-Length" not in resp.headers

    serve(handler, check)
