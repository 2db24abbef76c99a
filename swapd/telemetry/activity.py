"""llama-swap's activity store: one SQLite row per proxied request.

``ActivityStore`` is a request sink. ``request_done`` runs on the event loop
and never touches the database: it gives the record its row id (a counter
that continues from the largest id in the file when it was opened), keeps the
capture, queues the insert and announces the row on ``/api/events``. One
worker thread owns the only SQLite connection and runs everything, inserts
and queries alike, in the order it was queued, so a query made after a
request was recorded sees that request.

Without ``store.path`` the table lives in memory and keeps the newest
``metricsMaxInMemory`` rows; with it, the file keeps every row (llama-swap
prunes only its in-memory store) and survives restarts. A file that cannot be
opened is logged as an error and the store runs in memory instead.

The table, its columns and the queries (filters, sort keys, paging, the
statistics and their histograms) follow llama-swap's ``internal/store``;
swapd adds five columns after llama-swap's (``ADDED_COLUMNS``: time to first
token, the start or swap a request waited on and how long, and the client's
session id from the ``ui.activity.session_id`` headers, which llama-swap
shows for requests in flight only), which an older file gets when it is
opened.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar

from swapd.logging import get_logger
from swapd.telemetry.captures import CaptureStore
from swapd.telemetry.record import RequestRecord

log = get_logger("swapd.activity")

T = TypeVar("T")

SCHEMA = """
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
    metadata_json TEXT NOT NULL DEFAULT '',
    ttft_ms INTEGER NOT NULL DEFAULT -1,
    waited TEXT NOT NULL DEFAULT '',
    wait_ms INTEGER NOT NULL DEFAULT 0,
    start_ms INTEGER NOT NULL DEFAULT 0,
    session_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS idx_activity_created_id ON activity (ts_created DESC, id DESC);
CREATE INDEX IF NOT EXISTS idx_activity_model_created_id ON activity (model_id, ts_created DESC, id DESC);
"""

# swapd's own columns, after llama-swap's: a file made before they existed gets them
# (ALTER TABLE ... ADD COLUMN) when it is opened, and its old rows read the defaults.
ADDED_COLUMNS = (
    ("ttft_ms", "INTEGER NOT NULL DEFAULT -1"),  # time to the first byte of a stream; -1: not a stream
    ("waited", "TEXT NOT NULL DEFAULT ''"),  # "start", "swap" or ""
    ("wait_ms", "INTEGER NOT NULL DEFAULT 0"),  # arrival to the lease, when it waited on a start or swap
    ("start_ms", "INTEGER NOT NULL DEFAULT 0"),  # the model start(s) it waited on (stops not included)
    ("session_id", "TEXT NOT NULL DEFAULT ''"),  # the ui.activity.session_id header's value ("" when none)
)

COLUMNS = (
    "id, ts_created, model_id, req_path, resp_content_type, resp_status_code, "
    "cache_tokens, draft_tokens, draft_acc_tokens, input_tokens, output_tokens, "
    "prompt_per_second, tokens_per_second, duration_ms, error_msg, metadata_json, "
    + ", ".join(name for name, _ in ADDED_COLUMNS)
)
_PLACEHOLDERS = ", ".join("?" * (16 + len(ADDED_COLUMNS)))

# The API's sort keys (the UI's column ids) and their columns; nothing else reaches the SQL.
SORT_COLUMNS = {
    "id": "id",
    "time": "ts_created",
    "model": "model_id",
    "req_path": "req_path",
    "resp_status_code": "resp_status_code",
    "resp_content_type": "resp_content_type",
    "cached": "cache_tokens",
    "prompt": "input_tokens",
    "generated": "output_tokens",
    "drafted": "draft_tokens",
    "prompt_speed": "prompt_per_second",
    "gen_speed": "tokens_per_second",
    "duration": "duration_ms",
}

DEFAULT_LIMIT = 25
MAX_LIMIT = 999


@dataclass(slots=True)
class ActivityQuery:
    models: Sequence[str] = ()
    start: int | None = None  # unix seconds, inclusive
    end: int | None = None
    min_id: int = 0
    max_id: int = 0
    limit: int = DEFAULT_LIMIT
    page: int = 1
    sort: str = ""
    order: str = ""


# rows are handed to the SQLite thread at most this often
FLUSH_SECONDS = 0.25


@dataclass(slots=True)
class _Insert:
    rows: list[tuple]


@dataclass(slots=True)
class _Call:
    fn: Callable[[sqlite3.Connection], Any]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


# -- rows --------------------------------------------------------------------


def rfc3339(ts: int) -> str:
    """A unix time as Go marshals a local ``time.Time`` (``Z`` for UTC)."""
    dt = datetime.fromtimestamp(ts).astimezone()
    offset = dt.utcoffset()
    seconds = int(offset.total_seconds()) if offset is not None else 0
    if seconds == 0:
        zone = "Z"
    else:
        sign = "+" if seconds > 0 else "-"
        hours, minutes = divmod(abs(seconds) // 60, 60)
        zone = f"{sign}{hours:02d}:{minutes:02d}"
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + zone


_ERROR_BODY_LIMIT = 64 * 1024


def _body_error(record: RequestRecord) -> str:
    """llama-swap's error text from a failed JSON answer: ``error.message``, ``error``, ``message``, ``detail``."""
    capture = record.capture
    if capture is None or not capture.response_body or sum(map(len, capture.response_body)) > _ERROR_BODY_LIMIT:
        return ""
    try:
        body = json.loads(b"".join(capture.response_body))
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    error = body.get("error")
    candidates = [
        error.get("message") if isinstance(error, dict) else None,
        error,
        body.get("message"),
        body.get("detail"),
    ]
    for value in candidates:
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def error_message(record: RequestRecord) -> str:
    """The row's ``error_msg``: the backend's own message for a failed answer, else swapd's reason, else the status."""
    text = _body_error(record) if record.status != 200 else ""
    text = text or record.error
    if text:
        return text[:500] + ("..." if len(text) > 500 else "")
    if record.status and record.status != 200:
        try:
            return f"{record.status} {HTTPStatus(record.status).phrase}"
        except ValueError:
            return f"HTTP {record.status}"
    return ""


