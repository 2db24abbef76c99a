"""Tests for swapd.fake_backend, run as a real subprocess on a free port."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_state(pid: int) -> str | None:
    """Linux process state letter ('S', 'R', 'Z', ...) or None if the pid is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def wait_until(pred, timeout: float = 5.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


class Backend:
    """A fake_backend subprocess with its stdout collected by a reader thread."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, wait: bool = True) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.extra_pids: list[int] = []
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "swapd.fake_backend", "--port", str(self.port), *args],
            cwd=REPO_ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, so cleanup can't hit pytest
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait:
            assert self.wait_line("fake_backend: listening on"), self.lines

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, prefix: str, timeout: float = 10.0) -> str | None:
        def find() -> str | None:
            return next((ln for ln in list(self.lines) if ln.startswith(prefix)), None)

        wait_until(lambda: find() is not None or self.proc.poll() is not None, timeout)
        wait_until(lambda: find() is not None, 0.2)  # let the reader catch up after an exit
        return find()

    def child_pid(self) -> int:
        line = self.wait_line("fake_backend: child pid ")
        assert line, self.lines
        pid = int(line.rsplit(" ", 1)[1])
        self.extra_pids.append(pid)
        return pid

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        return request(self.base + path, headers=headers)

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        return request(self.base + path, body)

    def stats(self) -> dict[str, int]:
        return self.get("/x/stats")[1]

    def close(self) -> None:
        for pid in self.extra_pids:
            kill_quietly(pid)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=5)
        for pid in self.extra_pids:
            wait_until(lambda: not alive(pid), 2.0)
        self._reader.join(timeout=2)
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


def request(url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def backends():
    started: list[Backend] = []

    def start(*args: str, **kw: Any) -> Backend:
        b = Backend(*args, **kw)
        started.append(b)
        return b

    yield start
    for b in started:
        b.close()


async def read_sse(url: str, body: dict[str, Any], stop_after: int | None = None):
    """POST and collect (arrival_time, data) for each SSE event; stop early if asked."""
    events: list[tuple[float, str]] = []
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for raw in r.content:
                line = raw.decode().strip()
                if not line:
                    continue
                assert line.startswith("data: ")
                events.append((time.time(), line[6:]))
                if stop_after is not None and len(events) >= stop_after:
                    break
    return events


# ---------------------------------------------------------------------------


def test_health_loading_then_ok(backends):
    b = backends("--load-delay", "1.0", "--quiet")
    t0 = time.monotonic()
    assert b.get("/health") == (503, {"status": "loading"})
    assert wait_until(lambda: b.get("/health")[0] == 200, timeout=5.0, step=0.05)
    assert time.monotonic() - t0 >= 0.6
    assert b.get("/health") == (200, {"status": "ok"})


def test_streaming_chunks_spread_over_time(backends):
    b = backends("--chunks", "5", "--interval", "0.1", "--model-id", "cli-model")
    events = asyncio.run(read_sse(b.base + "/v1/chat/completions", {"stream": True, "model": "req-model"}))
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert len(chunks) == 6  # 5 content + final stop
    for i, c in enumerate(chunks[:5]):
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == "req-model"
        assert c["choices"][0]["delta"]["content"] == f"tok{i} "
        assert c["choices"][0]["finish_reason"] is None
        assert isinstance(c["x_sent_at"], float)
        assert {"id", "created"} <= c.keys()
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len({c["id"] for c in chunks}) == 1
    arrivals = [t for t, _ in events[:5]]
    assert 0.25 <= arrivals[-1] - arrivals[0] <= 3.0
    sent = [c["x_sent_at"] for c in chunks[:5]]
    assert sent == sorted(sent) and sent[-1] - sent[0] >= 0.3
    assert b.stats()["streams_completed"] == 1
    assert b.wait_line("fake_backend: request POST /v1/chat/completions")

    # text completions stream, max_tokens overrides --chunks
    events = asyncio.run(read_sse(b.base + "/v1/completions", {"stream": True, "max_tokens": 2}))
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == ["tok0 ", "tok1 ", ""]
    assert all(c["object"] == "text_completion" and c["model"] == "cli-model" for c in chunks)


def test_non_stream_shapes(backends):
    b = backends("--chunks", "3", "--model-id", "cli-model", "--quiet")
    status, r = b.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 200
    assert r["object"] == "chat.completion" and r["model"] == "cli-model"
    assert r["choices"][0]["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 "}
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == 3
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + 3

    status, r = b.post("/v1/completions", {"model": "other", "prompt": "x", "max_tokens": 4})
    assert status == 200
    assert r["object"] == "text_completion" and r["model"] == "other"
    assert r["choices"][0]["text"] == "tok0 tok1 tok2 tok3 "

    status, r = b.post("/v1/chat/completions", b"{not json")
    assert status == 400 and "error" in r


def test_x_echo_large_body(backends):
    b = backends("--quiet")
    body = json.dumps({"x_echo": True, "prompt": "a" * (5 * 1024 * 1024)}).encode()
    status, r = b.post("/v1/completions", body)
    assert status == 200
    assert r["x_body_bytes"] == len(body)
    assert r["x_body_sha256"] == hashlib.sha256(body).hexdigest()
    assert r["choices"][0]["text"] == str(len(body))


def test_embeddings_models_misc(backends):
    b = backends("--model-id", "emb", "--quiet")
    status, r = b.post("/v1/embeddings", {"input": ["a", "b", "a"]})
    assert status == 200 and r["object"] == "list" and r["model"] == "emb"
    assert [d["index"] for d in r["data"]] == [0, 1, 2]
    for d in r["data"]:
        assert d["object"] == "embedding" and len(d["embedding"]) == 8
        assert all(isinstance(v, float) and -1.0 <= v <= 1.0 for v in d["embedding"])
    assert r["data"][0]["embedding"] == r["data"][2]["embedding"] != r["data"][1]["embedding"]
    assert "prompt_tokens" in r["usage"]
    _, r2 = b.post("/v1/embeddings", {"input": "a", "model": "m"})
    assert len(r2["data"]) == 1 and r2["model"] == "m"
    assert r2["data"][0]["embedding"] == r["data"][0]["embedding"]

    assert b.get("/v1/models") == (200, {"object": "list", "data": [
        {"id": "emb", "object": "model", "created": 0, "owned_by": "fake_backend"}]})
    status, r = b.get("/no/such/path")
    assert status == 404 and r["error"]["type"] == "not_found"
    assert b.get("/x/pid") == (200, {"pid": b.proc.pid})
    status, h = b.get("/x/headers", headers={"X-Swapd-Test": "yes"})
    assert status == 200 and h["X-Swapd-Test"] == "yes"


def test_exit_at_start():
    port = free_port()
    r = subprocess.run(
        [sys.executable, "-m", "swapd.fake_backend", "--port", str(port), "--exit-at-start", "7"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert r.returncode == 7
    assert "fake_backend: exiting at startup with code 7" in r.stderr
    assert "listening" not in r.stdout


def test_exit_after_and_log_lines(backends):
    b = backends("--exit-after", "0.5", "--log-lines", "50", "--quiet")
    assert b.proc.wait(timeout=5) == 4
    b.wait_line("fake_backend: exiting after")
    logs = [ln for ln in b.lines if ln.startswith("fake_backend: log line ")]
    assert len(logs) == 50
    assert b.lines.index(logs[-1]) < b.lines.index(b.wait_line("fake_backend: listening on"))


def test_crash_after_chunks(backends):
    b = backends("--chunks", "10", "--crash-after-chunks", "3", "--quiet")

    async def run() -> list[str]:
        got: list[str] = []
        async with aiohttp.ClientSession() as s:
            async with s.post(b.base + "/v1/chat/completions", json={"stream": True}) as r:
                with pytest.raises(aiohttp.ClientError):
                    async for raw in r.content:
                        if raw.strip():
                            got.append(raw.decode().strip())
                    await r.read()  # a clean end of stream would not raise
        return got

    got = asyncio.run(run())
    assert len(got) == 3 and "[DONE]" not in got[-1]
    assert b.proc.wait(timeout=5) == 3


def test_sigterm_default_and_ignored(backends):
    normal = backends("--quiet")
    normal.proc.send_signal(signal.SIGTERM)
    assert normal.proc.wait(timeout=5) == -signal.SIGTERM

    b = backends("--ignore-sigterm", "--quiet")
    b.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert b.proc.poll() is None
    assert b.get("/health")[0] == 200
    b.proc.send_signal(signal.SIGKILL)
    assert b.proc.wait(timeout=5) == -signal.SIGKILL


@pytest.mark.parametrize("setsid", [False, True])
def test_fork_child_survives_parent_sigkill(backends, setsid):
    b = backends("--fork-child", *(["--fork-child-setsid"] if setsid else []), "--quiet")
    child = b.child_pid()
    assert alive(child)
    if setsid:
        assert os.getsid(child) == child and os.getpgid(child) == child
    else:
        assert os.getpgid(child) == os.getpgid(b.proc.pid)
    b.proc.send_signal(signal.SIGKILL)  # the parent only, not its group
    assert b.proc.wait(timeout=5) == -signal.SIGKILL
    time.sleep(0.2)
    assert alive(child)
    os.kill(child, signal.SIGKILL)
    assert wait_until(lambda: not alive(child), 3.0)


def test_vram_state_files(backends, tmp_path):
    b = backends("--vram-mib", "1234", "--fork-child", "--quiet",
                 env={"SWAPD_STUB_NVML_STATE": str(tmp_path)})
    child = b.child_pid()
    assert (tmp_path / str(b.proc.pid)).read_text() == "1234"
    assert (tmp_path / str(child)).read_text() == "1234"


def test_stream_cancellation_counted(backends):
    b = backends("--chunks", "1000", "--interval", "0.01")
    events = asyncio.run(read_sse(b.base + "/v1/chat/completions", {"stream": True}, stop_after=3))
    assert len(events) == 3
    assert wait_until(lambda: b.stats()["streams_cancelled"] == 1, 3.0)
    s = b.stats()
    assert s["streams_started"] == 1 and s["streams_completed"] == 0 and s["in_flight"] == 0
    line = b.wait_line("fake_backend: stream cancelled after ")
    assert line and re.fullmatch(r"fake_backend: stream cancelled after \d+ chunks", line)
    assert 3 <= int(line.split()[-2]) < 1000


def test_x_sleep_keeps_request_in_flight(backends):
    b = backends("--quiet")
    result: list[Any] = []
    t = threading.Thread(
        target=lambda: result.append(b.post("/v1/chat/completions", {"x_sleep": 0.6})))
    t0 = time.monotonic()
    t.start()
    assert wait_until(lambda: b.stats()["in_flight"] == 1, 2.0)
    t.join(timeout=5)
    assert time.monotonic() - t0 >= 0.5
    assert result and result[0][0] == 200
    assert b.stats()["in_flight"] == 0
