"""llama-swap compatibility: routes, auth, filters, peers, groups and the FIFO scheduler.

Ported from the behaviours llama-swap's own server, router and scheduler
tests check, run here against swapd and fake backends as real processes.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import signal
import subprocess
import threading
import time

import psutil
import pytest

from helpers import PY, ROOT, free_port, model, wait_until


def _events(s, name):
    return [e for e in s.log_events() if e.get("event") == name]


def _starts(s):
    return [e["model"] for e in _events(s, "backend.start")]


def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _threads(*targets):
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    return threads


# -- API keys and CORS ---------------------------------------------------------


def test_api_keys_from_bearer_basic_and_x_api_key(swapd):
    s = swapd({"m1": model()}, apiKeys=["sk-right", "sk-other"])
    no_key = s.get("/v1/models")
    assert no_key.status == 401
    assert no_key.headers["www-authenticate"].startswith("Basic")
    assert no_key.json()["error"]["type"] == "authentication_error"
    assert s.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"}).status == 401
    assert s.chat("m1").status == 401
    assert s.get("/running").status == 401
    assert s.get("/unload").status == 401
    basic = base64.b64encode(b"anyone:sk-other").decode()
    for headers in ({"Authorization": "Bearer sk-right"}, {"x-api-key": "sk-right"}, {"Authorization": f"Basic {basic}"}):
        assert s.get("/v1/models", headers=headers).status == 200, headers
    r = s.post("/v1/chat/completions", {"model": "m1", "messages": []}, headers={"Authorization": "Bearer sk-right"})
    assert r.status == 200
    assert s.get("/health").status == 200, "health checks need no key"
    assert s.request("OPTIONS", "/v1/chat/completions").status == 204, "preflights need no key"
    assert "sk-right" not in s.log_text() and "sk-other" not in s.log_text()


def test_cors_preflight(swapd):
    s = swapd({"m1": model()})
    r = s.request("OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization, bad header",
    })
    assert r.status == 204
    assert r.headers["access-control-allow-origin"] == "*"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "content-type, authorization"
    plain = s.request("OPTIONS", "/anything", headers={"Origin": "http://ui.example"})
    assert plain.status == 204 and "Content-Type" in plain.headers["access-control-allow-headers"]
    # llama-swap (#1121, #1133) answers an OPTIONS without Origin with a bare 204, and every answer to an
    # Origin with its policy's value ("*" by default; tests/test_cors.py has the rest)
    assert not any(h.startswith("access-control-") for h in s.request("OPTIONS", "/anything").headers)
    listed = s.get("/v1/models", headers={"Origin": "http://ui.example"})
    assert listed.headers["access-control-allow-origin"] == "*"


# -- filters and model names -----------------------------------------------------


def test_filters_strip_set_and_by_id(swapd):
    s = swapd({
        "m1": model(
            aliases=["m1-fast"],
            useModelName="served",
            filters={
                "stripParams": "temperature, top_p, model",
                "setParams": {"top_k": 7, "extra": {"a": 1}},
                "setParamsByID": {"m1-precise": {"top_k": 1}, "m1": {"seed": 42}},
            },
        )
    })
    def echoed(name):
        r = s.post("/v1/chat/completions", {"model": name, "x_echo": True, "temperature": 0.9, "top_p": 0.5, "messages": []})
        assert r.status == 200, r.body
        return r.json()["x_body_json"]

    body = echoed("m1")
    assert body["model"] == "served", "useModelName rewrites; stripParams never removes model"
    assert "temperature" not in body and "top_p" not in body
    assert body["top_k"] == 7 and body["extra"] == {"a": 1} and body["seed"] == 42
    # setParamsByID keys are aliases, and their params override setParams
    precise = echoed("m1-precise")
    assert precise["top_k"] == 1 and "seed" not in precise
    assert echoed("m1-fast")["top_k"] == 7


def test_versionless_routes_forward_without_prefix(swapd):
    s = swapd({"m1": model()})
    r = s.post("/v/chat/completions", {"model": "m1", "x_echo": True, "messages": []})
    assert r.status == 200
    assert r.json()["x_path"] == "/chat/completions"


def test_query_model_routes(swapd):
    s = swapd({"m1": model()})
    r = s.get("/props?model=m1")
    # the fake backend has no /props, so its own 404 proves the request reached it
    assert r.status == 404 and r.json()["error"]["type"] == "not_found"
    assert "m1" in s.running()
    assert s.get("/props").status == 404 and s.get("/props").json()["error"]["code"] == "model_not_found"


def _multipart(fields, files, boundary="swapdBoundary7"):
    out = bytearray()
    for name, (filename, data) in files.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode()
        out += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def test_multipart_upload_routed_by_model_field(swapd):
    s = swapd({"whisper": model(aliases=["whisper-1"], useModelName="ggml-large")})
    audio = os.urandom(20 * 1024 * 1024)
    # the file comes first, as many clients send it: swapd must read past it
    body, ctype = _multipart({"model": "whisper-1", "language": "en"}, {"file": ("a.wav", audio)})
    r = s.post("/v1/audio/transcriptions", body, headers={"Content-Type": ctype}, timeout=60)
    assert r.status == 200, r.body[:300]
    out = r.json()
    assert out["model"] == "ggml-large", "useModelName rewrites the form field"
    assert out["fields"]["language"] == "en"
    assert out["files"]["file"]["bytes"] == len(audio)
    assert out["files"]["file"]["sha256"] == hashlib.sha256(audio).hexdigest()
    assert out["content_length"] == len(body) - len("whisper-1") + len("ggml-large")

    missing, ctype = _multipart({"language": "en"}, {"file": ("a.wav", b"x" * 100)})
    r = s.post("/v1/images/edits", missing, headers={"Content-Type": ctype})
    assert r.status == 400 and r.json()["error"]["code"] == "model_not_found"
    r = s.post("/v1/images/edits", b"{}", headers={"Content-Type": "application/json"})
    assert r.status == 400


# -- listing -----------------------------------------------------------------------


def test_models_list_status_aliases_and_alias_entries(swapd):
    s = swapd({"m1": model(aliases=["a1", "a2"], metadata={"family": "fake"}), "m2": model()},
              includeAliasesInList=True)
    s.chat("m1")
    data = {m["id"]: m for m in s.get("/v1/models").json()["data"]}
    assert sorted(data) == ["a1", "a2", "m1", "m2"]
    assert data["m1"]["status"]["value"] == "loaded" and data["m2"]["status"]["value"] == "unloaded"
    assert data["m1"]["meta"]["llamaswap"]["aliases"] == ["a1", "a2"]
    assert data["m1"]["meta"]["llamaswap"]["family"] == "fake"
    assert data["a1"]["meta"]["llamaswap"] == {"type": "alias", "modelID": "m1"}


def test_api_unload_one_model(swapd):
    s = swapd({"a": model(), "b": model()}, groups={"g": {"swap": False, "members": ["a", "b"]}})
    s.chat("a")
    s.chat("b")
    r = s.post("/api/models/unload/a", b"")
    assert r.status == 200
    assert list(s.running()) == ["b"]
    assert s.post("/api/models/unload/nope", b"").status == 404
    assert s.post("/api/models/unload", b"").status == 200
    assert s.running() == {}


# -- /upstream -----------------------------------------------------------------------


def test_upstream_redirects_prefix_and_escaping(swapd):
    s = swapd({"org": model(), "org/model": model()}, groups={"g": {"swap": False, "members": ["org", "org/model"]}})
    r = s.get("/upstream/org")
    assert r.status == 301 and r.headers["location"] == "/upstream/org/"
    r = s.post("/upstream/org?x=1", b"")
    assert r.status == 308 and r.headers["location"] == "/upstream/org/?x=1"
    assert s.running() == {}, "a redirect starts nothing"
    # the longest model-id prefix wins
    r = s.get("/upstream/org/model/x/pid")
    assert r.status == 200
    assert r.json()["pid"] == s.running()["org/model"]["pid"]
    r = s.get("/upstream/org%2Fmodel/x/pid")
    assert r.status == 200 and r.json()["pid"] == s.running()["org/model"]["pid"]
    r = s.get("/upstream/org/x/headers")
    assert r.status == 200 and "org" in s.running()
    assert s.get("/upstream/org/x/..%2F..%2Fhealth").status == 400
    assert s.get("/upstream/nope/health").status == 404


# -- peers -----------------------------------------------------------------------------


@pytest.fixture
def peer_backend(swapd):
    """A remote OpenAI-compatible server (the fake backend, started directly)."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([PY, "-m", "swapd.fake_backend", "--port", str(port), "--quiet", "--chunks", "4",
                             "--interval", "0.05"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def up():
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False
    wait_until(up, timeout=15, message="peer backend")
    yield port
    proc.kill()
    proc.wait()


