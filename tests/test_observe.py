"""Watching swapd: /logs, /logs/stream/*, /api/events, /api/version, logToStdout, logTimeFormat.

Everything runs against a real swapd process; a stream is read over a real
socket while the test makes swapd and its backends produce output.
"""

from __future__ import annotations

import datetime
import json
import re
import signal
import time

import pytest
import yaml

from helpers import PY, model, wait_until


def noisy(**keys) -> dict:
    """A fake backend that logs every request it gets (``fake_backend: request GET /path``)."""
    return {"cmd": f"{PY} -m swapd.fake_backend --port ${{PORT}}", **keys}


class Stream:
    """A streaming GET read line by line, never waiting longer than ``timeout`` for a line."""

    def __init__(self, s, path: str, timeout: float = 20.0) -> None:
        self.conn = s.connection(timeout=timeout)
        self.conn.request("GET", path)
        self.resp = self.conn.getresponse()
        self.headers = {k.lower(): v for k, v in self.resp.getheaders()}
        self.lines: list[str] = []

    def read_until(self, needle) -> list[str]:
        match = needle if callable(needle) else (lambda line: needle in line)
        try:
            while True:
                raw = self.resp.readline()
                if not raw:
                    raise AssertionError(f"stream ended before {needle!r}; got {self.lines}")
                line = raw.decode().rstrip("\n")
                self.lines.append(line)
                if match(line):
                    return self.lines
        except TimeoutError:
            raise AssertionError(f"no {needle!r} in time; got {self.lines}") from None

    def close(self) -> None:
        self.conn.close()


class Events(Stream):
    """/api/events, parsed into llama-swap's envelopes with their ``data`` decoded."""

    def __init__(self, s, timeout: float = 20.0, path: str = "/api/events") -> None:
        super().__init__(s, path, timeout)
        self.records: list[dict] = []

    def next(self) -> dict:
        data = None
        while True:
            self.read_until(lambda line: True)
            line = self.lines[-1]
            if line.startswith("data:"):
                data = line[len("data:"):]
            elif line == "" and data is not None:
                envelope = json.loads(data)
                envelope["payload"] = json.loads(envelope["data"])
                self.records.append(envelope)
                return envelope

    def until(self, predicate) -> dict:
        while True:
            record = self.next()
            if predicate(record):
                return record


def _closed_events(s) -> list[dict]:
    return [e for e in s.log_events() if e.get("event") == "stream.closed"]


# -- /logs and /logs/stream -----------------------------------------------------


