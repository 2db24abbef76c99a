"""The relay through swapd's own upstream client: keep-alive, framing for each kind of client, backpressure."""

from __future__ import annotations

import json
import socket
import time

import psutil

from helpers import PY, backend_stats, dechunk, model, wait_until


def _backend_port(s, model_id: str) -> int:
    return int(s.running()[model_id]["proxy"].rsplit(":", 1)[1])


def _raw_request(port: int, request: bytes, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    return sock


def _chat_request(model_id: str, version: str = "1.1", **extra) -> bytes:
    """A chat request after which the connection closes (HTTP/1.0 closes by default)."""
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "hi"}], **extra}).encode()
    close = "Connection: close\r\n" if version == "1.1" else ""
    return (
        f"POST /v1/chat/completions HTTP/{version}\r\nHost: x\r\n{close}Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _read_all(sock: socket.socket, timeout: float = 30) -> bytes:
    sock.settimeout(timeout)
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def test_backend_connections_are_kept_alive(swapd):
    s = swapd({"m1": model()})
    assert s.chat("m1").status == 200
    port = _backend_port(s, "m1")
    before = backend_stats(port)
    for _ in range(20):
        assert s.chat("m1").status == 200
    for _ in range(5):
        status, _, events = s.stream("m1")
        assert status == 200 and events[-1][1] == "[DONE]"
    after = backend_stats(port)
    # 25 requests through swapd plus the second stats call
    assert after["requests"] - before["requests"] == 26
    # that stats call's own connection, at most one more for the 20 plain answers (swapd reused it),
    # and one per stream: after an event stream the connection is retired (llama-server may close it)
    assert after["connections"] - before["connections"] <= 2 + 5, (before, after)
    assert after["connections"] - before["connections"] >= 5, (before, after)


def test_http10_client_gets_the_stream_raw_until_close(swapd):
    s = swapd({"m1": model("--chunks", "4")})
    sock = _raw_request(s.port, _chat_request("m1", version="1.0", stream=True))
    data = _read_all(sock)  # HTTP/1.0 without keep-alive: swapd closes after the body
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0]
    assert b"transfer-encoding" not in head.lower()
    events = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]" and len(events) == 6, body[:500]
    contents = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert contents[:4] == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]


def test_http11_stream_is_valid_chunked_framing(swapd):
    s = swapd({"m1": model("--chunks", "30")})
    sock = _raw_request(s.port, _chat_request("m1", stream=True))
    data = _read_all(sock)
    sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    body = dechunk(rest)
    events = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert len(events) == 32 and events[-1] == b"[DONE]"


def test_slow_reader_pauses_the_backend_instead_of_filling_swapd(swapd):
    """A client that stops reading holds the backend back; swapd does not buffer the stream."""
    n = 150_000  # about 30 MB of events: more than every socket buffer on the way
    s = swapd({"m1": model("--quiet")})
    s.chat("m1")
    swapd_proc = psutil.Process(s.proc.pid)
    rss_before = swapd_proc.memory_info().rss
    sock = _raw_request(s.port, _chat_request("m1", stream=True, max_tokens=n), rcvbuf=256 * 1024)
    port = _backend_port(s, "m1")
    wait_until(lambda: backend_stats(port)["streams_started"] == 1, timeout=10, message="the stream to start")
    time.sleep(3)  # the backend alone would finish in well under this... if it were not held back
    stats = backend_stats(port)
    assert stats["streams_completed"] == 0 and stats["in_flight"] == 1, stats
    grown = swapd_proc.memory_info().rss - rss_before
    assert grown < 16 * 1024 * 1024, f"swapd grew {grown} bytes while its client was not reading"
    data = _read_all(sock, timeout=120)
    sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    body = dechunk(rest)
    assert body.count(b"data: ") == n + 2 and body.endswith(b"data: [DONE]\n\n")
    wait_until(lambda: backend_stats(port)["streams_completed"] == 1, timeout=10, message="the stream to complete")


_NOT_HTTP_BACKEND = """
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen()
while True:
    conn, _ = srv.accept()
    request = conn.recv(65536)
    if request.startswith(b"GET /health"):
        conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok")
    else:
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\\r\\n\\r\\n")
    conn.close()
"""


def test_backend_that_does_not_speak_http_gets_a_clear_502(swapd, tmp_path):
    script = tmp_path / "not_http.py"
    script.write_text(_NOT_HTTP_BACKEND)
    s = swapd({"m1": {"cmd": f"{PY} {script} ${{PORT}}", "proxy": "http://127.0.0.1:${PORT}"}})
    r = s.chat("m1")
    assert r.status == 502, r.body
    error = r.json()["error"]
    assert error["code"] == "backend_bad_response" and "invalid response" in error["message"], error
    assert "SSH-2.0" in error["message"]
    assert s.get("/health").status == 200
