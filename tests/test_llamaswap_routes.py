"""llama-swap's remaining routes and keys, against a real swapd and real fake backends (issue 16).

Each test names the llama-swap test whose cases it ports (llama-swap's
``internal/server`` and ``internal/config`` tests), with what changed where
swapd's behaviour is meant to differ.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path

import pytest
from helpers import backend_stats, model, start_fake_server, wait_until
from nvml_stub import stub_dir_for, stub_env

# -- plumbing ---------------------------------------------------------------------------------------------


class Events:
    """A live ``/api/events`` reader on its own thread: every message, decoded (``type``, ``data``)."""

    def __init__(self, s, headers=None) -> None:
        self.messages: list[dict] = []
        self._cond = threading.Condition()
        self._conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        self._conn.request("GET", "/api/events?no-history", headers=headers or {})
        self._resp = self._conn.getresponse()
        assert self._resp.status == 200
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        block = b""
        try:
            while True:
                line = self._resp.readline()
                if not line:
                    return
                if line.strip():
                    block += line
                    continue
                for part in block.splitlines():
                    if part.startswith(b"data:"):
                        msg = json.loads(part[5:])
                        msg["data"] = json.loads(msg["data"])
                        with self._cond:
                            self.messages.append(msg)
                            self._cond.notify_all()
                block = b""
        except Exception:  # noqa: BLE001 - closed under the reader (close()), or swapd went away
            return

    def wait(self, predicate, timeout: float = 15.0, what: str = "an event"):
        """The first message (in arrival order) that ``predicate`` accepts."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.messages:
                    if predicate(msg):
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; got {[m['type'] for m in self.messages]}")
                self._cond.wait(left)

    def inflight(self) -> list[dict]:
        with self._cond:
            return [m["data"] for m in self.messages if m["type"] == "inflight"]

    def close(self) -> None:
        try:
            self._conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._conn.close()


def inflight_upsert(events: Events, test=None, **match) -> dict:
    """The first ``inflight`` upsert whose request has the ``match`` values (and passes ``test``)."""

    def ok(msg):
        if msg["type"] != "inflight" or msg["data"]["operation"] != "upsert":
            return False
        req = msg["data"]["request"]
        return all(req.get(k) == v for k, v in match.items()) and (test is None or test(req))

    return events.wait(ok, what=f"an inflight upsert {match}")["data"]["request"]


def side_by_side(*model_ids: str) -> dict:
    """Top-level keys that let these models run at the same time."""
    return {"groups": {"all": {"swap": False, "members": list(model_ids)}}}