def _num(value: float) -> float | int:
    """A float as Go's JSON writes it: ``100`` rather than ``100.0``."""
    return int(value) if value.is_integer() and abs(value) < 1e21 else value


def row_of(record: RequestRecord) -> tuple:
    """The record as a row of the activity table (id included)."""
    t = record.tokens
    duration_ms = int(record.duration_s * 1000)
    if t is None:
        # llama-swap keeps a zero TokenMetrics when the response carried no usage.
        tokens: tuple = (0, 0, 0, 0, 0, 0.0, 0.0)
    else:
        tokens = (
            t.cache,
            t.draft,
            t.draft_accepted,
            t.input,
            t.output,
            float(t.prompt_per_second),
            float(t.tokens_per_second),
        )
        duration_ms = max(duration_ms, int(t.timings_ms))
    metadata = json.dumps(record.metadata, separators=(",", ":"), sort_keys=True) if record.metadata else ""
    ttft = record.ttft_s
    waited = record.waited
    return (
        record.id,
        int(record.timestamp + record.duration_s),  # llama-swap stamps a row when the request ends
        record.model,
        record.path,
        record.content_type,
        record.status,
        *tokens,
        duration_ms,
        error_message(record),
        metadata,
        -1 if ttft is None else int(ttft * 1000),
        waited,
        round(record.queued_s * 1000) if waited else 0,
        round(sum(max(0.0, w.ready - w.stops_done) for w in record.waits) * 1000),
        record.session_id,
    )


def entry_of(row: Sequence[Any], has_capture: bool = False) -> dict[str, Any]:
    """llama-swap's ``ActivityLogEntry`` JSON for a table row."""
    entry: dict[str, Any] = {
        "id": row[0],
        "timestamp": rfc3339(row[1]),
        "model": row[2],
        "req_path": row[3],
        "resp_content_type": row[4],
        "resp_status_code": row[5],
        "tokens": {
            "cache_tokens": row[6],
            "draft_tokens": row[7],
            "draft_acc_tokens": row[8],
            "input_tokens": row[9],
            "output_tokens": row[10],
            "prompt_per_second": _num(row[11]),
            "tokens_per_second": _num(row[12]),
        },
        "duration_ms": row[13],
        "has_capture": has_capture,
        # swapd's additions
        "ttft_ms": row[16],
        "waited": row[17],
        "wait_ms": row[18],
        "start_ms": row[19],
    }
    if row[20]:
        entry["session_id"] = row[20]
    if row[14]:
        entry["error_msg"] = row[14]
    if row[15]:
        try:
            metadata = json.loads(row[15])
        except ValueError:
            metadata = None
        if metadata:
            entry["metadata"] = metadata
    return entry


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Give a table made by an older schema (llama-swap's, or swapd's before ``ADDED_COLUMNS``) the new columns."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(activity)")}
    for name, decl in ADDED_COLUMNS:
        if name not in have:
            conn.execute(f"ALTER TABLE activity ADD COLUMN {name} {decl}")
            log.info("activity.column_added", column=name)


