"""OpenTelemetry traces (swapd.telemetry.otel) against a real OTLP/HTTP receiver.

The receiver is a plain http.server on 127.0.0.1 that accepts POST /v1/traces
and decodes the protobuf body with opentelemetry-proto, as a collector would.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

pytest.importorskip("opentelemetry.sdk.trace")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")

from helpers import PY, ROOT, model, wait_until  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402

from swapd.config import load_config_text  # noqa: E402
from swapd.config._model import TelemetrySettings  # noqa: E402
from swapd.telemetry import otel  # noqa: E402
from swapd.telemetry.record import RequestRecord, Tokens, Wait  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


# -- a real OTLP/HTTP receiver ---------------------------------------------------


class Receiver:
    """POST /v1/traces: each body decoded as an ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                message = ExportTraceServiceRequest()
                message.ParseFromString(body)
                with receiver.lock:
                    receiver.requests.append(message)
                    receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def spans(self) -> list:
        with self.lock:
            return [
                span
                for request in self.requests
                for resource_spans in request.resource_spans
                for scope_spans in resource_spans.scope_spans
                for span in scope_spans.spans
            ]

    def resources(self) -> list[dict]:
        with self.lock:
            return [attrs(rs.resource.attributes) for request in self.requests for rs in request.resource_spans]

    def wait_spans(self, n: int, timeout: float = 10.0) -> list:
        wait_until(lambda: len(self.spans()) >= n, timeout=timeout, message=f"{n} spans at the receiver")
        return self.spans()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def attrs(kvs) -> dict:
    out = {}
    for kv in kvs:
        value = kv.value
        kind = value.WhichOneof("value")
        if kind == "array_value":
            out[kv.key] = [getattr(v, v.WhichOneof("value")) for v in value.array_value.values]
        else:
            out[kv.key] = getattr(value, kind) if kind else None
    return out


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # milliseconds; the SDK's BatchSpanProcessor reads it


def tracer_for(url: str, **kw) -> otel.OtelTracer:
    tracer = otel.make_tracer(TelemetrySettings(enabled=True, endpoint=url, **kw))
    assert tracer is not None
    return tracer


def close(tracer: otel.OtelTracer) -> None:
    asyncio.run(tracer.close())


def record(**kw) -> RequestRecord:
    fields = dict(
        timestamp=time.time(),
        t0=time.monotonic(),
        method="POST",
        path="/v1/chat/completions",
        model="qwen-7b",
        requested="qwen",
        operation="chat",
        client_stream=True,
    )
    fields.update(kw)
    return RequestRecord(**fields)


def answer(rec: RequestRecord, *, status: int = 200, duration: float = 0.8) -> None:
    """Fill ``rec`` the way the relay does for a streamed answer."""
    rec.status = status
    rec.stream = True
    rec.content_type = "text/event-stream"
    rec.first_byte = rec.t0 + duration / 2
    rec.end = rec.t0 + duration
    rec.tokens = Tokens(input=12, output=34, cache=5, tokens_per_second=40.0)
    rec.finish_reasons = ("stop",)
    rec.response_model = "qwen-7b-q4"
    rec.queued_s = 0.3


# -- unit level ------------------------------------------------------------------


