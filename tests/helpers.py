"""Shared test plumbing: run swapd as a real process against real fake backends."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_cmd(*opts: str, port: str = "${PORT}") -> str:
    """A model ``cmd`` that runs the fake backend with ``opts``."""
    return " ".join([PY, "-m", "swapd.fake_backend", "--port", port, "--quiet", *opts])


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Every live process whose environment carries ``SWAPD_TEST_TAG=tag``.

    Backends inherit it from their model's ``env``, and so does everything they
    fork, which makes this the leak detector: after a test, none may remain.
    """
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid == os.getpid():
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get("SWAPD_TEST_TAG") == tag:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class Swapd:
    """A running swapd process and what a test needs to talk to it."""

    proc: subprocess.Popen
    port: int
    config_path: Path
    tag: str
    log_path: Path
    _log_file: object = field(repr=False, default=None)
    # Optional: stdout kept apart from the log (split_stdout=True), and HTTPS.
    stdout_path: Path | None = None
    ssl_context: object = field(repr=False, default=None)
    _stdout_file: object = field(repr=False, default=None)

    def connection(self, timeout: float = 60.0) -> http.client.HTTPConnection:
        if self.ssl_context is not None:
            return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=self.ssl_context)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path else ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict]:
        events = []
        for line in self.log_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 60.0) -> Response:
        conn = self.connection(timeout)
        try:
            hdrs = dict(headers or {})
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                hdrs.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def get(self, path: str, **kw) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, body, **kw) -> Response:
        return self.request("POST", path, body=body, **kw)

    def chat(self, model: str, **extra) -> Response:
        return self.post("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra})

    def stream(self, model: str, path: str = "/v1/chat/completions", timeout: float = 60.0, **extra):
        """Stream a chat completion; return (status, headers, [(arrival_time, data_line)])."""
        conn = self.connection(timeout)
        try:
            body = json.dumps({"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}], **extra})
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            events = []
            while True:
                line = resp.readline()
                if not line:
                    break
                line = line.strip()
                if line.startswith(b"data: "):
                    events.append((time.monotonic(), line[6:].decode()))
            return resp.status, headers, events
        finally:
            conn.close()

    def running(self) -> dict[str, dict]:
        return {entry["model"]: entry for entry in self.get("/running").json()["running"]}

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("swapd did not exit within {timeout}s of SIGTERM")
        finally:
            if self._log_file is not None:
                self._log_file.close()
            if self._stdout_file is not None:
                self._stdout_file.close()


def model(*opts: str, **keys) -> dict:
    """A model entry that runs the fake backend."""
    entry = {"cmd": fake_cmd(*opts)}
    entry.update(keys)
    return entry


def write_config(path: Path, models: dict, tag: str, **top) -> Path:
    doc = {"healthCheckTimeout": 15, "startPort": free_port_range(), **top, "models": {}}
    for model_id, entry in models.items():
        entry = dict(entry)
        env = list(entry.get("env", []))
        env.append(f"SWAPD_TEST_TAG={tag}")
        entry["env"] = env
        doc["models"][model_id] = entry
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port_range(n: int = 20) -> int:
    """A start port whose next ``n`` ports are free right now (best effort).

    Chosen below the kernel's ephemeral range: the tests' own client
    connections take ephemeral ports, and one of those landing on a model's
    port would make its backend fail to bind (swapd then rightly reports the
    port as taken).
    """
    import random

    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10000, max(10001, low - n - 1))
        if base + n >= 65535:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range")


def start_swapd(
    tmp_path: Path,
    models: dict,
    *,
    extra_args=(),
    tag: str | None = None,
    env: dict[str, str] | None = None,
    config_flag: bool = True,
    split_stdout: bool = False,
    ssl_context=None,
    pass_fds=(),
    **top,
) -> Swapd:
    """Start swapd on a fresh port with ``models`` written to tmp_path/config.yaml.

    ``config_flag=False`` leaves ``--config`` out (pass ``--config-dir`` in
    ``extra_args``); ``split_stdout`` keeps stdout in its own file
    (``Swapd.stdout_text()``) instead of in the log; ``ssl_context`` makes the
    helpers talk HTTPS with that client context; ``pass_fds`` are fds swapd
    inherits (as from a careless parent).
    """
    tag = tag or uuid.uuid4().hex
    config_path = write_config(tmp_path / "config.yaml", models, tag, **top)
    port = free_port()
    log_path = tmp_path / "swapd.log"
    log_file = open(log_path, "wb")
    stdout_path = tmp_path / "swapd.stdout" if split_stdout else None
    stdout_file = open(stdout_path, "wb") if split_stdout else None
    extra_env, env = env, dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["XDG_STATE_HOME"] = str(tmp_path / "state")  # measured footprints stay in the test's directory
    env.update(extra_env or {})  # e.g. LD_LIBRARY_PATH for the NVML stub
    proc = subprocess.Popen(
        [
            PY, "-m", "swapd",
            *(("--config", str(config_path)) if config_flag else ()),
            "--listen", f"127.0.0.1:{port}", "--log-format", "json", *extra_args,
        ],
        stdout=stdout_file or log_file,
        stderr=log_file if split_stdout else subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        env=env,
        pass_fds=pass_fds,
    )
    swapd = Swapd(proc, port, config_path, tag, log_path, log_file, stdout_path, ssl_context, stdout_file)

    def healthy():
        if proc.poll() is not None:
            raise AssertionError(f"swapd exited with {proc.returncode}:\n{swapd.log_text()}")
        try:
            return swapd.get("/health", timeout=1).status == 200
        except OSError:
            return False

    wait_until(healthy, timeout=20, message="swapd /health")
    return swapd


def healthy(port: int) -> bool:
    """Whether a server on 127.0.0.1:``port`` answers ``GET /health`` with 200 now."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    except OSError:
        return False
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def start_fake_server(*opts: str) -> tuple[subprocess.Popen, int]:
    """The fake backend started directly: a server swapd did not start (a peer, a remote model).

    Returns the process (the caller kills it) and its port, once ``/health`` answers.
    """
    port = free_port()
    proc = subprocess.Popen(
        [PY, "-m", "swapd.fake_backend", "--port", str(port), "--quiet", *opts],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: healthy(port), timeout=15, message="the fake backend started by the test")
    except AssertionError:
        proc.kill()
        proc.wait()
        raise
    return proc, port


def backend_stats(port: int) -> dict:
    """The fake backend's /x/stats counters (streams started, cancelled, in flight)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/x/stats")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def stream_then_hang_up(port: int, model_id: str, chunks: int = 3) -> float:
    """Start a streaming chat on ``port``, read ``chunks`` events, close the socket.

    Raw socket, so the close is an abrupt hang-up; returns when it happened.
    """
    sock = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"model": model_id, "stream": True, "messages": []}).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    got = b""
    while got.count(b"data: ") < chunks:
        got += sock.recv(4096)
    sock.close()
    return time.monotonic()


def dechunk(data: bytes) -> bytes:
    """Decode a chunked HTTP body strictly: any framing error fails the test."""
    body = bytearray()
    pos = 0
    while True:
        eol = data.index(b"\r\n", pos)
        size = int(data[pos:eol], 16)
        pos = eol + 2
        if size == 0:
            assert data[pos:] == b"\r\n", data[pos:pos + 100]
            return bytes(body)
        body += data[pos:pos + size]
        assert data[pos + size:pos + size + 2] == b"\r\n"
        pos += size + 2
