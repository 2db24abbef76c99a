"""llama-swap's activity store, its routes and captures.

Unit tests drive ``ActivityStore`` with hand-made records (its SQLite runs on
its own thread, as in swapd); the end-to-end tests run swapd with fake
backends and read ``/api/metrics/activity``, ``/api/metrics/stats``,
``/api/captures/{id}`` and ``/api/events`` over real sockets.
"""

from __future__ import annotations

import base64
import http.client
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from swapd.telemetry.activity import ActivityQuery, ActivityStore, histogram, list_rows, percentile, rfc3339
from swapd.telemetry.captures import REDACTED, CaptureStore, StoredCapture, build
from swapd.telemetry.record import Capture, RequestRecord, Tokens, Wait

# -- helpers -------------------------------------------------------------------


def rec(
    model="m1",
    *,
    ts=1_700_000_000.0,
    path="/v1/chat/completions",
    status=200,
    tokens: Tokens | None = None,
    duration=0.25,
    method="POST",
    error="",
    capture: Capture | None = None,
    metadata=None,
) -> RequestRecord:
    r = RequestRecord(timestamp=ts, t0=100.0, method=method, path=path, model=model)
    r.status = status
    r.content_type = "application/json"
    r.tokens = tokens
    r.end = 100.0 + duration
    r.error = error
    r.capture = capture
    r.metadata = dict(metadata or {})
    return r


def tok(i=10, o=5, cache=-1, pps=-1.0, tps=-1.0, timings_ms=0.0) -> Tokens:
    return Tokens(input=i, output=o, cache=cache, prompt_per_second=pps, tokens_per_second=tps, timings_ms=timings_ms)


@pytest.fixture
def opened():
    stores: list[ActivityStore] = []

    def make(max_rows=1000, path="", **kw) -> ActivityStore:
        store = ActivityStore(max_rows, str(path), **kw)
        store.open_sync()
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close_sync()


def page(store: ActivityStore, **kw) -> dict:
    query = ActivityQuery(**kw)
    rows, total = store.submit(lambda conn: list_rows(conn, query)).result(5)
    return store.page_of(rows, total, query)


def stats(store: ActivityStore, model="") -> dict:
    from swapd.telemetry.activity import stats as stats_fn

    return store.submit(lambda conn: stats_fn(conn, model)).result(5)


# -- the store -----------------------------------------------------------------


def test_rows_have_llama_swaps_fields_and_ids_count_up(opened):
    events = []
    store = opened(on_activity=events.append)
    r = rec(tokens=tok(12, 7, cache=3, pps=100.5, tps=20.25, timings_ms=900.0), metadata={"selector": "s1"})
    store.request_done(r)
    assert r.id == 1  # given synchronously, before the insert ran
    store.request_done(rec(status=503, duration=0.0123))
    got = page(store)
    assert [row["id"] for row in got["data"]] == [2, 1]
    first = got["data"][1]
    assert first == {
        "id": 1,
        "timestamp": rfc3339(1_700_000_000),
        "model": "m1",
        "req_path": "/v1/chat/completions",
        "resp_content_type": "application/json",
        "resp_status_code": 200,
        "tokens": {
            "cache_tokens": 3,
            "draft_tokens": -1,
            "draft_acc_tokens": -1,
            "input_tokens": 12,
            "output_tokens": 7,
            "prompt_per_second": 100.5,
            "tokens_per_second": 20.25,
        },
        "duration_ms": 900,  # llama-server's own timings are longer than the 250 ms wall time
        "has_capture": False,
        "metadata": {"selector": "s1"},
        # swapd's additions: not a stream, waited on nothing
        "ttft_ms": -1,
        "waited": "",
        "wait_ms": 0,
        "start_ms": 0,
    }
    failed = got["data"][0]
    # No usage: llama-swap's zero TokenMetrics; no error text: the status text.
    assert failed["tokens"] == dict.fromkeys(first["tokens"], 0)
    assert failed["error_msg"] == "503 Service Unavailable"
    assert failed["duration_ms"] == 12
    assert "metadata" not in failed
    assert [e["id"] for e in events] == [1, 2]
    assert got["page"] == 1 and got["limit"] == 25 and got["total"] == 2 and got["total_pages"] == 1


