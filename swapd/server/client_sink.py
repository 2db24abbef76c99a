"""The one place swapd writes to a client's socket around aiohttp's response writer.

Why: a streamed answer (an event stream of tokens) is relayed by the
upstream client's splice, which hands each read's bytes to a sink straight
from the backend connection's ``buffer_updated``: no task step and no
``await response.write()`` per chunk. ``StreamResponse.write`` is a
coroutine; calling it per token costs a task wake-up and roughly a third of
the relay's CPU per chunk (docs/performance.md).

What it relies on, and the test that fails if a new aiohttp breaks it
(tests/test_client_sink.py):

- after ``await response.prepare(request)`` the status line and headers are
  written, and nothing aiohttp holds back is waiting to go out (the writer
  has no buffered body bytes of its own);
- with chunked framing (HTTP/1.1 without a length; aiohttp then sets
  ``Transfer-Encoding: chunked`` in the prepared headers) the bytes written
  here must be whole chunks, and
  ``await response.write_eof()`` then writes only the last chunk;
- HTTP/1.0 clients get the raw body, ended by closing the connection;
- no compression is enabled on the response (swapd never calls
  ``enable_compression`` on a relayed response).

Only public APIs are used (``request.transport``, ``asyncio.Transport``'s
write and buffer-size calls), but the contract above is aiohttp's behaviour,
not a documented promise, so pyproject.toml bounds aiohttp to the releases
it was checked on.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from swapd.server.upstream import SINK_FULL, SINK_GONE

AIOHTTP_CHECKED = ((3, 10), (3, 14))  # first and last minor release the contract was tested on


def client_sink(request: web.Request, response: web.StreamResponse) -> tuple[Callable[[bytes], int], bool] | None:
    """A sink for ``UpstreamResponse.splice`` and whether it must write chunked framing; None if unusable.

    ``response`` must be prepared. The sink writes body bytes, already
    framed, to the client's socket and reports back-pressure.
    """
    transport = request.transport
    if transport is None or not response.prepared:
        return None
    high = transport.get_write_buffer_limits()[1]
    write = transport.write
    buffered = transport.get_write_buffer_size
    is_closing = transport.is_closing

    def sink(data: bytes) -> int:
        if is_closing():
            return SINK_GONE
        write(data)
        return SINK_FULL if buffered() > high else 0

    return sink, response.headers.get("Transfer-Encoding", "").lower() == "chunked"