def test_log_streams_send_history_then_live_lines_per_monitor(swapd):
    s = swapd(
        {"a": noisy(aliases=["alpha"]), "b": noisy()},
        groups={"both": {"swap": False, "members": ["a", "b"]}},
    )
    assert s.chat("a").status == 200  # a's start-up output is history from here on
    streams = {
        "all": Stream(s, "/logs/stream"),
        "proxy": Stream(s, "/logs/stream/proxy"),
        "upstream": Stream(s, "/logs/stream/upstream"),
        "a": Stream(s, "/logs/stream/a"),
        "a-live": Stream(s, "/logs/stream/alpha?no-history"),
        "b-live": Stream(s, "/logs/stream/b?no-history"),
    }
    try:
        for stream in streams.values():
            assert stream.resp.status == 200
            assert stream.headers["content-type"].startswith("text/plain")
            assert stream.headers["transfer-encoding"] == "chunked"
            assert stream.headers["x-content-type-options"] == "nosniff"
        # Live output, in a known order: a, then b (which starts b), then a again.
        s.get("/upstream/a/live-a-1")
        s.get("/upstream/b/live-b-1")
        s.get("/upstream/a/live-a-2")

        # One model: its own output only, untagged, history first.
        lines = streams["a"].read_until("request GET /live-a-2")
        listening = next(i for i, l in enumerate(lines) if l.startswith("fake_backend: listening on"))
        assert listening < lines.index("fake_backend: request GET /live-a-1")
        assert not any("live-b" in l or l.startswith("{") or l.startswith("[") for l in lines), lines
        # ?no-history: live lines only; an alias names the same model.
        lines = streams["a-live"].read_until("request GET /live-a-2")
        assert lines[0] == "fake_backend: request GET /live-a-1", lines
        assert not any("listening on" in l for l in lines)
        lines = streams["b-live"].read_until("request GET /live-b-1")
        assert any(l.startswith("fake_backend: listening on") for l in lines), "b started after the stream opened"
        assert not any("live-a" in l for l in lines)

        # upstream: every backend, tagged with the model; none of swapd's own lines.
        lines = streams["upstream"].read_until("[a] fake_backend: request GET /live-a-2")
        assert any(l.startswith("[a] fake_backend: listening on") for l in lines)
        assert "[b] fake_backend: request GET /live-b-1" in lines
        assert all(l.startswith(("[a] ", "[b] ")) for l in lines), lines

        # proxy: swapd's own log lines (JSON here), history and live.
        lines = streams["proxy"].read_until('"path": "/upstream/a/live-a-2"')
        events = [json.loads(l) for l in lines]
        names = [e["event"] for e in events]
        assert names.index("swapd.listening") < names.index("backend.ready")
        assert any(e["event"] == "backend.start" and e["model"] == "b" for e in events)

        # the combined view: both, each line tagged with its source.
        lines = streams["all"].read_until("[a] fake_backend: request GET /live-a-2")
        assert any(l.startswith("[swapd] {") and "swapd.listening" in l for l in lines)
        assert "[b] fake_backend: request GET /live-b-1" in lines
    finally:
        for stream in streams.values():
            stream.close()

    # GET /logs: the same combined history as plain text.
    r = s.get("/logs")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.body.decode()
    assert "[a] fake_backend: request GET /live-a-2" in text and "[b] fake_backend: listening on" in text
    assert re.search(r'^\[swapd\] \{.*"event": "backend.ready"', text, re.M)

    # an unknown monitor is refused, as in llama-swap
    r = s.get("/logs/stream/nope")
    assert r.status == 400
    assert "invalid logger" in r.json()["error"]["message"]


def test_log_stream_disconnect_releases_the_subscriber(swapd):
    s = swapd({"m1": noisy()})
    opened = [Stream(s, "/logs/stream"), Stream(s, "/logs/stream/m1?no-history"), Events(s)]
    opened[2].until(lambda r: r["type"] == "modelStatus")
    s.get("/upstream/m1/one")
    opened[1].read_until("request GET /one")
    for stream in opened:
        stream.close()
    # Each handler notices the client is gone, drops its subscription and says so.
    wait_until(lambda: len(_closed_events(s)) == 3, timeout=10, message="three stream.closed events")
    assert _closed_events(s)[-1]["subscribers"] == 0
    assert sorted(e["path"] for e in _closed_events(s)) == ["/api/events", "/logs/stream", "/logs/stream/m1"]
    # and swapd carries on producing output with nobody listening
    assert s.get("/upstream/m1/two").status == 404
    assert "[m1] fake_backend: request GET /two" in s.get("/logs").body.decode()


def test_slow_stream_clients_never_hold_up_backends_or_requests(swapd):
    s = swapd({"flood": model("--log-lines", "20000"), "m1": model()}, groups={"g": {"swap": False, "members": ["flood", "m1"]}})
    # Clients that never read: their socket buffers fill, then their own queues drop lines.
    idle = [Stream(s, "/logs/stream"), Stream(s, "/logs/stream/upstream"), Events(s)]
    try:
        t0 = time.monotonic()
        assert s.chat("flood").status == 200  # 20,000 lines at start-up
        assert s.chat("m1").status == 200
        assert time.monotonic() - t0 < 20
        t0 = time.monotonic()
        for _ in range(5):
            assert s.get("/health", timeout=5).status == 200
        assert time.monotonic() - t0 < 5
        # A reader that finally reads gets the newest output, possibly after a gap notice.
        idle[1].read_until("[m1] fake_backend: listening on")
    finally:
        for stream in idle:
            stream.close()
    wait_until(lambda: len(_closed_events(s)) == 3, timeout=15, message="stream.closed events")