# -- queries (run on the worker thread) -----------------------------------------


def _where(models: Sequence[str] = (), start=None, end=None, min_id=0, max_id=0) -> tuple[str, list[Any]]:
    conditions: list[str] = []
    args: list[Any] = []
    names = [m.strip() for m in models if m.strip()]
    if names:
        conditions.append("model_id IN (" + ", ".join("?" * len(names)) + ")")
        args.extend(names)
    if start is not None:
        conditions.append("ts_created >= ?")
        args.append(start)
    if end is not None:
        conditions.append("ts_created <= ?")
        args.append(end)
    if min_id > 0:
        conditions.append("id >= ?")
        args.append(min_id)
    if max_id > 0:
        conditions.append("id <= ?")
        args.append(max_id)
    return (" WHERE " + " AND ".join(conditions) if conditions else ""), args


def _order_by(query: ActivityQuery) -> str:
    column = SORT_COLUMNS.get(query.sort, "id")
    direction = "ASC" if query.order.lower() == "asc" else "DESC"
    if column == "id":
        return f" ORDER BY id {direction}"
    return f" ORDER BY {column} {direction}, id {direction}"


def list_rows(conn: sqlite3.Connection, query: ActivityQuery) -> tuple[list[tuple], int]:
    where, args = _where(query.models, query.start, query.end, query.min_id, query.max_id)
    total = conn.execute("SELECT COUNT(*) FROM activity" + where, args).fetchone()[0]
    offset = (query.page - 1) * query.limit
    rows = conn.execute(
        f"SELECT {COLUMNS} FROM activity{where}{_order_by(query)} LIMIT ? OFFSET ?", [*args, query.limit, offset]
    ).fetchall()
    return rows, total