def test_request_span_continues_the_trace_and_carries_genai_attributes(receiver):
    tracer = tracer_for(receiver.url)
    try:
        rec = record(traceparent=TRACEPARENT, tracestate="vendor=abc")
        tracer.start(rec)
        out = tracer.outgoing(rec)
        assert out["traceparent"].startswith(f"00-{TRACE_ID}-")
        assert int(out["traceparent"].split("-")[3], 16) & 1  # sampled
        assert out["tracestate"] == "vendor=abc"
        span_id = out["traceparent"].split("-")[2]
        assert span_id != PARENT_ID
        t0 = rec.t0
        rec.waits.append(Wait("qwen-7b", t0 + 0.01, t0 + 0.1, t0 + 0.3, ("llama-3b", "phi")))
        answer(rec)
        tracer.finish(rec)
        assert rec.span is None
        spans = {s.name: s for s in receiver.wait_spans(3)}
    finally:
        close(tracer)

    main = spans["chat qwen"]
    assert main.trace_id.hex() == TRACE_ID
    assert main.parent_span_id.hex() == PARENT_ID
    assert main.span_id.hex() == span_id
    assert main.kind == main.SPAN_KIND_SERVER
    a = attrs(main.attributes)
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "qwen"
    assert a["gen_ai.response.model"] == "qwen-7b-q4"
    assert a["gen_ai.provider.name"] == "swapd"
    assert a["gen_ai.usage.input_tokens"] == 12
    assert a["gen_ai.usage.output_tokens"] == 34
    assert a["gen_ai.usage.cache_read.input_tokens"] == 5
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.request.stream"] is True
    assert a["http.request.method"] == "POST"
    assert a["url.path"] == "/v1/chat/completions"
    assert a["http.response.status_code"] == 200
    assert a["swapd.model"] == "qwen-7b"
    assert a["swapd.waited"] == "swap"
    assert a["swapd.queued_s"] == pytest.approx(0.3)
    assert a["swapd.time_to_first_token_s"] == pytest.approx(0.4)
    assert main.status.code == main.status.STATUS_CODE_UNSET
    # the span covers arrival to the end of the response, on the wall clock
    assert main.start_time_unix_nano == int(rec.timestamp * 1e9)
    assert main.end_time_unix_nano - main.start_time_unix_nano == pytest.approx(0.8e9, abs=1e6)

    start = spans["swapd.model_start"]
    swap = spans["swapd.swap"]
    assert start.trace_id == main.trace_id and swap.trace_id == main.trace_id
    assert start.parent_span_id == main.span_id
    assert swap.parent_span_id == start.span_id
    assert attrs(start.attributes)["swapd.model"] == "qwen-7b"
    assert attrs(swap.attributes)["swapd.stopped_models"] == ["llama-3b", "phi"]
    base = main.start_time_unix_nano
    assert start.start_time_unix_nano - base == pytest.approx(0.01e9, abs=1e6)
    assert swap.start_time_unix_nano == start.start_time_unix_nano
    assert swap.end_time_unix_nano - base == pytest.approx(0.1e9, abs=1e6)
    assert start.end_time_unix_nano - base == pytest.approx(0.3e9, abs=1e6)
    assert base <= start.start_time_unix_nano <= swap.end_time_unix_nano <= start.end_time_unix_nano
    assert start.end_time_unix_nano <= main.end_time_unix_nano
    resource = receiver.resources()[0]
    assert resource["service.name"] == "swapd"
    assert resource["service.version"]


def test_a_cold_start_has_no_swap_span_and_a_new_trace_without_traceparent(receiver):
    tracer = tracer_for(receiver.url)
    try:
        rec = record(path="/v1/embeddings", operation="", client_stream=False, requested="")
        tracer.start(rec)
        rec.waits.append(Wait("qwen-7b", rec.t0, rec.t0, rec.t0 + 0.2))
        rec.status = 200
        rec.end = rec.t0 + 0.25
        tracer.finish(rec)
        spans = {s.name: s for s in receiver.wait_spans(2)}
    finally:
        close(tracer)
    assert set(spans) == {"embeddings qwen-7b", "swapd.model_start"}
    main = spans["embeddings qwen-7b"]
    assert main.parent_span_id == b""
    a = attrs(main.attributes)
    assert a["gen_ai.operation.name"] == "embeddings"  # from the path when record.operation is empty
    assert a["swapd.waited"] == "start"
    assert "gen_ai.usage.input_tokens" not in a  # no usage in the answer
    assert "swapd.time_to_first_token_s" not in a  # not a stream
    assert spans["swapd.model_start"].parent_span_id == main.span_id


def test_errors_mark_the_span(receiver):
    tracer = tracer_for(receiver.url)
    try:
        failed = record()
        tracer.start(failed)
        failed.status, failed.error, failed.end = 502, "backend_start_failed", failed.t0 + 0.1
        tracer.finish(failed)
        refused = record(requested="other")
        tracer.start(refused)
        refused.status, refused.end = 404, refused.t0 + 0.01
        tracer.finish(refused)
        spans = {s.name: s for s in receiver.wait_spans(2)}
    finally:
        close(tracer)
    bad = spans["chat qwen"]
    assert bad.status.code == bad.status.STATUS_CODE_ERROR
    assert bad.status.message == "backend_start_failed"
    assert attrs(bad.attributes)["error.type"] == "backend_start_failed"
    not_found = spans["chat other"]
    assert not_found.status.code == not_found.status.STATUS_CODE_UNSET  # a 4xx is the client's error
    assert "error.type" not in attrs(not_found.attributes)


