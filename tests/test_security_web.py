"""Web-facing security: library logs through swapd's redaction, Host and Origin checks."""

from __future__ import annotations

import io
import json
import logging
import socket
import time

import structlog

from helpers import model
from swapd import logging as slog

SECRET = "sk-sec-7f3a9c1e5b2d"


def _bare_lf_request(port: int, path: str = "/running") -> bytes:
    """One request whose lines end in a bare LF, which aiohttp's parser rejects."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\nHost: x\nAuthorization: Bearer {SECRET}\n"
            f"X-Api-Key: {SECRET}\nCookie: session={SECRET}\n\n".encode()
        )
        got = b""
        try:
            while chunk := sock.recv(4096):
                got += chunk
        except OSError:
            pass
        return got


def test_malformed_requests_log_one_redacted_json_line_per_kind(swapd):
    s = swapd({"m1": model()}, apiKeys=[SECRET], split_stdout=True)
    for _ in range(200):
        reply = _bare_lf_request(s.port)
        assert reply.startswith(b"HTTP/1.") and b" 400 " in reply.split(b"\r\n", 1)[0], reply[:200]
    assert s.get("/health").status == 200  # still serving
    time.sleep(0.5)  # let the last lines be written
    s.terminate()
    out, err = s.stdout_text(), s.log_text()
    assert SECRET not in out and SECRET not in err
    lines = [line for line in (out + err).splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(e, dict) for e in events)
    assert len(out) + len(err) < 8000, f"{len(out) + len(err)} bytes of log for 200 bad requests"
    server = [e for e in events if e["event"] == "aiohttp.server"]
    assert 1 <= len(server) <= 3, server
    assert "BadStatusLine" in server[0]["error"] and "[redacted]" in server[0]["error"]
    assert "Traceback" not in out + err


def _bridge_lines(window: float, records) -> list[str]:
    stream = io.StringIO()
    slog.configure("info", "json", stream=stream)
    bridge = slog.route_stdlib()
    saved = bridge.window
    bridge.window = window
    try:
        records()
    finally:
        bridge.window = saved
        structlog.reset_defaults()
    return stream.getvalue().splitlines()


def test_library_log_flood_is_cut_to_one_line_per_window_with_a_count():
    lib = logging.getLogger("aiohttp.server")

    def records():
        for _ in range(50):
            try:
                raise ValueError(f"bad header line\nAuthorization: Bearer {SECRET}\ncookie={SECRET}")
            except ValueError:
                lib.exception("Error handling request from %s", "10.0.0.1")
        logging.getLogger("asyncio").warning("socket.send() raised exception. token=%s", SECRET)
        time.sleep(0.3)
        try:
            raise ValueError("again")
        except ValueError:
            lib.exception("Error handling request from %s", "10.0.0.2")

    lines = _bridge_lines(0.2, records)
    assert SECRET not in "\n".join(lines)
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["aiohttp.server", "asyncio", "aiohttp.server"], events
    first, other, later = events
    assert first["level"] == "error" and first["error"].startswith("ValueError: bad header line")
    assert "suppressed" not in first
    assert other["level"] == "warning" and "token=[redacted]" in other["message"]
    assert later["suppressed"] == 49


def test_redact_text_covers_headers_in_every_spelling():
    samples = [
        f"b'GET / HTTP/1.1\\nAuthorization: Bearer {SECRET}\\n'",
        f"<CIMultiDictProxy('Host': 'x', 'Authorization': 'Basic {SECRET}', 'x-api-key': '{SECRET}')>",
        f"Cookie: a=1; b={SECRET}\r\nProxy-Authorization: {SECRET}",
        f"GET /v1/models?api_key={SECRET}&x=1",
        f"curl -H 'Authorization: Bearer {SECRET}'",
    ]
    for text in samples:
        assert SECRET not in slog.redact_text(text), text
    assert slog.redact_text("Error handling request from 127.0.0.1") == "Error handling request from 127.0.0.1"
