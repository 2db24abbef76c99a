"""Defects a hostile backend and a slow client found in the relay (issue 11), each against a real swapd.

The backend is tests/hostile_backend.py, a real process that answers each
path with bytes a well-behaved server would never send. Every answer that
cannot be relayed unchanged must become a 502 ``backend_bad_response`` at
once: no hang, no 500, no traceback, nothing injected into the client's
headers, and swapd keeps serving.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time
from pathlib import Path

import pytest

from helpers import PY, model, wait_until

HOSTILE = Path(__file__).resolve().parent / "hostile_backend.py"


def hostile(**keys) -> dict:
    return {"cmd": f"{PY} {HOSTILE} ${{PORT}}", "proxy": "http://127.0.0.1:${PORT}", **keys}


def seen(s) -> dict:
    r = s.get("/upstream/m/x/seen")
    assert r.status == 200, r.body
    return r.json()


@pytest.mark.parametrize(
    "path, says",
    [
        ("/bare-cr", "LF"),
        ("/lf-in-value", ""),
        ("/nul", "header value char"),
        ("/length-superscript", "Content-Length"),
        ("/length-huge", "Content-Length"),
        ("/bare-lf", "CR"),
        ("/latin1", "not UTF-8"),
        ("/two-te", "Transfer-Encoding"),
        ("/continues", "interim"),
    ],
)
def test_a_reply_that_cannot_be_relayed_unchanged_is_a_502_at_once(swapd, path, says):
    s = swapd({"m": hostile()})
    t0 = time.monotonic()
    r = s.post(f"/upstream/m{path}", {"x": 1}, timeout=20)
    assert time.monotonic() - t0 < 10, "the request hung"
    assert r.status == 502, (r.status, r.body)
    error = r.json()["error"]
    assert error["code"] == "backend_bad_response", error
    assert says in error["message"], error
    assert not any(k.lower() == "x-injected" for k in r.headers), r.headers
    assert "Traceback" not in s.log_text() and "internal error" not in s.log_text()
    line = [e for e in s.log_events() if e.get("event") == "request" and e.get("path", "").endswith(path)][-1]
    assert line["status"] == 502 and line["outcome"] != "client_disconnected", line
    assert s.get("/health").status == 200
    assert s.post("/upstream/m/fine", {"x": 1}).status == 200  # and the model still serves


def test_valid_utf8_header_bytes_arrive_exactly(swapd):
    s = swapd({"m": hostile()})
    sock = socket.create_connection(("127.0.0.1", s.port))
    sock.sendall(b"POST /upstream/m/utf8 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    data = b""
    sock.settimeout(10)
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    assert b' 200 ' in data.split(b"\r\n")[0]
    assert 'filename="café.txt"'.encode() in data  # the backend's bytes, unchanged


def test_http10_reply_with_transfer_encoding_closes_its_connection(swapd):
    s = swapd({"m": hostile()})
    for _ in range(3):
        r = s.post("/upstream/m/http10-te", {"x": 1})
        assert r.status == 200 and r.body == b"{}", r.body
    # RFC 9112 6.1: never reused, so each request came on a connection of its own
    assert seen(s)["connections"]["/http10-te"] == 3


def test_a_post_the_backend_took_is_never_sent_twice(swapd):
    """The backend reads the whole POST on a kept-alive connection, then hangs up unanswered."""
    s = swapd({"m": hostile()})
    assert s.chat("m").status == 200  # a JSON body: sent whole, on a pooled connection
    r = s.chat("m")
    assert r.status == 502, r.body
    assert seen(s)["requests"]["/v1/chat/completions"] == 2  # once each: the second was not re-sent


def _upload(port: int, head: bytes, pieces: list[bytes], gap: float) -> tuple[bytes, bool]:
    """Send a request's head, then its body piece by piece; return the answer and whether swapd closed."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(30)
    sock.sendall(head)
    try:
        for piece in pieces:
            time.sleep(gap)
            sock.sendall(piece)
    except OSError:
        pass
    data = b""
    closed = False
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                closed = True
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head_end = data.index(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in data[:head_end].split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(data) >= head_end + 4 + length[0]:
                    sock.settimeout(8)  # the answer is complete: swapd closes after at most its lingering time
    except TimeoutError:
        pass
    finally:
        sock.close()
    return data, closed


def test_a_slow_but_live_upload_is_never_cut_by_the_header_deadline(swapd):
    """headerTimeout 1 s; 12 uploads whose bodies take about 1.8 s each, in 200-byte pieces."""
    s = swapd({"m1": model(concurrencyLimit=20)}, clientLimits={"headerTimeout": 1, "bodyIdleTimeout": 10})
    assert s.chat("m1").status == 200
    body = json.dumps({"model": "m1", "messages": [{"role": "user", "content": "x" * 2300}]}).encode()
    pieces = [body[i:i + 200] for i in range(0, len(body), 200)]
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: _upload(s.port, head, pieces, 0.15), range(12)))
    for data, _ in results:
        assert data.startswith(b"HTTP/1.1 200"), data[:300]


def test_a_stalled_streamed_upload_is_the_clients_408_and_closes_the_connection(swapd):
    s = swapd({"m1": model()}, clientLimits={"bodyIdleTimeout": 1})
    head = (b"POST /upstream/m1/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")
    data, closed = _upload(s.port, head, [b'{"model": "m1", '], 0.0)
    assert data.startswith(b"HTTP/1.1 408"), data[:300]
    assert b'"request_timeout"' in data and b"backend" not in data.split(b"\r\n\r\n", 1)[1]
    assert b"connection: close" in data.lower().split(b"\r\n\r\n")[0]
    assert closed
    assert s.get("/health").status == 200


def test_an_oversized_streamed_upload_is_the_clients_413_and_closes_the_connection(swapd):
    s = swapd({"m1": model()}, clientLimits={"maxBodyMB": 1})
    head = (b"POST /upstream/m1/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * 65536
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    data, closed = _upload(s.port, head, [chunk] * 24, 0.0)
    assert data.startswith(b"HTTP/1.1 413"), data[:300]
    assert b'"request_too_large"' in data
    assert b"connection: close" in data.lower().split(b"\r\n\r\n")[0]
    assert closed
    wait_until(lambda: s.get("/health").status == 200, message="swapd to keep serving")


def test_unknown_model_names_the_closest_id_and_every_refusal_is_logged(swapd):
    s = swapd({"qwen2.5-coder": model()})
    r = s.chat("qwen2.5-codr")
    assert r.status == 404
    assert r.json()["error"]["message"] == "model 'qwen2.5-codr' not found; did you mean 'qwen2.5-coder'?"
    assert "did you mean" not in s.chat("completely-different").json()["error"]["message"]
    assert s.post("/v1/chat/completions", b"{not json").status == 400
    events = [e for e in s.log_events() if e.get("event") == "request"]
    assert [(e["status"], e["path"]) for e in events] == [(404, "/v1/chat/completions")] * 2 + [
        (400, "/v1/chat/completions")], events


def test_refusals_by_the_access_checks_are_logged_too(swapd):
    s = swapd({"m1": model()}, apiKeys=["sk-right"])
    assert s.chat("m1").status == 401
    assert s.get("/running", headers={"Authorization": "Bearer sk-wrong"}).status == 401
    events = [e for e in s.log_events() if e.get("event") == "request"]
    assert [(e["status"], e["path"]) for e in events] == [(401, "/v1/chat/completions"), (401, "/running")], events
    assert "sk-wrong" not in s.log_text()