def test_wait_and_ttft_columns_from_the_record(opened):
    store = opened()
    cold = rec(duration=2.0)
    cold.stream = True
    cold.first_byte = cold.t0 + 1.2345
    cold.queued_s = 1.1004
    cold.waits = [Wait("m1", started=100.0, stops_done=100.0, ready=101.05)]
    store.request_done(cold)
    swapped = rec()
    swapped.queued_s = 0.9
    swapped.waits = [Wait("m1", started=100.0, stops_done=100.3, ready=100.8, stopped=("m2",))]
    store.request_done(swapped)
    warm = rec()
    warm.stream = True
    warm.first_byte = warm.t0 + 0.01
    warm.queued_s = 0.0004  # no start or swap: wait_ms stays 0
    store.request_done(warm)
    got = {row["id"]: row for row in page(store)["data"]}
    pick = ("ttft_ms", "waited", "wait_ms", "start_ms")
    assert [got[1][k] for k in pick] == [1234, "start", 1100, 1050]
    assert [got[2][k] for k in pick] == [-1, "swap", 900, 500]  # the stop (300 ms) is in wait_ms only
    assert [got[3][k] for k in pick] == [10, "", 0, 0]


def test_rfc3339_is_gos_time_format():
    import os

    old = os.environ.get("TZ")
    try:
        os.environ["TZ"] = "UTC"
        time.tzset()
        assert rfc3339(1_700_000_000) == "2023-11-14T22:13:20Z"
        os.environ["TZ"] = "Asia/Kolkata"
        time.tzset()
        assert rfc3339(1_700_000_000) == "2023-11-15T03:43:20+05:30"
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()


def test_error_msg_prefers_the_backends_message(opened):
    store = opened()
    failed = rec(status=400, error="backend answered 400", capture=cap(resp=b'{"error":{"message":"bad model"}}'))
    store.request_done(failed)
    store.request_done(
        rec(status=400, error="backend answered 400", capture=cap(resp=b'{"detail":"' + b"d" * 600 + b'"}'))
    )
    store.request_done(rec(status=502, error="backend answered 502"))  # no capture: swapd's reason
    rows = page(store)["data"]
    assert [r["error_msg"] for r in rows] == ["backend answered 502", "d" * 500 + "...", "bad model"]


def test_only_posts_are_recorded(opened):
    store = opened()
    get = rec(method="GET", path="/props")
    store.request_done(get)
    store.request_done(rec())
    assert get.id == 0
    assert page(store)["total"] == 1


def test_paging_filters_and_sort(opened):
    store = opened()
    for i in range(30):
        store.request_done(rec(f"m{i % 3}", ts=1_700_000_000 + i, tokens=tok(i=100 - (i % 4), o=i)))
    p5 = page(store, limit=7, page=5)
    assert [r["id"] for r in p5["data"]] == [2, 1]
    assert (p5["total"], p5["total_pages"], p5["page"], p5["limit"]) == (30, 5, 5, 7)
    assert page(store, limit=7, page=6)["data"] == []
    # Several models at once; ids and times inclusive on both ends.
    two = page(store, models=["m0", "m2"], limit=100)
    assert two["total"] == 20 and {r["model"] for r in two["data"]} == {"m0", "m2"}
    assert [r["id"] for r in page(store, min_id=5, max_id=8)["data"]] == [8, 7, 6, 5]
    window = page(store, start=1_700_000_010, end=1_700_000_012, models=["m1"])
    assert [r["id"] for r in window["data"]] == [11]  # ts 10..12 are ids 11..13; m1 is 11 only (i=10)
    # Sort by prompt tokens ascending; ties break on id in the same direction.
    by_prompt = page(store, sort="prompt", order="asc", limit=8)["data"]
    assert [(r["tokens"]["input_tokens"], r["id"]) for r in by_prompt] == [
        (97, 4), (97, 8), (97, 12), (97, 16), (97, 20), (97, 24), (97, 28), (98, 3),
    ]  # fmt: skip
    # An unknown key never reaches the SQL: it sorts by id.
    assert [r["id"] for r in page(store, sort="id; DROP TABLE activity", limit=3)["data"]] == [30, 29, 28]
    assert page(store)["total"] == 30