def test_sampling_is_parent_based(receiver):
    tracer = tracer_for(receiver.url, sample_ratio=0.0)
    try:
        dropped = record()
        tracer.start(dropped)
        out = tracer.outgoing(dropped)
        assert not int(out["traceparent"].split("-")[3], 16) & 1  # the backend learns it is not sampled
        answer(dropped)
        tracer.finish(dropped)
        kept = record(traceparent=TRACEPARENT, requested="sampled-by-parent")
        tracer.start(kept)
        answer(kept)
        tracer.finish(kept)
        tracer.force_flush()
        spans = receiver.wait_spans(1)
        time.sleep(0.2)
        spans = receiver.spans()
    finally:
        close(tracer)
    assert [s.name for s in spans] == ["chat sampled-by-parent"]


def test_environment_and_config_precedence(receiver, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test,host.name=box")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-env=1,x-both=env")
    tracer = otel.make_tracer(None)  # the environment alone turns tracing on
    assert tracer is not None
    try:
        rec = record()
        tracer.start(rec)
        answer(rec)
        tracer.finish(rec)
        receiver.wait_spans(1)
    finally:
        close(tracer)
    resource = receiver.resources()[0]
    assert resource["service.name"] == "from-env"
    assert resource["deployment.environment.name"] == "test"
    assert receiver.headers[0]["x-env"] == "1"

    # the config block wins where both set a value
    other = Receiver()
    try:
        settings = TelemetrySettings(
            enabled=True, endpoint=other.url, service_name="from-config", headers=(("x-both", "config"),)
        )
        tracer = otel.make_tracer(settings)
        assert tracer is not None
        rec = record()
        tracer.start(rec)
        answer(rec)
        tracer.finish(rec)
        other.wait_spans(1)
        close(tracer)
        resource = other.resources()[0]
        assert resource["service.name"] == "from-config"
        assert resource["host.name"] == "box"
        assert other.headers[0]["x-both"] == "config"
        assert other.headers[0]["x-env"] == "1"
    finally:
        other.close()


def test_when_tracing_is_off(monkeypatch):
    assert otel.make_tracer(None) is None
    assert otel.make_tracer(TelemetrySettings()) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert otel.make_tracer(None) is None
    monkeypatch.delenv("OTEL_TRACES_EXPORTER")
    off = load_config_text("telemetry:\n  enabled: false\nmodels:\n  m:\n    cmd: x --port ${PORT}\n", environ={})
    assert otel.make_tracer(off) is None  # the config's explicit false wins over the environment

    def broken(settings):
        raise RuntimeError("Requested component 'x' not found")  # e.g. a bad credential provider

    with monkeypatch.context() as m:
        m.setattr(otel, "OtelTracer", broken)
        assert otel.make_tracer(None) is None  # swapd serves untraced
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert otel.make_tracer(TelemetrySettings(enabled=True, endpoint="http://127.0.0.1:1")) is None


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_a_dead_collector_costs_one_warning_not_latency(monkeypatch):
    warnings: list[tuple[str, dict]] = []

    class Log:
        def warning(self, event, **kw):
            warnings.append((event, kw))

        def info(self, event, **kw):
            pass

    monkeypatch.setattr(otel, "log", Log())
    tracer = tracer_for(f"http://127.0.0.1:{dead_port()}", export_timeout=0.5)
    try:
        t = time.perf_counter()
        for i in range(100):
            rec = record(requested=f"m{i}")
            tracer.start(rec)
            tracer.outgoing(rec)
            answer(rec)
            tracer.finish(rec)
        elapsed = time.perf_counter() - t
        assert elapsed < 0.5, f"100 requests took {elapsed:.3f}s with a dead collector"
        wait_until(lambda: tracer.reporter.failed_batches >= 1, timeout=10, message="a failed export")
        for _ in range(100):  # more failures within the minute: no more warnings
            rec = record()
            tracer.start(rec)
            answer(rec)
            tracer.finish(rec)
        tracer.force_flush(timeout=3)
        wait_until(lambda: tracer.reporter.failed_batches >= 2, timeout=10, message="a second failed export")
    finally:
        t = time.perf_counter()
        close(tracer)
        assert time.perf_counter() - t < otel.CLOSE_TIMEOUT_S + 2.5
    failures = [kw for event, kw in warnings if event == "telemetry.export_failed"]
    assert len(failures) == 1, warnings
    assert failures[0]["dropped_spans"] >= 1
    assert failures[0]["reason"]