# -- /api/events ------------------------------------------------------------------


def _state(record: dict, model_id: str) -> str:
    return next(m["state"] for m in record["payload"] if m["id"] == model_id)


def test_events_no_history_starts_with_the_model_status(swapd):
    """?no-history (the web UI's choice) skips the log backlog; live log lines still come."""
    s = swapd({"m1": model("--log-lines", "2")})
    events = Events(s, path="/api/events?no-history")
    try:
        first = events.next()
        assert first["type"] == "modelStatus" and first["payload"][0]["id"] == "m1"
        assert s.chat("m1").status == 200
        line = events.until(lambda r: r["type"] == "logData" and r["payload"]["source"] == "upstream")
        assert line["payload"]["data"].startswith("[m1] fake_backend: log line")
        assert "swapd.listening" not in "".join(r["data"] for r in events.records)  # the backlog stayed out
    finally:
        events.close()


def test_events_stream_model_states_and_log_data(swapd):
    s = swapd({"m1": model("--log-lines", "2", name="Model One", aliases=["one"]), "m2": model(unlisted=True)})
    events = Events(s)
    try:
        assert events.resp.status == 200
        assert events.headers["content-type"] == "text/event-stream"
        assert events.headers["cache-control"] == "no-cache"
        # initial payload: proxy history, upstream history, the model list
        first = [events.next() for _ in range(3)]
        assert [(r["type"], r["payload"].get("source") if r["type"] == "logData" else None) for r in first] == [
            ("logData", "proxy"),
            ("logData", "upstream"),
            ("modelStatus", None),
        ]
        assert "swapd.listening" in first[0]["payload"]["data"]
        models = {m["id"]: m for m in first[2]["payload"]}
        assert models["m1"] == {
            "id": "m1",
            "name": "Model One",
            "description": "",
            "state": "stopped",
            "unlisted": False,
            "peerID": "",
            "aliases": ["one"],
        }
        assert models["m2"]["unlisted"] is True and models["m2"]["state"] == "stopped"
        assert "event:message" in events.lines

        assert s.chat("m1").status == 200
        assert s.get("/unload").status == 200
        events.until(lambda r: r["type"] == "modelStatus" and _state(r, "m1") == "stopped")
        states = [_state(r, "m1") for r in events.records[3:] if r["type"] == "modelStatus"]
        assert states == ["starting", "ready", "stopping", "stopped"], states
        logs = [r["payload"] for r in events.records[3:] if r["type"] == "logData"]
        assert {"source": "upstream", "data": "[m1] fake_backend: log line 1\n"} in logs
        proxy = [json.loads(p["data"]) for p in logs if p["source"] == "proxy"]
        assert any(e["event"] == "backend.ready" and e["model"] == "m1" for e in proxy)
    finally:
        events.close()


def test_reload_announces_the_new_model_list(swapd):
    s = swapd({"a": model()})
    events = Events(s)
    try:
        events.until(lambda r: r["type"] == "modelStatus")
        doc = yaml.safe_load(s.config_path.read_text())
        doc["models"]["fresh"] = dict(doc["models"]["a"])
        s.config_path.write_text(yaml.safe_dump(doc))
        s.proc.send_signal(signal.SIGHUP)
        record = events.until(lambda r: r["type"] == "modelStatus" and len(r["payload"]) == 2)
        assert [m["id"] for m in record["payload"]] == ["a", "fresh"]
    finally:
        events.close()


# -- /api/version -------------------------------------------------------------------


def test_api_version_has_llama_swaps_fields(swapd, monkeypatch):
    from swapd import __version__

    s = swapd({"m1": model()})
    r = s.get("/api/version")
    assert r.status == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"version", "commit", "build_date"}
    assert body["version"] == __version__
    assert re.fullmatch(r"[0-9a-f]{7}|unknown", body["commit"]), body
    # A packager stamps the build through the environment.
    monkeypatch.setenv("SWAPD_COMMIT", "deadbee")
    monkeypatch.setenv("SWAPD_BUILD_DATE", "2026-05-19T00:00:00Z")
    s2 = swapd({"m1": model()})
    assert s2.get("/api/version").json() == {"version": __version__, "commit": "deadbee", "build_date": "2026-05-19T00:00:00Z"}