def test_stats_sums_and_histograms(opened):
    store = opened()
    speeds = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    for n, s in enumerate(speeds):
        store.request_done(rec("a", tokens=tok(i=n + 1, o=2 * n, cache=n - 3, pps=float(s), tps=-1.0)))
    store.request_done(rec("b", tokens=tok(i=1000, o=1, cache=7, pps=0.0, tps=42.0)))
    store.request_done(rec("b", tokens=None))
    got = stats(store)
    assert got["total_requests"] == 12
    assert got["total_input_tokens"] == sum(range(1, 11)) + 1000
    assert got["total_output_tokens"] == sum(2 * n for n in range(10)) + 1
    assert got["total_cache_tokens"] == sum(range(1, 7)) + 7  # only positive cache counts
    # 10 values: Sturges gives ceil(log2 10) + 1 = 5 bins of (100-10)/5 = 18.
    assert got["prompt_histogram"] == {
        "bins": [2, 2, 2, 2, 2],
        "min": 10.0,
        "max": 100.0,
        "binSize": 18.0,
        "p50": 55.0,
        "p95": pytest.approx(95.5),
        "p99": pytest.approx(99.1),
    }
    one = {"bins": [1], "min": 42.0, "max": 42.0, "binSize": 0.0, "p50": 42.0, "p95": 42.0, "p99": 42.0}
    assert got["gen_histogram"] == one
    only_b = stats(store, "b")
    assert (only_b["total_requests"], only_b["total_input_tokens"], only_b["total_cache_tokens"]) == (2, 1000, 7)
    assert only_b["prompt_histogram"] is None and only_b["gen_histogram"] == one


def test_histogram_matches_hand_computation():
    assert histogram([]) is None
    values = [1.0, 2.0, 2.5, 9.0]  # 4 values: ceil(log2 4) + 1 = 3, clamped up to 5 bins of 1.6
    h = histogram(values)
    assert h is not None
    assert h["bins"] == [3, 0, 0, 0, 1] and h["binSize"] == pytest.approx(1.6)
    assert h["p50"] == pytest.approx(2.25) and h["p95"] == pytest.approx(2.5 + 0.85 * 6.5)
    many = [float(i) for i in range(1, 2001)]  # ceil(log2 2000) + 1 = 12 bins
    assert len(histogram(many)["bins"]) == 12  # type: ignore[index]
    assert len(histogram([float(i) for i in range(1, 10**6, 3)])["bins"]) == 20  # type: ignore[index]
    assert percentile([5.0], 99) == 5.0


def test_in_memory_store_keeps_the_newest_rows(opened):
    store = opened(max_rows=5)
    for _ in range(12):
        store.request_done(rec())
    got = page(store, limit=100)
    assert [r["id"] for r in got["data"]] == [12, 11, 10, 9, 8]
    assert got["total"] == 5


def test_file_store_survives_reopening_and_is_not_capped(opened, tmp_path):
    path = tmp_path / "deep" / "dir" / "activity.db"
    first = opened(max_rows=2, path=path)
    assert not first.in_memory
    for i in range(5):
        first.request_done(rec(tokens=tok(i=i)))
    first.close_sync()
    assert path.exists()
    second = opened(max_rows=2, path=path)
    r = rec()
    second.request_done(r)
    assert r.id == 6  # continues from the file's largest id
    got = page(second, limit=100)
    assert [row["id"] for row in got["data"]] == [6, 5, 4, 3, 2, 1]
    # The table is llama-swap's: another reader sees the same columns.
    with sqlite3.connect(path) as conn:
        cols = [c[1] for c in conn.execute("PRAGMA table_info(activity)")]
    assert cols[:3] == ["id", "ts_created", "model_id"] and cols[15] == "metadata_json"
    assert cols[16:] == ["ttft_ms", "waited", "wait_ms", "start_ms", "session_id"]  # swapd's, after llama-swap's


def test_close_writes_everything_queued(tmp_path):
    path = tmp_path / "a.db"
    store = ActivityStore(10, str(path))
    store.open_sync()
    for _ in range(500):
        store.request_done(rec())
    store.close_sync()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*), MAX(id) FROM activity").fetchone() == (500, 500)