def test_the_exporters_own_logging_is_kept_not_printed():
    tracer = tracer_for(f"http://127.0.0.1:{dead_port()}", export_timeout=0.5)
    try:
        rec = record()
        tracer.start(rec)
        answer(rec)
        tracer.finish(rec)
        wait_until(lambda: tracer.reporter.failed_batches >= 1, timeout=10, message="a failed export")
    finally:
        close(tracer)
    otel_logger = logging.getLogger("opentelemetry")
    assert otel_logger.propagate is False  # nothing reaches the root logger's handlers (stderr)
    assert otel._TAP is not None and otel._TAP in otel_logger.handlers
    assert "export" in otel._TAP.last


def test_other_sdk_messages_are_logged_once_a_minute(monkeypatch):
    seen: list[tuple[str, dict]] = []

    class Log:
        def warning(self, event, **kw):
            seen.append((event, kw))

    monkeypatch.setattr(otel, "log", Log())
    tap = otel._OtelLogTap()
    sdk = logging.getLogger("opentelemetry.sdk._shared_internal")
    for _ in range(5):
        tap.handle(sdk.makeRecord(sdk.name, logging.WARNING, __file__, 1, "Queue full, dropping %s.", ("span",), None))
    tap.handle(sdk.makeRecord("opentelemetry.exporter.x", logging.ERROR, __file__, 1, "Failed to export", (), None))
    assert seen == [
        ("telemetry.otel_log", {"logger": sdk.name, "level": "WARNING", "message": "Queue full, dropping span."})
    ]
    assert tap.last == "Failed to export"


def test_the_batch_processor_reads_otel_bsp(monkeypatch, receiver):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "77")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "7")
    tracer = tracer_for(receiver.url)
    try:
        batch = getattr(tracer._processor, "_batch_processor", None)
        if batch is not None:  # SDK 1.33 and later
            read = (batch._schedule_delay_millis, batch._max_queue_size, batch._max_export_batch_size)
        else:
            bsp = tracer._processor
            read = (bsp.schedule_delay_millis, bsp.max_queue_size, bsp.max_export_batch_size)
        assert read == (20, 77, 7)
        rec = record()
        t = time.monotonic()
        tracer.start(rec)
        answer(rec)
        tracer.finish(rec)
        receiver.wait_spans(1, timeout=2)  # no force_flush: the 20 ms schedule sends it
        assert time.monotonic() - t < 2
    finally:
        close(tracer)


def test_close_is_bounded_with_a_dead_collector():
    tracer = tracer_for(f"http://127.0.0.1:{dead_port()}", export_timeout=30)
    for _ in range(10):
        rec = record()
        tracer.start(rec)
        answer(rec)
        tracer.finish(rec)
    t = time.perf_counter()
    asyncio.run(tracer.close(timeout=1.0))
    assert time.perf_counter() - t < 3.5
    wait_until(
        lambda: not [t for t in threading.enumerate() if t.name.startswith("OtelBatchSpanRecordProcessor")],
        timeout=3,
        message="the processor's worker to end",
    )