def test_peer_models_route_with_api_key_and_stream(swapd, peer_backend):
    s = swapd(
        {"local": model()},
        peers={"remote": {"proxy": f"http://127.0.0.1:{peer_backend}", "apiKey": "sk-peer",
                          "models": ["big-model"], "filters": {"setParams": {"provider": {"zdr": True}}}}},
    )
    r = s.post("/v1/chat/completions", {"model": "remote/big-model", "x_echo": True, "messages": []},
               headers={"Authorization": "Bearer client-key"})
    assert r.status == 200, r.body
    out = r.json()
    assert out["x_body_json"]["model"] == "big-model", "the peer sees its own model name"
    assert out["x_body_json"]["provider"] == {"zdr": True}
    assert out["x_headers"]["Authorization"] == "Bearer sk-peer"
    # an unqualified name works when exactly one peer offers it
    assert s.chat("big-model").status == 200
    status, headers, events = s.stream("remote/big-model")
    assert status == 200 and events[-1][1] == "[DONE]"
    assert s.running() == {}, "peers are remote: nothing local starts"


# -- loading state -----------------------------------------------------------------------


def test_send_loading_state_streams_progress_then_tokens(swapd):
    s = swapd({"slow": model("--load-delay", "1.5", "--chunks", "3", sendLoadingState=True)})
    t0 = time.monotonic()
    status, headers, events = s.stream("slow")
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    first_at, first = events[0]
    assert first_at - t0 < 1.0, "the loading stream starts before the model is ready"
    reasoning = "".join(
        json.loads(d)["choices"][0]["delta"].get("reasoning_content", "") for _, d in events if d != "[DONE]"
    )
    assert "swapd loading model: slow" in reasoning and "Done!" in reasoning
    content = [json.loads(d)["choices"][0]["delta"].get("content") for _, d in events if d != "[DONE]"]
    assert [c for c in content if c] == ["tok0 ", "tok1 ", "tok2 "]
    assert events[-1][1] == "[DONE]"
    # a non-streaming request never gets a loading stream
    s.get("/unload")
    r = s.chat("slow")
    assert r.status == 200 and r.json()["object"] == "chat.completion"