def test_unopenable_file_falls_back_to_memory(opened, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = opened(max_rows=3, path=blocker / "sub" / "activity.db")
    assert store.in_memory
    for _ in range(4):
        store.request_done(rec())
    assert page(store)["total"] == 3
    not_db = tmp_path / "garbage.db"
    not_db.write_bytes(b"this is not a sqlite database" * 100)
    assert opened(path=not_db).in_memory


def test_queries_run_on_the_worker_thread(opened):
    store = opened()
    seen = store.submit(lambda conn: threading.current_thread().name).result(5)
    assert seen == "swapd-activity" != threading.current_thread().name


# -- captures ------------------------------------------------------------------


def cap(body=b'{"x":1}', resp=b'{"ok":true}', **resp_headers) -> Capture:
    return Capture(
        request_headers={"authorization": "Bearer sk-secret", "x-api-key": "k", "Cookie": "a=b", "content-type": "j"},
        request_body=body,
        response_headers={"content-type": "application/json", "set-cookie": "s", **resp_headers},
        response_body=[resp[:3], resp[3:]],
        response_size=len(resp),
    )


def test_capture_shape_and_redaction():
    item = build(7, "/v1/chat/completions", 200, cap())
    assert item is not None
    out = item.to_json()
    assert out["id"] == 7 and out["req_path"] == "/v1/chat/completions"
    redacted = dict.fromkeys(("Authorization", "X-Api-Key", "Cookie"), REDACTED)
    assert out["req_headers"] == {**redacted, "Content-Type": "j"}
    assert out["resp_headers"] == {"Content-Type": "application/json", "Set-Cookie": REDACTED}
    assert base64.b64decode(out["req_body"]) == b'{"x":1}'
    assert base64.b64decode(out["resp_body"]) == b'{"ok":true}'
    failed = build(8, "/v1/chat/completions", 500, cap()).to_json()  # type: ignore[union-attr]
    assert failed["resp_body"] is None and failed["req_body"] is not None
    image = build(9, "/v1/images/edits", 200, cap()).to_json()  # type: ignore[union-attr]
    assert image["req_body"] is None and image["resp_body"] is None and image["resp_headers"]
    import gzip

    zipped = build(10, "/v1/completions", 200, cap(resp=gzip.compress(b"plain"), **{"Content-Encoding": "gzip"}))
    assert zipped is not None and zipped.resp_body == b"plain" and "Content-Encoding" not in zipped.resp_headers  # type: ignore[operator]
    truncated = cap()
    truncated.truncated = True
    assert build(11, "/v1/completions", 200, truncated) is None


def test_captures_over_the_buffer_are_skipped_before_copying():
    import gzip

    assert build(1, "/v1/completions", 200, cap(resp=b"y" * 500), limit=400) is None
    assert build(1, "/v1/completions", 200, cap(resp=b"y" * 300), limit=400) is not None
    bomb = gzip.compress(b"\0" * 10_000_000)  # 10 kB that inflate to 10 MB
    assert build(2, "/v1/completions", 200, cap(resp=bomb, **{"Content-Encoding": "gzip"}), limit=1_000_000) is None
    broken = cap(resp=b"not gzip at all", **{"Content-Encoding": "gzip"})
    assert build(3, "/v1/completions", 200, broken) is None
    store = ActivityStore(10, captures=CaptureStore(300))
    store.open_sync()
    try:
        big, small = rec(capture=cap(resp=b"z" * 400)), rec(capture=cap())
        store.request_done(big)
        store.request_done(small)
        assert [r["has_capture"] for r in page(store)["data"]] == [True, False]
    finally:
        store.close_sync()


def test_capture_buffer_evicts_oldest_and_skips_oversized():
    store = CaptureStore(100)

    def item(i, size):
        return StoredCapture(i, "/p", None, b"x" * size, None, None, size)

    assert store.add(item(1, 40)) and store.add(item(2, 40))
    assert store.add(item(3, 40))  # evicts 1
    assert not store.has(1) and store.has(2) and store.has(3) and store.size == 80
    assert not store.add(item(4, 101))
    assert store.has(2) and len(store) == 2
    assert not CaptureStore(0).add(item(5, 1))


def test_store_marks_rows_with_a_capture(opened):
    store = opened(captures=CaptureStore(10_000))
    events = []
    store.on_activity = events.append
    store.request_done(rec(capture=cap()))
    store.request_done(rec())
    rows = page(store)["data"]
    assert [(r["id"], r["has_capture"]) for r in rows] == [(2, False), (1, True)]
    assert [e["has_capture"] for e in events] == [True, False]
    assert store.captures.get(1).req_headers["Authorization"] == REDACTED  # type: ignore[union-attr]


# -- end to end ------------------------------------------------------------------


def _events_reader(s, found: list, stop: threading.Event, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.request("GET", "/api/events", headers=headers or {})
    resp = conn.getresponse()
    while not stop.is_set():
        line = resp.readline()
        if not line:
            break
        if line.startswith(b"data:"):
            envelope = json.loads(line[5:])
            found.append(envelope)
    conn.close()


def test_routes_answer_llama_swaps_errors(swapd):
    from helpers import model

    s = swapd({"m1": model()})
    empty = s.get("/api/metrics/activity").json()
    assert empty == {"data": [], "page": 1, "limit": 25, "total": 0, "total_pages": 0}
    for query, message in [
        ("limit=0", "limit must be between 1 and 999"),
        ("limit=1000", "limit must be between 1 and 999"),
        ("limit=abc", "invalid limit"),
        ("page=0", "page must be >= 1"),
        ("sort=bogus", "invalid sort column"),
        ("order=up", "order must be asc or desc"),
        ("start=yesterday", "invalid 'start' timestamp, use RFC3339 format"),
        ("start=2026-01-02T00:00:00Z&end=2026-01-01T00:00:00Z", "start must be before end"),
        ("min_id=0", "min_id must be >= 1"),
        ("min_id=5&max_id=4", "min_id must be <= max_id"),
    ]:
        got = s.get("/api/metrics/activity?" + query)
        assert got.status == 400, query
        assert got.json()["error"]["message"] == message
    assert s.get("/api/metrics/activity?limit=999&sort=gen_speed&order=ASC").status == 200
    assert s.get("/api/metrics/stats").json() == {
        "total_requests": 0,
        "total_input_tokens": 0,
        "total_output_tokens": 0,
        "total_cache_tokens": 0,
        "prompt_histogram": None,
        "gen_histogram": None,
    }
    assert s.get("/api/captures/x").status == 400
    assert s.get("/api/captures/1").status == 404
    assert s.get("/api/captures/1").json()["error"]["message"] == "capture not found"


def _total(s, auth) -> int:
    return s.get("/api/metrics/activity", headers=auth).json()["total"]


def _wait_rows(s, auth, expected: int) -> None:
    from helpers import wait_until

    # The row is written once the response has ended, which can be just after the client read it.
    wait_until(lambda: _total(s, auth) >= expected, timeout=10, message=f"{expected} activity rows")


def test_activity_rows_stats_captures_and_events_are_exact(swapd):
    from helpers import model, wait_until

    s = swapd({"m1": model(), "m2": model()}, apiKeys=["sk-test"])
    auth = {"Authorization": "Bearer sk-test"}
    found: list = []
    stop = threading.Event()
    reader = threading.Thread(target=_events_reader, args=(s, found, stop, auth), daemon=True)
    reader.start()
    wait_until(lambda: any(e["type"] == "modelStatus" for e in found), message="the events feed")
    expected_in = expected_out = 0
    bodies = []
    for i in range(3):
        body = {"model": "m1", "messages": [{"role": "user", "content": "x" * (10 * i)}], "max_tokens": i + 2}
        raw = json.dumps(body).encode()
        bodies.append(raw)
        got = s.post("/v1/chat/completions", raw, headers={**auth, "Content-Type": "application/json"})
        assert got.status == 200
        expected_in += max(1, len(raw) // 4)  # the fake backend's prompt_tokens
        expected_out += i + 2
    status, _, _ = _stream(s, auth, "m2", 4)  # usage in the last chunk: prompt 1, completion 4
    assert status == 200
    expected_in += 1
    expected_out += 4
    _wait_rows(s, auth, 4)
    assert _total(s, auth) == 4
    rows = s.get("/api/metrics/activity", headers=auth).json()["data"]
    assert [r["model"] for r in rows] == ["m2", "m1", "m1", "m1"]
    assert rows[0]["resp_content_type"].startswith("text/event-stream")
    assert rows[0]["tokens"]["input_tokens"] == 1 and rows[0]["tokens"]["output_tokens"] == 4
    assert all(r["resp_status_code"] == 200 and r["req_path"] == "/v1/chat/completions" for r in rows)
    got = s.get("/api/metrics/stats", headers=auth).json()
    assert (got["total_requests"], got["total_input_tokens"], got["total_output_tokens"]) == (
        4,
        expected_in,
        expected_out,
    )
    assert s.get("/api/metrics/stats?model=m1", headers=auth).json()["total_requests"] == 3
    # The newest plain request's capture: its body as sent, the key redacted.
    plain = rows[1]
    assert plain["has_capture"] is True
    capture = s.get(f"/api/captures/{plain['id']}", headers=auth).json()
    assert base64.b64decode(capture["req_body"]) == bodies[-1]
    assert capture["req_headers"]["Authorization"] == REDACTED
    assert "sk-test" not in json.dumps(capture)
    assert json.loads(base64.b64decode(capture["resp_body"]))["usage"]["completion_tokens"] == 4
    wait_until(lambda: len([e for e in found if e["type"] == "activity"]) >= 4, message="activity events")
    ids = [json.loads(e["data"])["id"] for e in found if e["type"] == "activity"]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    stop.set()


def _stream(s, auth, model_id, n):
    conn = s.connection()
    try:
        body = json.dumps(
            {
                "model": model_id,
                "stream": True,
                "max_tokens": n,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "hi"}],
            }
        )
        conn.request("POST", "/v1/chat/completions", body=body, headers={**auth, "Content-Type": "application/json"})
        resp = conn.getresponse()
        try:
            data = resp.read()
        except http.client.IncompleteRead as exc:  # swapd cut the stream short
            data = exc.partial
        return resp.status, dict(resp.getheaders()), data
    finally:
        conn.close()


def test_activity_survives_a_restart_with_store_path(swapd, tmp_path):
    from helpers import model, wait_until

    db = tmp_path / "state" / "activity.db"
    s = swapd({"m1": model()}, store={"path": str(db)})
    for _ in range(2):
        assert s.chat("m1").status == 200
    _wait_rows(s, {}, 2)
    before = s.get("/api/metrics/activity").json()["data"]
    assert s.terminate() == 0
    assert Path(db).exists()
    again = swapd({"m1": model()}, store={"path": str(db)})
    assert again.get("/api/metrics/activity").json()["data"] == [dict(r, has_capture=False) for r in before]
    assert again.chat("m1").status == 200
    wait_until(lambda: _total(again, {}) == 3, timeout=10, message="3 rows")
    assert again.get("/api/metrics/activity").json()["data"][0]["id"] == 3


def test_llama_server_timings_fill_rates_and_histograms(swapd):
    from helpers import model

    s = swapd({"m1": model()})
    body = {
        "model": "m1",
        "stream": True,
        "max_tokens": 3,
        "x_timings": True,
        "messages": [{"role": "user", "content": "hello there"}],
    }
    raw = json.dumps(body).encode()
    got = s.post("/v1/chat/completions", raw, headers={"Content-Type": "application/json"})
    assert got.status == 200
    _wait_rows(s, {}, 1)
    row = s.get("/api/metrics/activity").json()["data"][0]
    prompt_n = max(1, len(raw) // 4)
    assert row["tokens"] == {
        "cache_tokens": 0,
        "draft_tokens": -1,
        "draft_acc_tokens": -1,
        "input_tokens": prompt_n,
        "output_tokens": 3,
        "prompt_per_second": 100.0,
        "tokens_per_second": 25.0,
    }
    raw_page = s.get("/api/metrics/activity").body
    assert b'"prompt_per_second":100,"tokens_per_second":25}' in raw_page  # Go writes whole floats bare
    assert row["duration_ms"] >= int(prompt_n * 10.0 + 3 * 40.0)  # llama-server's timings beat the wall time
    stats = s.get("/api/metrics/stats").json()
    assert stats["prompt_histogram"] == {
        "bins": [1], "min": 100.0, "max": 100.0, "binSize": 0.0, "p50": 100.0, "p95": 100.0, "p99": 100.0,
    }  # fmt: skip
    assert stats["gen_histogram"]["min"] == 25.0 and stats["gen_histogram"]["bins"] == [1]


def test_memory_cap_captures_off_and_log_requests(swapd):
    from helpers import model, wait_until

    s = swapd({"m1": model()}, metricsMaxInMemory=2, captureBuffer=0, logRequests=True)
    for _ in range(3):
        assert s.chat("m1", max_tokens=2).status == 200
    wait_until(lambda: [r["id"] for r in s.get("/api/metrics/activity").json()["data"]] == [3, 2], message="rows 3, 2")
    got = s.get("/api/metrics/activity").json()
    assert got["total"] == 2 and not any(r["has_capture"] for r in got["data"])
    assert s.get("/api/captures/3").status == 404
    assert s.get("/api/metrics/stats").json()["total_requests"] == 2

    def activity_lines():
        found = [e for e in s.log_events() if e.get("event") == "activity"]
        return found if len(found) == 3 else None

    lines = wait_until(activity_lines, message="3 activity log lines")
    assert [e["id"] for e in lines] == [1, 2, 3]
    assert all(e["model"] == "m1" and e["status"] == 200 and e["output_tokens"] == 2 for e in lines)


def test_a_failed_stream_is_recorded_with_its_error(swapd):
    from helpers import model

    s = swapd({"m1": model("--crash-after-chunks", "2", "--interval", "0.05")})
    status, _, _ = _stream(s, {}, "m1", 10)
    _wait_rows(s, {}, 1)
    row = s.get("/api/metrics/activity").json()["data"][0]
    assert status == 200  # the headers had gone out
    assert "mid-response" in row["error_msg"]
    assert row["resp_content_type"] == "text/event-stream"
    assert row["tokens"]["output_tokens"] == 0  # no usage arrived


def test_an_unopenable_store_path_is_logged_and_activity_stays_in_memory(swapd, tmp_path):
    from helpers import model

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    s = swapd({"m1": model()}, store={"path": str(blocker / "activity.db")})
    failed = [e for e in s.log_events() if e.get("event") == "activity.store_failed"]
    assert failed and failed[0]["path"] == str(blocker / "activity.db") and "in memory" in failed[0]["fallback"]
    assert failed[0]["level"] == "error"
    assert s.chat("m1").status == 200
    _wait_rows(s, {}, 1)


def test_a_backends_error_message_becomes_error_msg(swapd):
    from helpers import model

    s = swapd({"m1": model("--api-key", "backend-key")})  # swapd has no apiKeys: the client's header goes through
    got = s.chat("m1")
    assert got.status == 401
    _wait_rows(s, {}, 1)
    row = s.get("/api/metrics/activity").json()["data"][0]
    assert (row["resp_status_code"], row["error_msg"]) == (401, "invalid api key")
    capture = s.get(f"/api/captures/{row['id']}").json()
    assert capture["resp_body"] is None and capture["resp_headers"]["Content-Type"].startswith("application/json")


# -- swapd's columns: time to first token, the start or swap waited on -------------


def _rows(s) -> list[dict]:
    return s.get("/api/metrics/activity").json()["data"]


def _pick(row: dict) -> tuple:
    return row["waited"], row["wait_ms"], row["start_ms"], row["ttft_ms"]


def test_rows_carry_ttft_and_the_start_or_swap_they_waited_on(swapd):
    from helpers import model

    # one swap group: b's start stops a
    s = swapd(
        {"a": model("--load-delay", "0.4"), "b": model()},
        groups={"g": {"swap": True, "members": ["a", "b"]}},
    )
    status, _, _ = _stream(s, {}, "a", 3)  # a cold start
    assert status == 200
    _wait_rows(s, {}, 1)
    cold = _rows(s)[0]
    waited, wait_ms, start_ms, ttft_ms = _pick(cold)
    assert waited == "start"
    assert 400 <= start_ms <= wait_ms, cold  # the start includes the backend's load delay
    assert ttft_ms >= start_ms, cold  # counted from arrival: the start came first
    assert cold["resp_content_type"].startswith("text/event-stream")

    status, _, _ = _stream(s, {}, "a", 3)  # now warm
    assert status == 200
    _wait_rows(s, {}, 2)
    warm = _rows(s)[0]
    assert _pick(warm)[:3] == ("", 0, 0), warm
    assert 0 <= warm["ttft_ms"] < start_ms, warm

    assert s.chat("a").status == 200  # not a stream: no ttft
    _wait_rows(s, {}, 3)
    plain = _rows(s)[0]
    assert _pick(plain) == ("", 0, 0, -1), plain

    assert s.chat("b").status == 200  # stops a, then starts b
    _wait_rows(s, {}, 4)
    swap = _rows(s)[0]
    waited, wait_ms, start_ms, ttft_ms = _pick(swap)
    assert swap["model"] == "b" and waited == "swap", swap
    assert 0 < start_ms <= wait_ms and ttft_ms == -1, swap
    # llama-swap's fields are all still there
    assert {"id", "timestamp", "model", "req_path", "resp_content_type", "resp_status_code", "tokens"} <= set(swap)
    assert swap["duration_ms"] >= wait_ms


# llama-swap's table as swapd created it before the ttft/wait columns
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS activity (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_created INTEGER NOT NULL,
    model_id TEXT NOT NULL,
    req_path TEXT NOT NULL DEFAULT '',
    resp_content_type TEXT NOT NULL DEFAULT '',
    resp_status_code INTEGER NOT NULL DEFAULT 0,
    cache_tokens INTEGER NOT NULL DEFAULT 0,
    draft_tokens INTEGER NOT NULL DEFAULT 0,
    draft_acc_tokens INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    prompt_per_second REAL NOT NULL DEFAULT 0,
    tokens_per_second REAL NOT NULL DEFAULT 0,
    duration_ms INTEGER NOT NULL DEFAULT 0,
    error_msg TEXT NOT NULL DEFAULT '',
    metadata_json TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS idx_activity_created_id ON activity (ts_created DESC, id DESC);
CREATE INDEX IF NOT EXISTS idx_activity_model_created_id ON activity (model_id, ts_created DESC, id DESC);
"""


def test_a_store_file_with_the_old_schema_gets_the_new_columns(swapd, tmp_path):
    from helpers import model, wait_until

    db = tmp_path / "old" / "activity.db"
    db.parent.mkdir()
    with sqlite3.connect(db) as conn:
        conn.executescript(OLD_SCHEMA)
        conn.execute(
            "INSERT INTO activity (ts_created, model_id, req_path, resp_content_type, resp_status_code,"
            " cache_tokens, draft_tokens, draft_acc_tokens, input_tokens, output_tokens,"
            " prompt_per_second, tokens_per_second, duration_ms, error_msg, metadata_json)"
            " VALUES (1700000000, 'm1', '/v1/chat/completions', 'application/json', 200,"
            " 3, -1, -1, 12, 7, 100.5, 20.0, 900, '', '{\"selector\":\"s1\"}')"
        )
    conn.close()
    s = swapd({"m1": model()}, store={"path": str(db)})
    old = _rows(s)
    assert old == [
        {
            "id": 1,
            "timestamp": rfc3339(1_700_000_000),
            "model": "m1",
            "req_path": "/v1/chat/completions",
            "resp_content_type": "application/json",
            "resp_status_code": 200,
            "tokens": {
                "cache_tokens": 3,
                "draft_tokens": -1,
                "draft_acc_tokens": -1,
                "input_tokens": 12,
                "output_tokens": 7,
                "prompt_per_second": 100.5,
                "tokens_per_second": 20,
            },
            "duration_ms": 900,
            "has_capture": False,
            "metadata": {"selector": "s1"},
            "ttft_ms": -1,
            "waited": "",
            "wait_ms": 0,
            "start_ms": 0,
        }
    ]
    added = [e["column"] for e in s.log_events() if e.get("event") == "activity.column_added"]
    assert added == ["ttft_ms", "waited", "wait_ms", "start_ms", "session_id"]
    assert s.chat("m1").status == 200
    _wait_rows(s, {}, 2)
    new = _rows(s)[0]
    assert new["id"] == 2 and new["waited"] == "start" and new["start_ms"] > 0
    assert s.terminate() == 0
    with sqlite3.connect(db) as conn:
        cols = [c[1] for c in conn.execute("PRAGMA table_info(activity)")]
        written = conn.execute("SELECT id, waited, start_ms > 0 FROM activity ORDER BY id").fetchall()
    conn.close()
    assert cols[16:] == ["ttft_ms", "waited", "wait_ms", "start_ms", "session_id"]
    assert written == [(1, "", 0), (2, "start", 1)]
    # opened again: nothing left to add, both rows served
    again = swapd({"m1": model()}, store={"path": str(db)})
    wait_until(lambda: _total(again, {}) == 2, timeout=10, message="2 rows")
    assert not [e for e in again.log_events() if e.get("event") == "activity.column_added"]
    assert [r["waited"] for r in _rows(again)] == ["start", ""]
