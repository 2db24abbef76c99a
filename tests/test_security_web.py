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


# -- Host allowlist (DNS rebinding) and cross-site requests ---------------------

GUARDED = [("GET", "/running"), ("GET", "/logs"), ("GET", "/unload"), ("POST", "/v1/chat/completions")]
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}


def _call(s, method, path, headers):
    body = CHAT if method == "POST" else None
    return s.request(method, path, body=body, headers=headers)


def test_foreign_host_is_refused_without_keys(swapd):
    s = swapd({"m1": model()})
    for method, path in GUARDED:
        r = _call(s, method, path, {"Host": "attacker.example"})
        assert r.status == 403, (path, r.status, r.body)
        error = r.json()["error"]
        assert error["code"] == "host_not_allowed" and "allowedHosts" in error["message"]
        assert _call(s, method, path, {"Host": "attacker.example:8080"}).status == 403
    for host in ("localhost", "localhost:1234", "127.0.0.1", f"127.0.0.1:{s.port}", "[::1]:9", "gpubox",
                 "app.localhost", "gpubox.local:8080", "10.1.2.3", "LOCALHOST."):
        for method, path in GUARDED:
            r = _call(s, method, path, {"Host": host})
            assert r.status == 200, (host, path, r.status, r.body)
    assert s.get("/health", headers={"Host": "attacker.example"}).status == 200  # load balancers


def test_allowed_hosts_adds_names(swapd):
    s = swapd({"m1": model()}, allowedHosts=["swapd.example.org", ".lab.example"])
    for host in ("swapd.example.org", "SWAPD.example.org:443", "gpu1.lab.example", "lab.example"):
        assert s.get("/running", headers={"Host": host}).status == 200, host
    for host in ("attacker.example", "swapd.example.org.attacker.example", "xlab.example"):
        assert s.get("/running", headers={"Host": host}).status == 403, host


def test_allowed_hosts_star_switches_the_check_off(swapd):
    s = swapd({"m1": model()}, allowedHosts=["*"])
    assert s.get("/running", headers={"Host": "anything.example"}).status == 200


def test_with_api_keys_the_key_is_the_defence_not_the_host(swapd):
    s = swapd({"m1": model()}, apiKeys=["sk-k"])
    assert s.get("/running", headers={"Host": "attacker.example"}).status == 401
    r = s.get("/running", headers={"Host": "swapd.example.org", "Authorization": "Bearer sk-k"})
    assert r.status == 200


def test_cross_site_simple_posts_are_refused(swapd):
    s = swapd({"m1": model()})
    body = b'{"model": "m1", "messages": [{"role": "user", "content": "hi"}]}'
    foreign = {"Origin": "http://attacker.example"}
    for ctype in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", None):
        headers = dict(foreign, **({"Content-Type": ctype} if ctype else {}))
        r = s.post("/v1/chat/completions", body, headers=headers)
        assert r.status == 403, (ctype, r.status, r.body)
        assert r.json()["error"]["code"] == "cross_site_request"
    assert s.post("/api/models/unload", b"", headers=foreign).status == 403
    assert s.post("/api/models/unload", b"", headers={"Origin": "null"}).status == 403
    assert s.get("/unload", headers=foreign).status == 403
    assert s.get("/unload", headers={"Sec-Fetch-Site": "cross-site"}).status == 403
    multipart = {"Content-Type": "multipart/form-data; boundary=b"}
    form = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nm1\r\n--b--\r\n'
    assert s.post("/v1/audio/transcriptions", form, headers=dict(foreign, **multipart)).status == 403
    # Reading is not a state change: a foreign page may still GET what CORS lets it.
    assert s.get("/v1/models", headers=foreign).status == 200