def test_loading_state_reports_a_failed_start_in_band(swapd):
    s = swapd({"bad": model("--exit-at-start", "5", sendLoadingState=True)})
    status, _, events = s.stream("bad")
    assert status == 200
    errors = [json.loads(d)["error"] for _, d in events if d != "[DONE]" and "error" in json.loads(d)]
    assert errors and "code 5" in errors[0]["message"]
    assert events[-1][1] == "[DONE]"


# -- scheduling ---------------------------------------------------------------------------


def _queued(s) -> int:
    return s.get("/api/status").json()["queued"]


def _admitted(s) -> dict[str, int]:
    return s.get("/api/status").json()["admitted"]


def test_concurrency_limit_429_before_loading_stream(swapd):
    s = swapd({"m1": model("--load-delay", "1", concurrencyLimit=2, sendLoadingState=True)})
    results = []
    threads = _threads(*[lambda: results.append(s.chat("m1", x_sleep=1.5).status)] * 2)
    wait_until(lambda: _admitted(s).get("m1") == 2, message="both requests admitted")
    status, headers, events = s.stream("m1")
    assert status == 429, "over the limit: refused, not a loading stream"
    assert headers["retry-after"] == "1"
    r = s.chat("m1")
    assert r.status == 429 and r.json()["error"]["type"] == "rate_limit_error"
    for t in threads:
        t.join()
    assert results == [200, 200]
    assert s.chat("m1").status == 200, "slots come back"


