"""The one place swapd writes around aiohttp's response writer (swapd/server/client_sink.py).

The splice writes framed body bytes straight to the client's transport after
``response.prepare()``, and relies on aiohttp's writer behaving as it did on
the releases listed in ``AIOHTTP_CHECKED``. These tests fail when that stops
being true: on an aiohttp outside the checked range (check the contract, then
widen the range and pyproject.toml's bound), or when the framing a real client
parses is broken.
"""

from __future__ import annotations

import json
import socket

import aiohttp
import httptools

from helpers import model
from swapd.server.client_sink import AIOHTTP_CHECKED


def test_aiohttp_is_a_release_the_contract_was_checked_on():
    version = tuple(int(part) for part in aiohttp.__version__.split(".")[:2])
    first, last = AIOHTTP_CHECKED
    assert first <= version <= last, (
        f"aiohttp {aiohttp.__version__} is outside {first}..{last}: re-check swapd/server/client_sink.py's "
        "contract (prepare() flushes the head, write_eof() adds only the last chunk), then widen the range"
    )


class _Collect:
    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def _stream_through(port: int, version: str) -> tuple[_Collect, bytes]:
    body = json.dumps({"model": "m1", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST /v1/chat/completions HTTP/{version}\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    sock.settimeout(30)
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    sock.close()
    out = _Collect()
    parser = httptools.HttpResponseParser(out)
    parser.feed_data(raw)  # llhttp, strict: raises on any framing error
    return out, raw


def test_a_spliced_stream_is_valid_chunked_framing_to_a_strict_parser(swapd):
    s = swapd({"m1": model("--chunks", "50")})
    out, raw = _stream_through(s.port, "1.1")
    assert out.headers[b"transfer-encoding"] == b"chunked"
    assert out.complete, "the last chunk (written by aiohttp's write_eof) is missing"
    assert raw.endswith(b"0\r\n\r\n") and raw.count(b"0\r\n\r\n") == 1
    events = [line for line in out.body.split(b"\n") if line.startswith(b"data: ")]
    assert len(events) == 52 and events[-1] == b"data: [DONE]"


def test_a_spliced_stream_to_an_http10_client_is_raw_until_close(swapd):
    s = swapd({"m1": model("--chunks", "20")})
    out, raw = _stream_through(s.port, "1.0")
    assert b"transfer-encoding" not in out.headers
    head, _, body = raw.partition(b"\r\n\r\n")
    assert body.endswith(b"data: [DONE]\n\n") and body.count(b"data: ") == 22