def test_same_origin_no_origin_and_preflighted_requests_pass(swapd):
    s = swapd({"m1": model()})
    body = b'{"model": "m1", "messages": [{"role": "user", "content": "hi"}]}'
    same = {"Origin": f"http://127.0.0.1:{s.port}"}
    assert s.post("/v1/chat/completions", body, headers=dict(same, **{"Content-Type": "text/plain"})).status == 200
    assert s.post("/v1/chat/completions", body, headers={"Content-Type": "text/plain"}).status == 200  # curl, SDKs
    json_ct = {"Content-Type": "application/json", "Origin": "http://ui.example"}
    assert s.post("/v1/chat/completions", body, headers=json_ct).status == 200  # preflighted: CORS stays open
    bearer = {"Content-Type": "text/plain", "Origin": "http://ui.example", "Authorization": "Bearer x"}
    assert s.post("/v1/chat/completions", body, headers=bearer).status == 200
    # Multipart from a script (no Origin) is how transcription clients talk.
    form = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nm1\r\n--b--\r\n'
    r = s.post("/v1/audio/transcriptions", form, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status != 403, r.body
    assert s.get("/unload", headers=same).status == 200
    # Behind a proxy that passes the Host without its port (nginx's $host), the names must match.
    proxied = {"Host": "swapd.example.org", "Origin": "https://swapd.example.org:8443", "Content-Type": "text/plain"}
    s2 = {"Host": "localhost", "Origin": "http://localhost:8443", "Content-Type": "text/plain"}
    assert s.post("/api/models/unload", b"", headers=s2).status == 200
    assert s.post("/api/models/unload", b"", headers=dict(proxied, Host="other.localhost")).status == 403
    assert s.get("/unload", headers={"Sec-Fetch-Site": "same-origin"}).status == 200


def test_echoed_origin_comes_with_vary(swapd):
    # every answer to an Origin carries CORS headers now (swapd.server.cors, tests/test_cors.py), not only
    # /v1/models; the default policy answers "*", and the answer varies by Origin since one without gets none
    s = swapd({"m1": model()})
    r = s.get("/v1/models", headers={"Origin": "http://ui.example"})
    assert r.headers["access-control-allow-origin"] == "*"
    assert "origin" in r.headers["vary"].lower()
    assert "access-control-allow-origin" not in s.get("/v1/models").headers
    pre = s.request("OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert pre.status == 204 and "access-control-request-headers" in pre.headers["vary"].lower()


def test_config_rejects_bad_allowed_hosts(tmp_path):
    import subprocess

    from helpers import PY, ROOT
    for entry, words in (("http://x.example", "not a URL"), ("x.example:8080", "without a port"), ("", "empty")):
        path = tmp_path / "c.yaml"
        path.write_text(f'allowedHosts: ["{entry}"]\nmodels:\n  m1:\n    cmd: sleep 1\n    proxy: http://127.0.0.1:9\n')
        done = subprocess.run([PY, "-m", "swapd", "--config", str(path), "--listen", "127.0.0.1:1"],
                              cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, done
        assert str(path) in done.stderr and "allowedHosts[0]" in done.stderr and words in done.stderr, done.stderr


def _startup_events(tmp_path, listen: str, **top) -> list[dict]:
    """Start swapd on ``listen``, wait for swapd.listening, stop it; return its JSON log events."""
    import subprocess

    from helpers import PY, ROOT, wait_until, write_config
    path = write_config(tmp_path / "listen.yaml", {"m1": model()}, "sec-listen", **top)
    log = tmp_path / "listen.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PY, "-m", "swapd", "--config", str(path), "--listen", listen, "--log-format", "json"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_until(lambda: proc.poll() is not None or b"swapd.listening" in log.read_bytes(), timeout=20,
                       message="swapd.listening")
            time.sleep(0.2)
        finally:
            proc.terminate()
            proc.wait(20)
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def test_listening_without_keys_beyond_loopback_warns(tmp_path):
    from helpers import free_port

    wide = _startup_events(tmp_path, f"0.0.0.0:{free_port()}")
    warned = [e for e in wide if e["event"] == "swapd.unprotected"]
    assert len(warned) == 1 and warned[0]["level"] == "warning" and "apiKeys" in warned[0]["detail"]
    keyed = _startup_events(tmp_path, f":{free_port()}", apiKeys=["sk-k"])
    assert "swapd.listening" in {e["event"] for e in keyed}
    assert "swapd.unprotected" not in {e["event"] for e in keyed}
    local = _startup_events(tmp_path, f"127.0.0.1:{free_port()}")
    assert "swapd.listening" in {e["event"] for e in local}
    assert "swapd.unprotected" not in {e["event"] for e in local}