def _run_isolated(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    full.update(env)
    full["PYTHONPATH"] = str(ROOT)
    return subprocess.run([PY, "-c", code], capture_output=True, text=True, env=full, timeout=60, cwd=ROOT)


BLOCK_OTEL = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, Block())
"""


def test_without_the_package_swapd_warns_and_runs_untraced():
    code = BLOCK_OTEL + (
        "from swapd.telemetry.otel import make_tracer\n"
        "from swapd.config._model import TelemetrySettings\n"
        "print('RESULT', make_tracer(TelemetrySettings(enabled=True, endpoint='http://127.0.0.1:1')))\n"
    )
    done = _run_isolated(code, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"})
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert "RESULT None" in out
    assert "telemetry.otel_missing" in out
    assert "pip install 'swapd[otel]'" in out
    assert out.count("telemetry.otel_missing") == 1


def test_tracing_off_imports_no_opentelemetry():
    code = (
        "import sys\n"
        "import swapd.server.app\n"
        "from swapd.telemetry.otel import make_tracer\n"
        "print('RESULT', make_tracer(None), any(m.startswith('opentelemetry') for m in sys.modules))\n"
    )
    done = _run_isolated(code, {})
    assert done.returncode == 0, done.stderr
    assert "RESULT None False" in done.stdout


def test_per_request_cost(receiver, capsys):
    """start + outgoing + finish with tracing on (a sampled span, a wait, the export on its thread)."""
    tracer = tracer_for(receiver.url)
    n = 2000
    try:
        t = time.perf_counter()
        for i in range(n):
            rec = record(traceparent=TRACEPARENT if i % 2 else "")
            tracer.start(rec)
            tracer.outgoing(rec)
            rec.waits.append(Wait("qwen-7b", rec.t0, rec.t0, rec.t0 + 0.1))
            answer(rec)
            tracer.finish(rec)
        per = (time.perf_counter() - t) / n * 1e6
    finally:
        close(tracer)
    with capsys.disabled():
        print(f"\notel per-request cost: {per:.1f} us (start+outgoing+finish, one wait child span)")
    assert per < 2000


# -- end to end: a real swapd process ---------------------------------------------


def _post_with_traceparent(port: int, body: dict, traceparent: str = TRACEPARENT) -> tuple[int, list[dict]]:
    """POST a chat completion with ``traceparent``; the data events of a stream, or the one JSON answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(body),
            headers={"Content-Type": "application/json", "traceparent": traceparent},
        )
        resp = conn.getresponse()
        text = resp.read().decode()
        if not body.get("stream"):
            return resp.status, [json.loads(text)]
        events = [
            json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"
        ]
        return resp.status, events
    finally:
        conn.close()


def test_end_to_end_streamed_chat_is_traced(swapd, receiver):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_SERVICE_NAME": "e2e"}
    s = swapd({"qwen": model("--load-delay", "0.3", aliases=["q"])}, env=env)
    status, events = _post_with_traceparent(
        s.port,
        {
            "model": "q",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
        },
    )
    assert status == 200
    usage = next(e["usage"] for e in events if e.get("usage"))

    spans = {sp.name: sp for sp in receiver.wait_spans(2, timeout=15)}
    main = spans["chat q"]
    assert main.trace_id.hex() == TRACE_ID
    assert main.parent_span_id.hex() == PARENT_ID
    a = attrs(main.attributes)
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "q"
    assert a["gen_ai.request.stream"] is True
    assert a["swapd.model"] == "qwen"
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 4
    assert a["http.response.status_code"] == 200
    assert a["swapd.waited"] == "start"
    assert a["swapd.time_to_first_token_s"] > 0
    assert a["swapd.queued_s"] >= 0.25  # it waited for the --load-delay
    start = spans["swapd.model_start"]
    assert start.parent_span_id == main.span_id
    assert start.end_time_unix_nano - start.start_time_unix_nano >= 0.25e9  # the --load-delay
    assert main.start_time_unix_nano <= start.start_time_unix_nano < start.end_time_unix_nano
    assert start.end_time_unix_nano <= main.end_time_unix_nano
    assert receiver.resources()[0]["service.name"] == "e2e"

    # the backend is called with swapd's span as the parent, in the caller's trace
    other_parent = "1111111111111111"
    status, (answer_,) = _post_with_traceparent(
        s.port,
        {"model": "qwen", "messages": [{"role": "user", "content": "hi"}], "x_echo": True},
        f"00-{TRACE_ID}-{other_parent}-01",
    )
    assert status == 200
    backend = {k.lower(): v for k, v in answer_["x_headers"].items()}["traceparent"]
    _, trace_id, parent_id, flags = backend.split("-")
    assert trace_id == TRACE_ID and int(flags, 16) & 1
    spans = receiver.wait_spans(3, timeout=15)
    second = next(sp for sp in spans if sp.parent_span_id.hex() == other_parent)
    assert second.span_id.hex() == parent_id
    assert attrs(second.attributes)["gen_ai.response.finish_reasons"] == ["stop"]
    assert attrs(second.attributes)["swapd.waited"] == ""