def total_pages(total: int, limit: int) -> int:
    if total == 0 or limit <= 0:
        return 0
    return math.ceil(total / limit)


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between the closest ranks of sorted ``values``."""
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    rank = (p / 100) * (len(values) - 1)
    lower, upper = math.floor(rank), math.ceil(rank)
    return values[lower] + (rank - lower) * (values[upper] - values[lower])


def histogram(values: Sequence[float]) -> dict[str, Any] | None:
    """llama-swap's ``HistogramData``: Sturges' bin count clamped to 5..20, null when empty."""
    if not values:
        return None
    ordered = sorted(values)
    lo, hi = ordered[0], ordered[-1]
    p50, p95, p99 = (percentile(ordered, p) for p in (50, 95, 99))
    if lo == hi:
        size = 0.0
        bins = [len(values)]
    else:
        count = min(20, max(5, math.ceil(math.log2(len(values))) + 1))
        size = (hi - lo) / count
        bins = [0] * count
        for value in values:
            bins[min(math.floor((value - lo) / size), count - 1)] += 1
    numbers = {"min": lo, "max": hi, "binSize": size, "p50": p50, "p95": p95, "p99": p99}
    return {"bins": bins, **{k: _num(float(v)) for k, v in numbers.items()}}


def stats(conn: sqlite3.Connection, model: str = "") -> dict[str, Any]:
    where, args = _where([model] if model.strip() else [])
    requests, inputs, outputs, cached = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0),"
        " COALESCE(SUM(CASE WHEN cache_tokens > 0 THEN cache_tokens ELSE 0 END), 0) FROM activity" + where,
        args,
    ).fetchone()
    speed = (
        " AND (prompt_per_second > 0 OR tokens_per_second > 0)"
        if where
        else (" WHERE prompt_per_second > 0 OR tokens_per_second > 0")
    )
    prompt: list[float] = []
    gen: list[float] = []
    for p, g in conn.execute("SELECT prompt_per_second, tokens_per_second FROM activity" + where + speed, args):
        if p > 0:
            prompt.append(p)
        if g > 0:
            gen.append(g)
    return {
        "total_requests": requests,
        "total_input_tokens": inputs,
        "total_output_tokens": outputs,
        "total_cache_tokens": cached,
        "prompt_histogram": histogram(prompt),
        "gen_histogram": histogram(gen),
    }


# -- the store -----------------------------------------------------------------


class ActivityStore:
    """The activity table behind one worker thread; a ``RequestSink``."""

    def __init__(
        self,
        max_in_memory: int = 1000,
        path: str = "",
        *,
        captures: CaptureStore | None = None,
        on_activity: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.max_in_memory = max_in_memory
        self.path = path.strip()
        self.captures = captures
        self.on_activity = on_activity
        self.activity_wanted: Callable[[], bool] | None = None  # False: nobody listens, skip building the event
        self.in_memory = True  # until a file opened
        self._queue: queue.SimpleQueue[_Insert | _Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._next_id = 0
        self._closed = False
        self.dropped = 0  # inserts that failed
        # Rows wait here, on the loop, and go to the worker in one batch at most every FLUSH_SECONDS:
        # one thread wake-up per request cost the relay 0.1 ms of added latency (GIL hand-offs).
        self._rows: list[tuple] = []
        self._flush_handle: asyncio.TimerHandle | None = None

    # -- lifecycle ---------------------------------------------------------
    async def open(self) -> None:
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="swapd-activity", daemon=True)
        self._thread.start()
        self._next_id = await asyncio.wrap_future(ready)

    def open_sync(self) -> None:
        """``open`` for callers without a loop (tests, tools)."""
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="swapd-activity", daemon=True)
        self._thread.start()
        self._next_id = ready.result()

    async def close(self) -> None:
        """Write what is queued, then close the database."""
        if self._thread is None or self._closed:
            return
        self.flush()
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    def close_sync(self) -> None:
        if self._thread is None or self._closed:
            return
        self.flush()
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def flush(self) -> None:
        """Hand the rows waiting on the loop to the worker (queries and close call it first)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._rows:
            rows, self._rows = self._rows, []
            self._queue.put(_Insert(rows))

    # -- the sink ----------------------------------------------------------
    def request_done(self, record: RequestRecord) -> None:
        if self._thread is None or self._closed:
            return
        if record.method.upper() != "POST":
            return  # llama-swap meters the model-dispatched POSTs only
        self._next_id += 1
        record.id = self._next_id
        row = row_of(record)
        self._rows.append(row)
        if self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (tools, tests): write through
                self.flush()
            else:
                self._flush_handle = loop.call_later(FLUSH_SECONDS, self.flush)
        has_capture = False
        if self.captures is not None and self.captures.enabled and record.capture is not None:
            has_capture = self.captures.add_record(record.id, record.path, record.status, record.capture)
        if self.on_activity is not None and (self.activity_wanted is None or self.activity_wanted()):
            self.on_activity(entry_of(row, has_capture))

    # -- queries -----------------------------------------------------------
    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> concurrent.futures.Future[T]:
        call = _Call(fn)
        self.flush()  # a query sees every request that ended before it
        if self._thread is None or self._closed:
            call.future.set_exception(RuntimeError("the activity store is closed"))
        else:
            self._queue.put(call)
        return call.future

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.wrap_future(self.submit(fn))

    def _has_capture(self, row_id: int) -> bool:
        return self.captures is not None and self.captures.has(row_id)

    async def list_activity(self, query: ActivityQuery) -> dict[str, Any]:
        rows, total = await self.call(lambda conn: list_rows(conn, query))
        return self.page_of(rows, total, query)

    def page_of(self, rows: list[tuple], total: int, query: ActivityQuery) -> dict[str, Any]:
        return {
            "data": [entry_of(row, self._has_capture(row[0])) for row in rows],
            "page": query.page,
            "limit": query.limit,
            "total": total,
            "total_pages": total_pages(total, query.limit),
        }

    async def stats(self, model: str = "") -> dict[str, Any]:
        return await self.call(lambda conn: stats(conn, model))

    # -- the worker --------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self.path:
            try:
                Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(Path(self.path).expanduser(), isolation_level=None)
                try:
                    conn.execute("PRAGMA busy_timeout = 5000")
                    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                    if str(mode).lower() != "wal":
                        raise sqlite3.OperationalError(f"could not enable WAL mode (got {mode!r})")
                    conn.executescript(SCHEMA)
                    _add_missing_columns(conn)
                except BaseException:
                    conn.close()
                    raise
                self.in_memory = False
                return conn
            except (OSError, sqlite3.Error) as exc:
                log.error(
                    "activity.store_failed",
                    path=self.path,
                    error=str(exc),
                    fallback=f"in memory, newest {self.max_in_memory} rows; activity will not survive a restart",
                )
        conn = sqlite3.connect(":memory:", isolation_level=None)
        conn.executescript(SCHEMA)
        self.in_memory = True
        return conn

    def _run(self, ready: concurrent.futures.Future) -> None:
        try:
            conn = self._connect()
            last = conn.execute("SELECT COALESCE(MAX(id), 0) FROM activity").fetchone()[0]
            # AUTOINCREMENT never reuses an id, even one since deleted.
            seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'activity'").fetchone()
            if seq is not None:
                last = max(last, seq[0])
        except BaseException as exc:  # pragma: no cover - :memory: does not fail
            ready.set_exception(exc)
            return
        log.info(
            "activity.store_open",
            path=self.path if not self.in_memory else "",
            in_memory=self.in_memory,
            max_rows=self.max_in_memory if self.in_memory else None,
            last_id=last,
        )
        ready.set_result(last)
        try:
            self._serve(conn)
        finally:
            conn.close()

    def _serve(self, conn: sqlite3.Connection) -> None:
        while True:
            job = self._queue.get()
            batch: list[tuple] = []
            pending: list[_Insert | _Call | None] = [job]
            # Take everything queued: inserts go in one transaction, in order with the calls.
            while True:
                try:
                    pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for item in pending:
                if isinstance(item, _Insert):
                    batch.extend(item.rows)
                    continue
                self._write(conn, batch)
                batch = []
                if item is None:
                    # Closing: what was queued before the close is written; nothing follows it.
                    return
                try:
                    item.future.set_result(item.fn(conn))
                except BaseException as exc:
                    item.future.set_exception(exc)
            self._write(conn, batch)

    def _write(self, conn: sqlite3.Connection, rows: list[tuple]) -> None:
        if not rows:
            return
        try:
            with conn:
                conn.execute("BEGIN")
                conn.executemany(f"INSERT INTO activity ({COLUMNS}) VALUES ({_PLACEHOLDERS})", rows)
                if self.in_memory:
                    conn.execute(
                        "DELETE FROM activity WHERE id <= (SELECT MAX(id) FROM activity) - ?", (self.max_in_memory,)
                    )
        except sqlite3.Error as exc:
            self.dropped += len(rows)
            log.warning("activity.insert_failed", rows=len(rows), error=str(exc))


class RequestLogSink:
    """``logRequests``: one ``activity`` line per recorded request, at info level.

    llama-swap (which has deprecated the key) logs every request's method,
    path, status, size and time; swapd's ``request`` lines already do that,
    so this adds what the activity row knows: its id, the model, the tokens,
    the rates and the duration.
    """

    def request_done(self, record: RequestRecord) -> None:
        t = record.tokens
        fields: dict[str, Any] = {
            "id": record.id or None,
            "model": record.model,
            "method": record.method,
            "path": record.path,
            "status": record.status,
            "duration_ms": int(record.duration_s * 1000),
        }
        if t is not None:
            fields.update(input_tokens=t.input, output_tokens=t.output)
            if t.cache >= 0:
                fields["cache_tokens"] = t.cache
            if t.prompt_per_second > 0:
                fields["prompt_per_second"] = round(t.prompt_per_second, 2)
            if t.tokens_per_second > 0:
                fields["tokens_per_second"] = round(t.tokens_per_second, 2)
        if record.ttft_s is not None:
            fields["ttft_ms"] = int(record.ttft_s * 1000)
        if record.waited:
            fields["waited"] = record.waited
        if record.error:
            fields["error"] = record.error
        log.info("activity", **fields)