def test_queue_collates_requests_per_model(swapd):
    """Requests arriving B A B A while A is busy are served A A B B: one swap, not three."""
    s = swapd({"a": model(), "b": model()})
    s.chat("a")
    done = []

    def call(name, **kw):
        def run():
            r = s.chat(name, **kw)
            done.append((name, r.status, time.monotonic()))
        return run

    first = _threads(call("a", x_sleep=1.5))
    wait_until(lambda: s.running()["a"]["in_flight"] == 1, message="a busy")
    rest = []
    sent = {"a": 1, "b": 0}
    for name in ("b", "a", "b", "a"):
        sent[name] += 1
        rest += _threads(call(name))
        # arrival order is the test: the next goes only once swapd holds this one (admitted, or already answered)
        wait_until(lambda: sum(1 for d in done if d[0] == name) + _admitted(s).get(name, 0) >= sent[name],
                   message=f"the {name} request to arrive")
    for t in first + rest:
        t.join()
    assert sorted(x[1] for x in done) == [200] * 5
    order = [name for name, _, _ in sorted(done, key=lambda x: x[2])]
    assert order == ["a", "a", "a", "b", "b"], order
    assert _starts(s) == ["a", "b"], "exactly one swap"


def test_priority_orders_the_queue(swapd):
    s = swapd({"a": model(), "low": model(), "high": model()},
              routing={"scheduler": {"use": "fifo", "settings": {"fifo": {"priority": {"high": 10}}}}})
    s.chat("a")
    threads = _threads(lambda: s.chat("a", x_sleep=1.2))
    wait_until(lambda: s.running()["a"]["in_flight"] == 1, message="a busy")
    threads += _threads(lambda: s.chat("low"))
    wait_until(lambda: _queued(s) == 1, message="low queued first")
    threads += _threads(lambda: s.chat("high"))
    for t in threads:
        t.join()
    assert _starts(s) == ["a", "high", "low"]


def test_client_gone_while_queued_is_dropped(swapd):
    s = swapd({"a": model(), "b": model()})
    s.chat("a")
    threads = _threads(lambda: s.chat("a", x_sleep=1.5))
    wait_until(lambda: s.running()["a"]["in_flight"] == 1, message="a busy")
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"model": "b", "messages": []}),
                 headers={"Content-Type": "application/json"})
    wait_until(lambda: _queued(s) == 1, message="b queued behind a")
    conn.close()  # give up while queued behind a's request
    wait_until(lambda: _queued(s) == 0, message="the queue to drop it")
    for t in threads:
        t.join()
    wait_until(lambda: s.running()["a"]["in_flight"] == 0, message="a idle")
    # a is idle and nothing is queued: had b's request survived, its start would be under way now
    assert _starts(s) == ["a"], "a request whose client left must not start its model"
    assert list(s.running()) == ["a"]


def test_join_in_flight_swap_and_parallel_disjoint_swaps(swapd):
    groups = {"g1": {"swap": True, "exclusive": False, "members": ["a", "b"]},
              "g2": {"swap": True, "exclusive": False, "members": ["c"]}}
    s = swapd({"a": model("--load-delay", "1"), "b": model(), "c": model("--load-delay", "1")}, groups=groups)
    statuses = []
    t0 = time.monotonic()
    threads = _threads(*[lambda: statuses.append(s.chat("a").status)] * 3, lambda: statuses.append(s.chat("c").status))
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    assert statuses == [200] * 4
    assert sorted(_starts(s)) == ["a", "c"], "three requests for a share one start"
    assert elapsed < 2.6, f"a and c load in parallel ({elapsed:.2f}s)"


# -- groups -----------------------------------------------------------------------------