def test_end_to_end_a_streamed_backend_sees_the_trace(swapd, receiver):
    s = swapd({"qwen": model()}, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50"})
    status, events = _post_with_traceparent(
        s.port, {"model": "qwen", "stream": True, "messages": [{"role": "user", "content": "hi"}], "x_echo": True}
    )
    assert status == 200
    backend = {k.lower(): v for k, v in next(e["x_headers"] for e in events if "x_headers" in e).items()}
    _, trace_id, parent_id, _ = backend["traceparent"].split("-")
    assert trace_id == TRACE_ID
    receiver.wait_spans(2, timeout=15)  # the request and its cold start
    span = next(sp for sp in receiver.spans() if sp.name == "chat qwen")
    assert span.span_id.hex() == parent_id and span.trace_id.hex() == TRACE_ID
    # the stream's finish reason is found however its last events were split into reads
    for _ in range(15):
        status, _ = _post_with_traceparent(
            s.port,
            {
                "model": "qwen",
                "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "hi"}],
                "x_echo": True,
            },
        )
        assert status == 200
    spans = receiver.wait_spans(17, timeout=15)
    streamed = [sp for sp in spans if sp.name == "chat qwen"][1:]
    assert len(streamed) == 15
    assert all(attrs(sp.attributes).get("gen_ai.response.finish_reasons") == ["stop"] for sp in streamed)


def test_end_to_end_dead_collector(swapd):
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{dead_port()}",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "0.5",  # seconds, as the Python exporter reads it
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    s = swapd({"qwen": model()}, env=env)
    assert s.chat("qwen").status == 200  # the cold start
    t = time.perf_counter()
    for _ in range(20):
        assert s.chat("qwen").status == 200
    assert time.perf_counter() - t < 5.0
    wait_until(
        lambda: any(e.get("event") == "telemetry.export_failed" for e in s.log_events()),
        timeout=15,
        message="telemetry.export_failed in the log",
    )
    for _ in range(5):
        assert s.chat("qwen").status == 200
    time.sleep(1.0)  # more failed exports, inside the minute
    events = s.log_events()
    assert sum(e.get("event") == "telemetry.export_failed" for e in events) == 1
    for line in s.log_text().splitlines():  # the exporter's own retry and failure lines are not printed
        if "Transient error" in line or "Failed to export" in line:
            assert json.loads(line)["event"] == "telemetry.export_failed", line


def test_end_to_end_without_tracing_sends_no_traceparent(swapd):
    s = swapd({"qwen": model()})
    status, events = _post_with_traceparent(
        s.port, {"model": "qwen", "stream": True, "messages": [{"role": "user", "content": "hi"}], "x_echo": True}
    )
    assert status == 200
    echoed = {k.lower(): v for k, v in next(e["x_headers"] for e in events if "x_headers" in e).items()}
    # swapd relays the client's own traceparent untouched when it is not tracing
    assert echoed.get("traceparent") in (None, TRACEPARENT)


# -- the documentation's examples ---------------------------------------------------

DOC = ROOT / "docs" / "integrations" / "opentelemetry.md"


def _yaml_blocks(text: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", text, re.S)


def test_the_docs_config_blocks_load():
    blocks = [b for b in _yaml_blocks(DOC.read_text()) if b.startswith("telemetry:")]
    assert len(blocks) == 2
    env = {"COLLECTOR_TOKEN": "t0k", "LANGFUSE_AUTH": "cGs6c2s="}
    main = load_config_text(blocks[0] + "models:\n  m:\n    cmd: x --port ${PORT}\n", environ=env)
    t = main.observe.telemetry
    assert t.enabled and t.endpoint == "http://collector:4318" and t.service_name == "swapd-gpu1"
    assert dict(t.headers) == {"Authorization": "Bearer t0k"}
    assert t.sample_ratio == 1.0 and t.export_timeout == 10.0
    langfuse = load_config_text(blocks[1] + "models:\n  m:\n    cmd: x --port ${PORT}\n", environ=env)
    t = langfuse.observe.telemetry
    assert t.enabled and dict(t.headers) == {"Authorization": "Basic cGs6c2s="}
    assert otel._traces_url(t.endpoint) == "https://cloud.langfuse.com/api/public/otel/v1/traces"


def test_the_docs_collector_config_has_an_otlp_http_receiver():
    collector = next(yaml.safe_load(b) for b in _yaml_blocks(DOC.read_text()) if b.startswith("# otelcol"))
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert collector["service"]["pipelines"]["traces"]["receivers"] == ["otlp"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([str(Path(__file__)), "-v"]))
