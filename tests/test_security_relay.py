"""Security items 1–4 of the security issue, each against a real swapd (items 6 and 8: test_security_web.py)."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time

import psutil

from helpers import model, wait_until
from test_compat import peer_backend  # noqa: F401  (a fixture: a fake backend swapd did not start)
from test_relay_hostile import hostile, seen

# -- 1. idle connections are bounded ----------------------------------------------------


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_silent_connections_are_closed_at_the_header_deadline_under_a_low_fd_limit(swapd):
    s = swapd({"m1": model()}, clientLimits={"headerTimeout": 1})
    psutil.Process(s.proc.pid).rlimit(psutil.RLIMIT_NOFILE, (256, 256))
    socks = []
    for _ in range(300):  # more than swapd has descriptors for
        sock = socket.socket()
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", s.port))
        except OSError:
            sock.close()
            continue
        socks.append(sock)
    try:
        wait_until(lambda: all(_closed_by_peer(x) for x in socks), timeout=15,
                   message="swapd to close connections that sent nothing")
        # the descriptors are back: swapd serves again
        wait_until(lambda: s.get("/health", timeout=5).status == 200, timeout=15, message="/health")
        assert s.chat("m1").status == 200
    finally:
        for sock in socks:
            sock.close()


def test_a_partial_request_pipelined_behind_a_complete_one_is_closed_at_the_keepalive_timeout(swapd):
    s = swapd({"m1": model()}, clientLimits={"headerTimeout": 30, "keepaliveTimeout": 2})
    sock = socket.create_connection(("127.0.0.1", s.port))
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHo")
    sock.settimeout(1)
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    t0 = time.monotonic()
    wait_until(lambda: _closed_by_peer(sock), timeout=10, message="the keep-alive timeout to close it")
    assert time.monotonic() - t0 < 8  # 2 s configured; aiohttp's default would be an hour
    sock.close()


# -- 2. swapd's key stays in swapd -------------------------------------------------------


def test_swapds_key_reaches_no_backend_and_no_peer(swapd, peer_backend):  # noqa: F811
    s = swapd(
        {"plain": model(), "keyed": model(apiKey="sk-backend-own")},
        apiKeys=["sk-swapd-secret"],
        peers={"remote": {"proxy": f"http://127.0.0.1:{peer_backend}", "models": ["big"]}},  # no apiKey
    )
    body = {"x_echo": True, "messages": []}
    for header in ({"Authorization": "Bearer sk-swapd-secret"}, {"x-api-key": "sk-swapd-secret"},
                   {"Authorization": "Bearer sk-swapd-secret", "x-api-key": "sk-swapd-secret"}):
        for name in ("plain", "keyed", "remote/big"):
            r = s.post("/v1/chat/completions", {**body, "model": name}, headers=header)
            assert r.status == 200, r.body
            got = r.json()["x_headers"]
            assert "sk-swapd-secret" not in json.dumps(got), (name, got)
            if name == "keyed":  # a backend with its own key gets that key instead
                assert got["Authorization"] == "Bearer sk-backend-own" and got["x-api-key"] == "sk-backend-own"
            else:  # the plain backend and the keyless peer get no credential at all
                assert not {k.lower() for k in got} & {"authorization", "x-api-key"}, got
    # /upstream too
    r = s.get("/upstream/plain/x/headers", headers={"Authorization": "Bearer sk-swapd-secret"})
    assert r.status == 200 and "sk-swapd-secret" not in r.body.decode()


def test_without_api_keys_a_clients_authorization_still_reaches_a_local_backend(swapd):
    """llama-swap forwards the header; with no swapd keys it is the client's, not swapd's."""
    s = swapd({"plain": model()})
    r = s.post("/v1/chat/completions", {"model": "plain", "x_echo": True, "messages": []},
               headers={"Authorization": "Bearer for-the-backend"})
    assert r.json()["x_headers"]["Authorization"] == "Bearer for-the-backend"


# -- 3. large bodies are bounded --------------------------------------------------------


def _start_upload(port: int, model_id: str, total: int, first: bytes | None = None) -> socket.socket:
    prefix = first if first is not None else json.dumps({"model": model_id, "messages": [], "pad": ""})[:-2].encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (total, prefix))
    return sock


def _answer_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_a_model_at_its_limit_refuses_a_large_body_before_reading_it(swapd):
    s = swapd({"m1": model("--interval", "0.5", "--chunks", "20", concurrencyLimit=1)})
    assert s.chat("m1").status == 200
    streaming = threading.Thread(target=lambda: s.stream("m1", timeout=30), daemon=True)
    streaming.start()
    wait_until(lambda: s.running()["m1"]["in_flight"] == 1, message="the stream to hold the only slot")
    sock = _start_upload(s.port, "m1", 100 * 1024 * 1024)  # 100 MiB declared, a few bytes sent
    head = _answer_head(sock)
    sock.close()
    assert head.startswith(b"HTTP/1.1 429"), head[:200]
    assert b"retry-after: 1" in head.lower()


def test_the_body_budget_refuses_with_503_and_frees_its_bytes(swapd):
    s = swapd({"m1": model()}, clientLimits={"maxBodyBytesInFlight": "1MiB"})
    holding = _start_upload(s.port, "m1", 800 * 1024)  # held: its body has not all come
    time.sleep(0.3)
    second = _start_upload(s.port, "m1", 800 * 1024)
    head = _answer_head(second)
    second.close()
    assert head.startswith(b"HTTP/1.1 503"), head[:200]
    assert b"retry-after: 1" in head.lower() and b"body_budget_exceeded" in head + second_body(head)
    holding.close()  # its bytes go back to the budget
    big = json.dumps({"model": "m1", "messages": [{"role": "user", "content": "x" * (700 * 1024)}]})
    wait_until(lambda: s.post("/v1/chat/completions", json.loads(big)).status == 200, timeout=10,
               message="the budget to be free again")


def second_body(head: bytes) -> bytes:
    return head.partition(b"\r\n\r\n")[2]


def test_a_large_body_is_relayed_whole_and_unchanged(swapd):
    content = "é" * (3 * 1024 * 1024)  # 6 MiB of UTF-8: over the inline-parse size
    s = swapd({"m1": model()})
    body = {"model": "m1", "x_echo": True, "messages": [{"role": "user", "content": content}]}
    r = s.post("/v1/chat/completions", body, timeout=60)
    assert r.status == 200, r.body[:300]
    raw = json.dumps(body).encode()
    assert r.json()["x_body_sha256"] == hashlib.sha256(raw).hexdigest()


def test_a_large_body_with_filters_is_rewritten(swapd):
    s = swapd({"m1": model(filters={"setParams": {"temperature": 0.25}}, useModelName="renamed")})
    body = {"model": "m1", "x_echo": True, "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
    r = s.post("/v1/chat/completions", body, timeout=60)
    assert r.status == 200, r.body[:300]
    expected = json.dumps({**body, "model": "renamed", "temperature": 0.25}).encode()
    assert r.json()["x_body_sha256"] == hashlib.sha256(expected).hexdigest()


def test_a_large_invalid_body_is_a_400(swapd):
    s = swapd({"m1": model()})
    raw = b'{"model": "m1", "messages": "' + b"x" * (2 * 1024 * 1024) + b'", }'
    sock = _start_upload(s.port, "m1", len(raw), first=raw)
    head = _answer_head(sock)
    sock.close()
    assert head.startswith(b"HTTP/1.1 400"), head[:200]
    assert b"invalid_json" in head


# -- 4. /upstream keeps the query exactly as sent ----------------------------------------


def test_upstream_forwards_the_raw_query_string(swapd):
    s = swapd({"m": hostile()})
    query = "s=%20HTTP/1.1%0d%0aX-Injected:%20yes&n=%00&h=%23frag&plus=a+b"
    r = s.get(f"/upstream/m/echo?{query}")
    assert r.status == 200, r.body
    lines = seen(s)["lines"]
    assert f"GET /echo?{query} HTTP/1.1" in lines, lines
    assert not any("X-Injected" in line and "%" not in line for line in lines)
    # and the redirect to the trailing slash keeps it too
    r = s.request("GET", f"/upstream/m?{query}")
    assert r.status == 301 and r.headers["location"] == f"/upstream/m/?{query}", r.headers