def in_thread(fn, *args, **kw):
    """Run ``fn`` on a thread; the returned dict gets ``result`` or ``error``."""
    out: dict = {}

    def run():
        try:
            out["result"] = fn(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    out["thread"] = t
    return out


def read_stream(port: int, body: dict, path: str = "/v1/chat/completions", headers=None):
    """A streaming POST read to its end: (status, [data lines], ended cleanly)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request("POST", path, body=json.dumps(body), headers=hdrs)
        resp = conn.getresponse()
        lines, clean = [], True
        try:
            while True:
                line = resp.readline()
                if not line:
                    break
                if line.startswith(b"data: "):
                    lines.append(line[6:].strip().decode())
        except (http.client.IncompleteRead, OSError):
            clean = False
        return resp.status, lines, clean
    finally:
        conn.close()


@pytest.fixture
def peer():
    started = []

    def make(*opts: str) -> int:
        proc, port = start_fake_server(*opts)
        started.append(proc)
        return port

    yield make
    for proc in started:
        proc.kill()
        proc.wait()


def backend_port(s, model_id: str) -> int:
    proxy = s.running()[model_id]["proxy"]
    return int(proxy.rsplit(":", 1)[1].strip("/"))


# -- /v1/audio/voices, /audioapi ----------------------------------------------------------------------------


def test_audio_voices_post_routes_by_body_model_and_get_by_query(swapd):
    """llama-swap's route table (server.go: /v1/audio/voices in modelPostJSONRoutes and modelGetRoutes);
    TestServer_RouteToLocalModel's case for it."""
    s = swapd({"tts": model(aliases=["voice"]), "other": model()})
    r = s.post("/v1/audio/voices", {"model": "voice"})
    assert r.status == 200, r.body
    assert r.json() == {"voices": ["alloy", "echo"], "model": "voice", "x_method": "POST", "x_path": "/v1/audio/voices"}
    assert set(s.running()) == {"tts"}
    r = s.get("/v1/audio/voices?model=tts")
    assert r.status == 200 and r.json()["x_method"] == "GET" and r.json()["x_path"] == "/v1/audio/voices?model=tts"
    # TestServer_UnknownModelReturns404
    assert s.post("/v1/audio/voices", {"model": "nope"}).status == 404


def test_audioapi_task_run_is_routed_by_model_and_loses_its_prefix(swapd):
    """TestServer_AudioAPIRoutesTaskRequest, TestServer_AudioAPIRewritesUpstreamPath, TestServer_StripAudioAPIPrefix."""
    s = swapd({"audio": model()})
    r = s.post("/audioapi/v1/tasks/run", {"model": "audio", "task": "tts"})
    # the fake backend has no task API: its 404 names the path it was sent
    assert r.status == 404 and r.json()["error"]["message"] == "no route for POST /v1/tasks/run", r.body
    assert "audio" in s.running()
    assert s.post("/audioapi/v1/tasks/run", {"model": "nope"}).status == 404
    assert s.get("/audioapi/v1/tasks/run").status in (404, 405)  # POST only, as in llama-swap


# -- /health, /wol-health, /favicon.ico ----------------------------------------------------------------------


def test_health_and_wol_health_answer_ok_without_a_key(swapd):
    """TestServer_Health: both answer 200 "OK"; like /health, /wol-health needs no key (llama-swap registers both
    outside its auth chain), so llama-swap's wol-proxy can poll it."""
    s = swapd({"m": model()}, apiKeys=["sk-secret"])
    for path in ("/health", "/wol-health"):
        r = s.get(path)
        assert (r.status, r.body) == (200, b"OK"), path
        assert s.request("HEAD", path).status == 200
    assert s.get("/v1/models").status == 401


def test_favicon_is_the_ui_icon_without_a_key(swapd):
    """TestServer_HandleUIAndFavicon: /favicon.ico is served from the UI's files, outside the key check."""
    s = swapd({"m": model()}, apiKeys=["sk-secret"])
    r = s.get("/favicon.ico")
    assert r.status == 200 and r.headers["content-type"] == "image/x-icon"
    assert r.body[:4] == b"\x00\x00\x01\x00"  # an ICO directory
    assert s.get("/favicon.ico", headers={"If-None-Match": r.headers["etag"]}).status == 304


# -- in-flight requests and their cancel ----------------------------------------------------------------------


def test_inflight_events_list_a_request_from_start_to_end(swapd):
    """TestServer_InflightMiddleware_AddsAndRemovesEntriesAroundRequestHandling,
    TestServer_InflightEventPayloadIncludesRequestEntries, TestServer_InflightMiddleware_StreamsResponseUpdates,
    TestServer_APIEvents_InitialPayload (uiConfig, the inflight snapshot)."""
    s = swapd({"m": model("--interval", "0.1", "--chunks", "12", aliases=["m-alias"])},
              ui={"activity": {"session_id": ["X-Trace-ID"]}})
    events = Events(s)
    try:
        ui = events.wait(lambda m: m["type"] == "uiConfig", what="uiConfig")
        assert ui["data"] == {"activity": {"session_id": ["X-Trace-ID"]}}
        snap = events.wait(lambda m: m["type"] == "inflight", what="the snapshot")["data"]
        assert snap == {"operation": "snapshot", "requests": []}

        headers = {"Authorization": "Bearer secret", "User-Agent": "test-agent", "X-Trace-ID": "trace-1",
                   "X-Forwarded-For": "203.0.113.9, 10.0.0.1"}
        job = in_thread(read_stream, s.port, {"model": "m-alias", "stream": True, "messages": []}, headers=headers)
        added = inflight_upsert(events, model="m")
        assert added["id"] == "1" and added["method"] == "POST" and added["req_path"] == "/v1/chat/completions"
        assert added["remote_ip"] == "203.0.113.9"
        assert added["req_headers"]["Authorization"] == "[REDACTED]"
        assert added["req_headers"]["User-Agent"] == "test-agent" and added["req_headers"]["X-Trace-Id"] == "trace-1"
        assert added["elapsed_ms"] >= 0 and added["timestamp"]
        # the response's headers and bytes arrive as later upserts
        streaming = inflight_upsert(events, lambda r: r["resp_headers"].get("Content-Type") == "text/event-stream")
        assert streaming["id"] == "1" and streaming["model"] == "m"
        inflight_upsert(events, lambda r: r["resp_bytes"] > 0, id="1")
        job["thread"].join(30)
        status, lines, clean = job["result"]
        assert status == 200 and lines[-1] == "[DONE]" and clean
        removed = events.wait(lambda m: m["type"] == "inflight" and m["data"]["operation"] == "remove", what="remove")
        assert removed["data"] == {"operation": "remove", "id": "1"}
        # a client that connects now gets an empty snapshot
        later = Events(s)
        try:
            assert later.wait(lambda m: m["type"] == "inflight")["data"] == {"operation": "snapshot", "requests": []}
        finally:
            later.close()
    finally:
        events.close()


def test_cancel_ends_a_stream_in_band_and_the_backend_stops(swapd):
    """TestServer_APICancelInflight, TestServer_InflightCancelByIDCancelsRequestContext: the cancel answers 200
    {"msg": "ok"}, the request's backend connection is closed (the fake backend counts the stream cancelled), a
    second cancel and an unknown id get 404. swapd's client gets an SSE error event and a clean end of the
    stream (llama-swap cuts it)."""
    s = swapd({"m": model("--interval", "0.2", "--chunks", "200")})
    assert s.chat("m").status == 200
    port = backend_port(s, "m")
    events = Events(s)
    try:
        job = in_thread(read_stream, s.port, {"model": "m", "stream": True, "messages": []})
        entry = inflight_upsert(events, model="m")
        wait_until(lambda: backend_stats(port)["streams_started"] >= 1, message="the stream to start")
        r = s.post(f"/api/inflight/{entry['id']}/cancel", None)
        assert (r.status, r.json()) == (200, {"msg": "ok"})
        job["thread"].join(15)
        status, lines, clean = job["result"]
        assert status == 200 and clean, "the stream ends properly"
        error = json.loads(lines[-1])["error"]
        assert error["code"] == "request_cancelled" and entry["id"] in error["message"]
        assert len(lines) < 100, "the stream stopped early"
        wait_until(lambda: backend_stats(port)["streams_cancelled"] == 1, message="the backend to see the cancel")
        assert backend_stats(port)["streams_completed"] == 0
        events.wait(lambda m: m["type"] == "inflight" and m["data"] == {"operation": "remove", "id": entry["id"]})
        assert s.post(f"/api/inflight/{entry['id']}/cancel", None).status == 404
        missing = s.post("/api/inflight/missing/cancel", None)
        assert missing.status == 404 and missing.json()["error"]["message"] == "inflight request not found"
        # the next request is served as usual, and the log says what happened
        assert s.chat("m").status == 200
        lines_logged = [e for e in s.log_events() if e.get("event") == "request" and e.get("outcome") == "cancelled"]
        assert len(lines_logged) == 1
    finally:
        events.close()


def test_cancel_before_the_answer_gives_499_and_frees_the_queue(swapd):
    """TestServer_InflightCancelByIDCancelsRequestContext, for a request waiting on its backend and one queued
    behind it (a swap waits for requests in flight): both get a 499 request_cancelled error (llama-swap: 502,
    which OpenAI's SDKs send again)."""
    s = swapd({"a": model(), "b": model()})
    assert s.chat("a").status == 200
    events = Events(s)
    try:
        busy = in_thread(s.chat, "a", x_sleep=30)
        first = inflight_upsert(events, model="a")
        queued = in_thread(s.chat, "b")
        second = inflight_upsert(events, model="b")
        time.sleep(0.3)
        assert "result" not in queued, "b waits for a's request"
        assert s.post(f"/api/inflight/{second['id']}/cancel", None).status == 200
        queued["thread"].join(10)
        r = queued["result"]
        assert r.status == 499 and r.json()["error"]["code"] == "request_cancelled", r.body
        assert s.running()["a"]["state"] == "ready", "the cancelled request started no swap"
        assert s.post(f"/api/inflight/{first['id']}/cancel", None).status == 200
        busy["thread"].join(10)
        r = busy["result"]
        assert r.status == 499 and r.json()["error"]["code"] == "request_cancelled", r.body
        assert s.running()["a"]["in_flight"] == 0
        assert s.chat("b").status == 200, "the queue moves on"
    finally:
        events.close()
    rows = s.get("/api/metrics/activity").json()["data"]
    assert sorted(row["resp_status_code"] for row in rows) == [200, 200, 499, 499]


def test_upstream_requests_are_listed_only_on_model_routes(swapd):
    """TestServer_HandleUpstream_InflightTracksSupportedPaths, TestServer_HandleUpstream_InflightSkipsUnsupportedPath:
    /upstream/<model>/<path> is listed under <path> when that is a model route for the method."""
    s = swapd({"m1": model()})
    events = Events(s)
    try:
        job = in_thread(s.post, "/upstream/m1/v1/chat/completions", {"model": "x", "x_sleep": 1, "messages": []})
        entry = inflight_upsert(events, model="m1")
        assert (entry["method"], entry["req_path"]) == ("POST", "/v1/chat/completions")
        job["thread"].join(15)
        assert job["result"].status == 200
        events.wait(lambda m: m["type"] == "inflight" and m["data"] == {"operation": "remove", "id": entry["id"]})
        count = len(events.inflight())
        assert s.post("/upstream/m1/probe", {"x": 1}).status == 404  # the backend's own 404
        assert s.get("/upstream/m1/x/pid").status == 200
        time.sleep(0.5)
        assert len(events.inflight()) == count, "paths that are not model routes are not listed"
    finally:
        events.close()


def test_peer_requests_are_listed_and_cancellable(swapd, peer):
    """The peer half of llama-swap's inflight middleware (it wraps local and peer dispatch alike)."""
    port = peer("--interval", "0.2", "--chunks", "200")
    s = swapd({"m": model()}, peers={"lan": {"proxy": f"http://127.0.0.1:{port}", "models": ["big"]}})
    events = Events(s)
    try:
        job = in_thread(read_stream, s.port, {"model": "lan/big", "stream": True, "messages": []})
        entry = inflight_upsert(events, model="lan/big")
        wait_until(lambda: backend_stats(port)["streams_started"] >= 1, message="the peer's stream")
        assert s.post(f"/api/inflight/{entry['id']}/cancel", None).status == 200
        job["thread"].join(15)
        status, lines, clean = job["result"]
        assert clean and json.loads(lines[-1])["error"]["code"] == "request_cancelled"
        wait_until(lambda: backend_stats(port)["streams_cancelled"] == 1, message="the peer to see the cancel")
    finally:
        events.close()


# -- ui.activity.session_id ---------------------------------------------------------------------------------


def test_session_id_is_recorded_in_activity_rows(swapd):
    """TestConfig_UIActivitySessionID's default headers, used: llama-swap's UI shows the first of them in its
    in-flight table; swapd also keeps it in the activity rows (session_id)."""
    s = swapd({"m": model()})
    assert s.chat("m", max_tokens=2).status == 200
    assert s.post("/v1/chat/completions", {"model": "m", "messages": []},
                  headers={"X-Litellm-Session-Id": "lite-1"}).status == 200
    assert s.post("/v1/chat/completions", {"model": "m", "messages": []},
                  headers={"x-session-id": "sess-9", "X-Litellm-Session-Id": "lite-2"}).status == 200
    rows = s.get("/api/metrics/activity").json()["data"]
    assert [row.get("session_id") for row in rows] == ["sess-9", "lite-1", None]


def test_session_id_headers_come_from_the_config(swapd):
    s = swapd({"m": model()}, ui={"activity": {"session_id": ["X-Trace-ID"]}})
    assert s.post("/v1/chat/completions", {"model": "m", "messages": []},
                  headers={"X-Trace-ID": "t-1", "X-Session-ID": "ignored"}).status == 200
    assert s.get("/api/metrics/activity").json()["data"][0]["session_id"] == "t-1"
    assert not [line for line in s.log_text().splitlines() if "config.warning" in line and "'ui'" in line]


def test_ui_activity_session_id_is_read_as_llama_swap_reads_it():
    """TestConfig_UIActivitySessionID (defaults, normalised names, an explicit empty list) and
    TestConfig_MacrosInUIConfig (macros_refactor_test: a macro in the list)."""
    from swapd.config import load_config_text

    base = "models:\n  m:\n    cmd: srv --port ${PORT}\n"
    assert load_config_text(base).observe.session_id_headers == ("X-Session-ID", "X-Litellm-Session-Id")
    cfg = load_config_text(base + "ui:\n  activity:\n    session_id: [' X-Trace-ID ', '', x-trace-id, X-Session-ID]\n")
    assert cfg.observe.session_id_headers == ("X-Trace-ID", "X-Session-ID")
    assert load_config_text(base + "ui:\n  activity:\n    session_id: []\n").observe.session_id_headers == ()
    cfg = load_config_text("macros:\n  SESSION_HEADER: X-Macro-Session\n" + base
                           + "ui:\n  activity:\n    session_id: ['${SESSION_HEADER}']\n")
    assert cfg.observe.session_id_headers == ("X-Macro-Session",)
    assert not [w for w in cfg.warnings if "ui" in w]


# -- timeouts -----------------------------------------------------------------------------------------------


def test_timeouts_are_read_with_llama_swaps_defaults():
    """TestConfig_TimeoutsDefaults, TestConfig_TimeoutsZeroAllowed, TestConfig_PeerTimeoutsParsing,
    TestConfig_PeerTimeoutsDefaults. swapd keeps its own idle window for models unless idleConn is set (llama-server
    closes idle connections after 5 s) and sends keep-alive probes to models only when keepalive is set."""
    from swapd.config import load_config_text

    cfg = load_config_text(
        "models:\n  m1:\n    cmd: srv --port ${PORT}\n"
        "  m2:\n    cmd: srv --port ${PORT}\n    timeouts: {connect: 0, responseHeader: 0, keepalive: 7, idleConn: 3,"
        " tlsHandshake: 4, expectContinue: 2}\n"
        "peers:\n  p1:\n    proxy: http://example.com\n    models: [model1]\n"
        "  p2:\n    proxy: http://example.com\n    models: [model2]\n    timeouts: {connect: 45, responseHeader: 120}\n"
    )
    t = cfg.models["m1"].timeouts
    assert (t.connect, t.response_header, t.tls_handshake, t.idle_conn, t.keepalive) == (30, None, 10, None, None)
    t = cfg.models["m2"].timeouts
    assert (t.connect, t.response_header, t.tls_handshake, t.idle_conn, t.keepalive) == (None, None, 4, 3, 7)
    t = cfg.peers["p1"].timeouts
    assert (t.connect, t.response_header, t.tls_handshake, t.idle_conn, t.keepalive) == (30, 60, 10, 90, 30)
    t = cfg.peers["p2"].timeouts
    assert (t.connect, t.response_header) == (45, 120)
    assert cfg.warnings == ()


def test_peer_response_header_timeout_gives_504(swapd, peer):
    """TestNewPeer_CustomTimeouts, as behaviour: a peer's responseHeader bounds the wait for its answer."""
    port = peer()
    s = swapd(
        {"m": model()},
        peers={
            "slow": {"proxy": f"http://127.0.0.1:{port}", "models": ["a"], "timeouts": {"responseHeader": 1}},
            "patient": {"proxy": f"http://127.0.0.1:{port}", "models": ["b"]},
        },
    )
    t0 = time.monotonic()
    r = s.chat("slow/a", x_sleep=4)
    assert r.status == 504 and r.json()["error"]["type"] == "server_error", r.body
    assert time.monotonic() - t0 < 3.5
    assert s.chat("slow/a").status == 200
    assert s.chat("patient/b", x_sleep=2).status == 200, "llama-swap's peer default is 60 s"


def test_idle_conn_sets_how_long_a_backend_connection_is_reused(swapd):
    """idleConn (Go's IdleConnTimeout) on swapd's own pool: a connection idle longer is not reused."""
    s = swapd({"short": model(timeouts={"idleConn": 1}), "default": model()}, **side_by_side("short", "default"))
    new_connections = {}
    for model_id in ("short", "default"):
        assert s.chat(model_id).status == 200
        port = backend_port(s, model_id)
        before = backend_stats(port)["connections"]
        time.sleep(1.6)
        assert s.chat(model_id).status == 200
        new_connections[model_id] = backend_stats(port)["connections"] - before - 1  # - 1: this /x/stats call
    assert new_connections == {"short": 1, "default": 0}, "swapd's own window is 4 s"


def _tcp_timer(local_port: int, remote_port: int) -> str:
    """The timer column ("tr:when") of the TCP socket between the two ports, from /proc/net/tcp."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == remote_port:
            return fields[5]
    return ""


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_keepalive_turns_on_tcp_probes_to_the_backend(swapd):
    """keepalive (Go's Dialer.KeepAlive): swapd's connection to the backend gets a keep-alive timer."""
    s = swapd({"ka": model(timeouts={"keepalive": 7}), "plain": model()}, **side_by_side("ka", "plain"))
    timers = {}
    for model_id in ("ka", "plain"):
        assert s.chat(model_id).status == 200
        port = backend_port(s, model_id)
        swapd_ports = [
            int(f.split()[1].split(":")[1], 16)
            for f in Path("/proc/net/tcp").read_text().splitlines()[1:]
            if int(f.split()[2].split(":")[1], 16) == port and f.split()[3] == "01"
        ]
        assert swapd_ports, "swapd keeps the connection to the backend"
        timers[model_id] = _tcp_timer(swapd_ports[0], port)
    assert timers["ka"].startswith("02:"), timers  # 02: the keep-alive timer is armed
    assert int(timers["ka"].split(":")[1], 16) <= 7 * 100 + 100  # jiffies left, at most about 7 s
    assert timers["plain"].startswith("00:"), timers


def test_set_keepalive_sets_idle_and_interval():
    from swapd.server.upstream import set_keepalive

    with socket.socket() as sock:
        set_keepalive(sock, 7)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 7


# -- /api/performance and /api/hardware ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def nvml_lib(request, tmp_path_factory) -> Path:
    return stub_dir_for(request, tmp_path_factory)


@pytest.fixture
def gpu_env(nvml_lib, tmp_path) -> dict[str, str]:
    state = tmp_path / "nvml-state"
    state.mkdir()
    (state / "devices").write_text("2")
    (state / "sensors").write_text("55 40 10")
    (state / "power").write_text("75 250")
    return stub_env(nvml_lib, state)


SYS_KEYS = ["timestamp", "cpu_util_per_core", "mem_total_mb", "mem_used_mb", "mem_free_mb", "swap_total_mb",
            "swap_used_mb", "load_avg_1", "load_avg_5", "load_avg_15", "net_io"]
GPU_KEYS = ["timestamp", "id", "name", "uuid", "temp_c", "vram_temp_c", "gpu_util_pct", "mem_util_pct",
            "mem_used_mb", "mem_total_mb", "fan_speed_pct", "power_draw_w"]


def test_performance_serves_the_sampled_system_and_gpus(swapd, gpu_env):
    """handleAPIPerformance's shape (SysStat, GpuStat) and its ?after filter; TestServer_APIPerformance_Unavailable's
    opposite. The samples are the /metrics sampler's: /api/performance samples nothing itself."""
    s = swapd({"m": model()}, env=gpu_env)
    body = wait_until(lambda: (b := s.get("/api/performance").json())["gpu_stats"] and b, message="a sample")
    assert body["enabled"] is True
    sys_stat = body["sys_stats"][0]
    assert list(sys_stat) == SYS_KEYS
    assert sys_stat["mem_total_mb"] > 0 and isinstance(sys_stat["cpu_util_per_core"], list)
    assert all(io["name"] != "lo" for io in sys_stat["net_io"])
    gpus = body["gpu_stats"]
    assert [g["name"] for g in gpus] == ["Stub GPU 0", "Stub GPU 1"]
    g = gpus[0]
    assert list(g) == GPU_KEYS
    assert (g["id"], g["temp_c"], g["gpu_util_pct"], g["power_draw_w"], g["mem_total_mb"]) == (0, 55, 40.0, 75.0, 24576)
    assert g["mem_util_pct"] == pytest.approx(g["mem_used_mb"] / 24576 * 100)
    # ?after: later samples only; a time that does not parse is a 400
    after = s.get("/api/performance?after=2999-01-01T00:00:00Z").json()
    assert after == {"enabled": True, "sys_stats": [], "gpu_stats": []}
    earlier = s.get("/api/performance?after=2000-01-01T00:00:00%2B02:00").json()
    assert len(earlier["sys_stats"]) == len(s.get("/api/performance").json()["sys_stats"])
    bad = s.get("/api/performance?after=yesterday")
    assert bad.status == 400 and "RFC3339" in bad.json()["error"]["message"]


def test_performance_disabled_answers_503(swapd):
    """TestServer_APIPerformance_Unavailable: 503 {"enabled": false} when performance.disabled."""
    s = swapd({"m": model()}, performance={"disabled": True})
    r = s.get("/api/performance")
    assert (r.status, r.json()) == (503, {"enabled": False})


def test_hardware_snapshot_with_the_stub_gpus(swapd, gpu_env):
    """handleAPIHardware and hw.HardwareSnapshot's schema (hardware_test.go: Validate's rules)."""
    s = swapd({"m": model()}, env=gpu_env)
    r = s.get("/api/hardware")
    assert r.status == 200, r.body
    hw = r.json()
    assert list(hw) == ["schema_version", "captured_at", "capture", "architecture", "operating_system",
                        "environment", "cpu", "memory", "accelerators"]
    assert hw["schema_version"] == 1 and hw["captured_at"].endswith("Z")
    assert hw["capture"] == {"scope": "inference_host", "method": "detected",
                             "detector": {"name": "swapd", "version": hw["capture"]["detector"]["version"]}}
    assert hw["architecture"]["name"] in ("x86_64", "arm64", "armv7", "ppc64le", "riscv64", "s390x", "other")
    assert hw["operating_system"]["family"] == "linux"
    assert hw["environment"]["kind"] in ("native", "container", "virtual_machine", "wsl", "other", "unknown")
    cpu = hw["cpu"]
    assert cpu["logical_thread_count"] >= (cpu["physical_core_count"] or 1)
    assert hw["memory"]["capacity_bytes"] > 0
    accels = hw["accelerators"]
    assert [a["index"] for a in accels] == [0, 1]
    assert accels[0] == {
        "index": 0, "kind": "gpu", "vendor": "NVIDIA", "model": "Stub GPU 0", "architecture": None,
        "memory": {"kind": "dedicated", "capacity_bytes": 24576 * 1024 * 1024},
        "driver": {"name": "NVIDIA", "version": "550.54.15"}, "power_limit_watts": 250.0,
    }
    assert s.get("/api/hardware").json() == hw, "read once, served as read"


def test_hardware_snapshot_without_nvml(swapd, tmp_path):
    s = swapd({"m": model()}, env={"SWAPD_STUB_NVML_STATE": str(tmp_path), "LD_LIBRARY_PATH": str(tmp_path)})
    hw = s.get("/api/hardware").json()
    if hw["accelerators"]:
        pytest.skip("a real NVML library is installed on this machine")
    assert hw["accelerators"] == [] and hw["memory"]["capacity_bytes"] > 0


def test_hardware_parts_follow_llama_swaps_rules(tmp_path):
    """hardware_linux_test.go's cases: zoneinfo without Device zones, the cgroup limit, architecture names,
    NVIDIA records sorted by PCI address and re-indexed."""
    from swapd import hardware

    zoneinfo = tmp_path / "zoneinfo"
    zoneinfo.write_text(
        "Node 0, zone      DMA\n  pages free 1\n        present  100\n"
        "Node 0, zone   Normal\n        present  900\n"
        "Node 0, zone   Device\n        present  5000\n"
    )
    assert hardware.zoneinfo_capacity(str(zoneinfo), page_size=4096) == 1000 * 4096
    limit = tmp_path / "memory.max"
    limit.write_text("2000000\n")
    assert hardware.memory_capacity(1000 * 4096, str(zoneinfo), [str(limit)]) == 2000000
    limit.write_text("max\n")
    assert hardware.memory_capacity(1000 * 4096, str(zoneinfo), [str(limit)]) == 1000 * 4096
    assert hardware.architecture("x86_64") == {"name": "x86_64", "raw_name": None}
    assert hardware.architecture("aarch64") == {"name": "arm64", "raw_name": "aarch64"}
    assert hardware.architecture("mips") == {"name": "other", "raw_name": "mips"}
    accels = hardware.nvidia_accelerators(
        [
            {"name": "B", "pci_bus_id": "00000000:81:00.0", "total_bytes": 0, "power_limit_w": 0,
             "compute_capability": "9.0"},
            {"name": "A", "pci_bus_id": "00000000:01:00.0", "total_bytes": 1 << 30, "power_limit_w": 300,
             "compute_capability": "8.9"},
        ],
        "n/a",
    )
    assert [(a["index"], a["model"], a["architecture"]) for a in accels] == [(0, "A", "Ada Lovelace"),
                                                                            (1, "B", "Hopper")]
    assert accels[1]["memory"] == {"kind": "dedicated", "capacity_bytes": None}
    assert accels[1]["power_limit_watts"] is None and accels[0]["driver"] is None


# -- /comfyui ------------------------------------------------------------------------------------------------


def test_comfyui_redirects_starts_only_from_its_root_and_keeps_escapes(swapd):
    """TestServer_HandleComfyUI (redirects bare path; only root starts unloaded model; proxies fixed model and
    preserves escaped path) and TestConfig_ComfyUIOverrides (concurrencyLimit at least 50)."""
    s = swapd({"comfyui_auto": model(concurrencyLimit=2), "other": model()})
    for method, status in (("GET", 301), ("HEAD", 301), ("POST", 308)):
        r = s.request(method, "/comfyui?token=value")
        assert r.status == status and r.headers["location"] == "/comfyui/?token=value", method
    # only /comfyui/ may start the model
    r = s.get("/comfyui/api/prompt")
    assert r.status == 409 and "only /comfyui/ can start it" in r.json()["error"]["message"]
    assert s.running() == {}
    r = s.get("/comfyui/?token=value")
    assert r.status == 404 and r.json()["x_raw_path"] == "/?token=value", r.body  # the backend's own 404
    assert s.running()["comfyui_auto"]["state"] == "ready"
    for target, want in (
        ("/comfyui/api/userdata/workflows%2Fexample.json?preview=1",
         "/api/userdata/workflows%2Fexample.json?preview=1"),
        ("/comfyui/api/userdata/workflows%252Fexample.json", "/api/userdata/workflows%252Fexample.json"),
        ("/comfyui/api/%E2%9C%93%2Ffile.json", "/api/%E2%9C%93%2Ffile.json"),
    ):
        r = s.post(target, b"{}")
        assert r.status == 404 and r.json()["x_raw_path"] == want, (target, r.body)
    assert s.get("/comfyui/x/pid").status == 200
    # once unloaded, a stale browser tab cannot load it again
    assert s.get("/unload").status == 200
    assert s.get("/comfyui/x/pid").status == 409
    from swapd.config import load_config_text

    cfg = load_config_text("models:\n  comfyui_auto:\n    cmd: comfyui --port ${PORT}\n    concurrencyLimit: 2\n")
    assert cfg.models["comfyui_auto"].concurrency_limit == 50


def test_comfyui_needs_a_local_comfyui_auto_model(swapd, peer):
    """TestServer_HandleComfyUI_RequiresExactLocalModel: missing, or only a peer's, is 404."""
    port = peer()
    s = swapd({"m": model()}, peers={"lan": {"proxy": f"http://127.0.0.1:{port}", "models": ["comfyui_auto"]}})
    r = s.get("/comfyui/")
    assert r.status == 404 and "comfyui_auto" in r.json()["error"]["message"]


def test_comfyui_uses_the_api_keys(swapd):
    """TestServer_HandleComfyUI_UsesAuthentication."""
    s = swapd({"comfyui_auto": model()}, apiKeys=["secret"])
    assert s.get("/comfyui/").status == 401
    assert s.get("/comfyui/x/pid", headers={"Authorization": "Bearer secret"}).status == 409
    r = s.get("/comfyui/", headers={"Authorization": "Bearer secret"})
    assert r.status == 404 and r.json()["x_raw_path"] == "/"


# -- the web UI ----------------------------------------------------------------------------------------------


def test_ui_lists_requests_in_flight_cancels_one_and_shows_sessions(swapd, open_page):
    """llama-swap's ActivityTable in-flight rows (Cancel, Session ID from uiConfig's headers), in swapd's UI;
    finished rows get a Session column once one has a session id."""
    s = swapd({"m": model("--interval", "0.2", "--chunks", "300")})
    assert s.chat("m").status == 200
    port = backend_port(s, "m")
    p = open_page(s.base)
    p.page.goto(s.base + "/ui/#/activity")
    p.page.wait_for_selector("[data-testid=activity-row]")
    assert p.page.locator("[data-testid=activity-session]").count() == 0, "no session column without a session"
    job = in_thread(read_stream, s.port, {"model": "m", "stream": True, "messages": []},
                    headers={"X-Session-ID": "sess-ui"})
    row = p.page.wait_for_selector("[data-testid=inflight-row]")
    wait_until(lambda: "sess-ui" in row.inner_text(), timeout=10, message="the session in the in-flight row")
    assert "POST /v1/chat/completions" in row.inner_text()
    p.page.click("[data-testid=inflight-cancel]")
    job["thread"].join(15)
    status, lines, clean = job["result"]
    assert clean and json.loads(lines[-1])["error"]["code"] == "request_cancelled"
    wait_until(lambda: backend_stats(port)["streams_cancelled"] == 1, message="the backend to see the cancel")
    p.page.wait_for_selector("[data-testid=inflight-row]", state="detached")
    p.page.wait_for_selector("[data-testid=activity-session]:has-text('sess-ui')")
    assert any("/api/inflight/" in u and u.endswith("/cancel") for _, u, _ in p.requests)