# -- logToStdout ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["proxy", "upstream", "both", "none"])
def test_log_to_stdout_picks_what_reaches_the_console(swapd, mode):
    s = swapd({"m1": model("--log-lines", "3")}, split_stdout=True, logToStdout=mode, bogusTopLevelKey=1)
    assert s.chat("m1").status == 200
    wait_until(lambda: "[m1] fake_backend: log line 2" in s.get("/logs").body.decode(), message="backend output")
    upstream_printed = mode in ("upstream", "both")
    proxy_printed = mode in ("proxy", "both")
    if upstream_printed:
        # raw backend output on stdout, as llama-swap prints it
        wait_until(lambda: "fake_backend: log line 2\n" in s.stdout_text(), message="backend output on stdout")
        assert s.stdout_text().splitlines()[:3] == [f"fake_backend: log line {i}" for i in range(3)]
    else:
        assert s.stdout_text() == ""
    names = [e["event"] for e in s.log_events()]
    assert ("backend.ready" in names) == proxy_printed, names
    assert ("swapd.listening" in names) == proxy_printed, names
    assert "config.warning" in names, "warnings reach the console whatever logToStdout says"
    # Every line is still kept for /logs and the proxy stream.
    history = s.get("/logs").body.decode()
    assert '"event": "backend.ready"' in history and "[m1] fake_backend: log line 0" in history


# -- logTimeFormat ----------------------------------------------------------------------

_STAMPS = {
    "rfc3339": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d)",
    "kitchen": r"\d{1,2}:\d\d(AM|PM)",
    "stampmilli": r"[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d\.\d{3}",
    "rfc1123": r"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d \S+",
}


@pytest.mark.parametrize("name", sorted(_STAMPS))
def test_log_time_format_uses_go_layouts(swapd, name):
    s = swapd({"m1": model()}, logTimeFormat=name.upper() if name == "kitchen" else name)  # case-insensitive, as llama-swap
    assert s.chat("m1").status == 200
    events = s.log_events()
    assert events
    for event in events:
        assert re.fullmatch(_STAMPS[name], event["timestamp"]), event
    if name == "rfc3339":
        stamp = datetime.datetime.fromisoformat(events[-1]["timestamp"].replace("Z", "+00:00"))
        assert abs((datetime.datetime.now(datetime.timezone.utc) - stamp).total_seconds()) < 120
    # the proxy stream carries the same lines
    with_history = Stream(s, "/logs/stream/proxy")
    try:
        line = with_history.read_until("backend.ready")[-1]
        assert re.fullmatch(_STAMPS[name], json.loads(line)["timestamp"])
    finally:
        with_history.close()


def test_log_time_format_empty_means_none_and_reload_applies_it(swapd):
    s = swapd({"m1": model()}, logTimeFormat="")
    events = s.log_events()
    assert len(events) >= 2, events  # at least config and listening lines: all() of nothing proves nothing
    assert all("timestamp" not in e for e in events)
    doc = yaml.safe_load(s.config_path.read_text())
    doc["logTimeFormat"] = "rfc3339"
    s.config_path.write_text(yaml.safe_dump(doc))
    s.proc.send_signal(signal.SIGHUP)
    reloaded = wait_until(lambda: [e for e in s.log_events() if e["event"] == "config.reloaded"], message="reload")
    assert re.fullmatch(_STAMPS["rfc3339"], reloaded[0]["timestamp"])


def test_log_time_format_absent_keeps_iso_timestamps(swapd):
    s = swapd({"m1": model()})
    events = s.log_events()
    assert len(events) >= 2, events  # the loop below must have something to check
    for event in events:
        datetime.datetime.fromisoformat(event["timestamp"])