def test_group_semantics_swap_exclusive_persistent(swapd):
    groups = {
        "solo": {"swap": True, "exclusive": True, "members": ["a", "b"]},
        "pair": {"swap": False, "exclusive": False, "members": ["c", "d"]},
        "forever": {"swap": False, "exclusive": False, "persistent": True, "members": ["e"]},
    }
    s = swapd({m: model() for m in "abcde"}, groups=groups)
    s.chat("c")
    s.chat("d")
    assert sorted(s.running()) == ["c", "d"], "a non-swap group keeps both"
    s.chat("e")
    assert sorted(s.running()) == ["c", "d", "e"], "a non-exclusive group leaves others alone"
    s.chat("a")
    assert sorted(s.running()) == ["a", "e"], "an exclusive group stops other groups, except persistent ones"
    s.chat("b")
    assert sorted(s.running()) == ["b", "e"], "swap within the group"
    s.chat("c")
    assert sorted(s.running()) == ["b", "c", "e"], "non-exclusive: starting c leaves b running"


def test_preload_on_startup(swapd):
    s = swapd({"m1": model(), "m2": model()}, hooks={"on_startup": {"preload": ["m1"]}})
    wait_until(lambda: s.running().get("m1", {}).get("state") == "ready", timeout=10, message="preload")
    assert _events(s, "preload.done")[0]["model"] == "m1"
    assert "m2" not in s.running()


def test_example_config_fixture_lists_its_models():
    """llama-swap's own config.example.yaml loads in swapd and lists its models."""
    from helpers import free_port as fp
    fixture = ROOT.parent / "shared" / "fixtures" / "llama-swap" / "config.example.yaml"
    if not fixture.exists():
        pytest.skip("shared fixture not present")
    port = fp()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HOME="/tmp", API_KEY_1="sk-a", API_KEY_2="sk-b",
               OPENROUTER_API_KEY="sk-or")
    proc = subprocess.Popen([PY, "-m", "swapd", "-config", str(fixture), "-listen", f"127.0.0.1:{port}",
                             "--log-format", "json"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        def listing():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/v1/models", headers={"Authorization": "Bearer sk-a"})
                resp = conn.getresponse()
                return resp.status == 200 and json.loads(resp.read())
            except OSError:
                return None
        doc = wait_until(listing, timeout=20, message="fixture swapd")
        ids = [m["id"] for m in doc["data"]]
        assert "gpt-oss-120b" in ids and "docker-llama" in ids
        assert "unlisted-model" not in ids
        assert "openrouter/z-ai/glm-4.7" in ids, "peer models are listed as peer/model"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_upstream_ignore_paths_never_start_a_model(swapd):
    s = swapd({"m1": model()}, upstream={"ignorePaths": [r"\.ico$", r"^/assets/"]})
    r = s.get("/upstream/m1/favicon.ico")
    assert r.status == 409 and "ignorePaths" in r.json()["error"]["message"]
    assert s.get("/upstream/m1/assets/app.css").status == 409
    assert s.running() == {}
    s.chat("m1")
    # once loaded, the same paths go through to the backend (its own 404 here)
    r = s.get("/upstream/m1/favicon.ico")
    assert r.status == 404 and r.json()["error"]["type"] == "not_found"


def test_every_json_route_reaches_the_backend_with_its_path(swapd):
    from swapd.server.app import JSON_MODEL_ROUTES

    s = swapd({"m1": model()})
    for path in JSON_MODEL_ROUTES:
        r = s.post(path, {"model": "m1", "x_echo": True, "messages": [], "input": "x", "prompt": "x"})
        if r.status == 200:
            assert r.json().get("x_path", path) == path, path
        else:  # the fake backend has no such route: its own 404 names the forwarded path
            assert r.status == 404 and r.json()["error"]["message"] == f"no route for POST {path}", (path, r.body)
    assert s.get("/wol-health").status == 200


def test_response_header_timeout_gives_504(swapd):
    s = swapd({"m1": model(timeouts={"responseHeader": 1})})
    s.chat("m1")
    t0 = time.monotonic()
    r = s.chat("m1", x_sleep=5)
    assert r.status == 504 and r.json()["error"]["type"] == "server_error"
    assert time.monotonic() - t0 < 4
    assert s.chat("m1").status == 200
