"""Fault matrix and bad input: swapd keeps serving, and nothing is left behind.

Every test runs swapd and its backends as real processes. The ``swapd``
fixture proves after each test that no backend process outlived swapd; the
tests here also watch swapd's own file descriptors, asyncio tasks and
children through ``/api/status``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time

import psutil
import pytest

from helpers import PY, ROOT, fake_cmd, model, tagged_processes, wait_until


def _events(s, name):
    return [e for e in s.log_events() if e.get("event") == name]


def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _status(s):
    return s.get("/api/status").json()


def _settled(s, baseline, slack_fds=4, slack_tasks=2):
    """Resources come back to where they were once the work is over."""
    def ok():
        now = _status(s)
        return (now["fds"] <= baseline["fds"] + slack_fds and now["tasks"] <= baseline["tasks"] + slack_tasks
                and now["children"] == [c for c in now["children"] if c in _backend_pids(s)])
    return wait_until(ok, timeout=10, message=f"resources to settle (baseline {baseline}, now {_status(s)})")


def _backend_pids(s):
    pids = set()
    for entry in s.running().values():
        pids.update(entry["pids"])
    status = _status(s)
    if status.get("guardian"):
        pids.add(status["guardian"])
    return pids


# -- faults ---------------------------------------------------------------------


def test_startup_output_flood_is_handled(swapd):
    s = swapd({"noisy": model("--log-lines", "200000", "--load-delay", "0.5")})
    t0 = time.monotonic()
    assert s.chat("noisy").status == 200
    assert time.monotonic() - t0 < 30
    assert s.get("/health").status == 200
    assert psutil.Process(s.proc.pid).memory_info().rss < 300 * 1024 * 1024


def test_wrapper_grandchild_holding_stdout_is_killed(swapd):
    """The wrapper exits; its child keeps the stdout pipe open. swapd still finishes the stop."""
    s = swapd({"wrapped": model("--fork-child", "--exit-after", "1.5")})
    baseline = _status(s)
    s.chat("wrapped")
    wait_until(lambda: "wrapped" not in s.running(), timeout=8, message="wrapper exit noticed")
    assert wait_until(lambda: not tagged_processes(s.tag), timeout=8)
    assert s.chat("wrapped").status == 200, "the model restarts cleanly"
    s.get("/unload")
    _settled(s, baseline)


def test_port_already_taken_fails_fast(swapd):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        s = swapd({"m2": model()}, startPort=port)  # m2 is allocated the taken port
        t0 = time.monotonic()
        r = s.chat("m2")
        assert time.monotonic() - t0 < 5
        assert r.status == 502
        msg = r.json()["error"]["message"]
        assert f"port {port} is already in use" in msg and "by pid" in msg
        assert s.running() == {}
        assert s.get("/health").status == 200
    finally:
        blocker.close()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_sigterm_lets_streams_finish_then_stops_backends(swapd):
    s = swapd({"m1": model("--chunks", "20", "--interval", "0.1")})
    s.chat("m1")
    pid = s.running()["m1"]["pid"]
    result = {}

    def consume():
        result["stream"] = s.stream("m1")

    t = threading.Thread(target=consume)
    t.start()
    wait_until(lambda: s.running()["m1"]["in_flight"] == 1, message="the stream to be in flight")
    s.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: _refused(s.port), timeout=10, message="the listener to close")
    assert t.is_alive(), "the listener closed while the stream still runs"
    t.join(30)
    status, _, events = result["stream"]
    assert status == 200 and events[-1][1] == "[DONE]", "the in-flight stream completed"
    assert s.proc.wait(30) == 0
    assert _gone(pid)


def test_sigterm_cuts_endless_stream_within_budget(swapd):
    s = swapd({"m1": model("--chunks", "100000", "--interval", "0.05")})
    s.chat("m1")
    result = {}
    t = threading.Thread(target=lambda: result.update(r=s.stream("m1", timeout=60)))
    t.start()
    wait_until(lambda: s.running()["m1"]["in_flight"] == 1, message="the stream to be in flight")
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(40) == 0
    elapsed = time.monotonic() - t0
    t.join(10)
    assert not t.is_alive(), "the client is not left hanging"
    assert elapsed < 25, elapsed  # 10 s shutdown budget plus the stop
    assert not tagged_processes(s.tag)


@pytest.mark.parametrize("setsid", [False, True], ids=["child", "setsid-child"])
def test_sigkill_of_swapd_leaves_no_backend(swapd, setsid):
    opts = ["--fork-child"] + (["--fork-child-setsid"] if setsid else [])
    s = swapd({"m1": model(*opts)})
    s.chat("m1")
    pids = s.running()["m1"]["pids"]
    procs = tagged_processes(s.tag)
    assert len(procs) >= 2, "root and forked child are running"
    s.proc.kill()
    s.proc.wait()
    assert wait_until(lambda: not tagged_processes(s.tag), timeout=10), "the guardian took the tree down"
    # A process is untagged as soon as the kernel drops its memory (environ is
    # unreadable), a moment before it becomes a zombie: wait for that too.
    assert wait_until(lambda: all(_gone(p) for p in pids), timeout=10), "every pid of the tree is gone"


def test_client_disconnect_during_load_keeps_accounting(swapd):
    s = swapd({"a": model("--load-delay", "1.5"), "b": model()})
    sock = socket.create_connection(("127.0.0.1", s.port))
    body = json.dumps({"model": "a", "messages": []}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    wait_until(lambda: s.running().get("a", {}).get("state") == "starting", message="a loading")
    sock.close()
    wait_until(lambda: s.running().get("a", {}).get("state") == "ready", timeout=10, message="a ready")
    assert s.running()["a"]["in_flight"] == 0, "the departed client holds no lease"
    # nothing holds a: a swap to b proceeds at once
    t0 = time.monotonic()
    assert s.chat("b").status == 200
    assert time.monotonic() - t0 < 5
    assert list(s.running()) == ["b"]


def test_many_concurrent_requests_across_a_swap_group(swapd):
    models = {m: model("--chunks", "3", "--interval", "0.01", concurrencyLimit=200) for m in ("a", "b", "c")}
    s = swapd(models)
    baseline = _status(s)
    rng = random.Random(7)
    plan = [(rng.choice("abc"), rng.random() < 0.5) for _ in range(200)]
    results = []
    lock = threading.Lock()

    def call(name, stream):
        try:
            if stream:
                status, _, events = s.stream(name, timeout=120)
                ok = status == 200 and events and events[-1][1] == "[DONE]"
            else:
                r = s.chat(name, timeout=120)
                ok = r.status == 200 and r.json()["model"] == name
        except OSError as exc:  # pragma: no cover - reported below
            ok = repr(exc)
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=call, args=p) for p in plan]
    reloaded = False
    for i, t in enumerate(threads):
        t.start()
        if i == 100:  # reload the (unchanged) config while the traffic runs
            s.proc.send_signal(signal.SIGHUP)
            reloaded = True
    for t in threads:
        t.join(180)
    assert reloaded and wait_until(lambda: _events(s, "config.reloaded"), timeout=10)
    assert len(results) == 200 and all(r is True for r in results), [r for r in results if r is not True][:5]
    starts = len(_events(s, "backend.start"))
    # 200 requests over 3 models: collation keeps swaps near the minimum of 3 starts
    assert starts <= 12, starts
    s.get("/unload")
    _settled(s, baseline)


# -- bad input --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "x" * 100_000, "模型\u202e", "a\r\nInjected: yes", "../../etc/passwd", " "])
def test_odd_model_names_get_clear_errors(swapd, name):
    s = swapd({"m1": model()})
    r = s.post("/v1/chat/completions", {"model": name, "messages": []})
    assert r.status == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and len(err["message"]) < 400
    assert "injected" not in {k.lower() for k in r.headers}
    assert s.get("/health").status == 200


def test_unicode_model_ids_route(swapd):
    s = swapd({"模型-ß": model(aliases=["émoji-🙂"])})
    assert s.chat("模型-ß").status == 200
    assert s.chat("émoji-🙂").status == 200


def test_body_over_limit_gets_413(swapd):
    s = swapd({"m1": model()}, clientLimits={"maxBodyMB": 1})
    big = json.dumps({"model": "m1", "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}).encode()
    r = s.post("/v1/chat/completions", big, headers={"Content-Type": "application/json"})
    assert r.status == 413
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert s.running() == {}
    # chunked (no Content-Length) is capped too
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 65536
    try:
        for _ in range(40):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except OSError:
        pass
    reply = sock.recv(4096)
    sock.close()
    assert b" 413 " in reply.split(b"\r\n")[0]
    assert s.chat("m1").status == 200


def test_slow_header_client_is_disconnected(swapd):
    s = swapd({"m1": model()}, clientLimits={"headerTimeout": 1})
    baseline = _status(s)
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    t0 = time.monotonic()
    closed = False
    for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 50:
        try:
            sock.sendall(bytes([byte]))
            time.sleep(0.1)
            sock.setblocking(False)
            try:
                if sock.recv(1) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
        except OSError:
            closed = True
            break
    sock.close()
    assert closed, "a trickled request must be cut off"
    assert time.monotonic() - t0 < 4
    assert s.get("/health").status == 200
    _settled(s, baseline)


def test_slow_body_client_times_out(swapd):
    s = swapd({"m1": model()}, clientLimits={"bodyIdleTimeout": 1})
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\": ")
    t0 = time.monotonic()
    reply = sock.recv(4096)
    sock.close()
    assert b" 408 " in reply.split(b"\r\n")[0]
    assert time.monotonic() - t0 < 5
    assert s.running() == {}


def test_malformed_http_is_rejected_and_serving_continues(swapd):
    s = swapd({"m1": model()})
    for raw in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad\rHeader: y\r\n\r\n",
                b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n"):
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        sock.sendall(raw)
        reply = sock.recv(4096)
        sock.close()
        # unparseable HTTP never reaches swapd's handlers: aiohttp answers a plain 400
        assert reply.split(b" ", 2)[1:2] == [b"400"] or reply == b"", (raw, reply[:80])
    assert s.chat("m1").status == 200


@pytest.mark.parametrize("path", [
    "/upstream/m1/..%2F..%2Fhealth", "/upstream/m1/%2e%2e/x", "/upstream/m1/./x", "/upstream/m1/a/../../x",
])
def test_upstream_traversal_refused(swapd, path):
    s = swapd({"m1": model()})
    r = s.get(path)
    assert r.status in (400, 404), (path, r.status)
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_requests_during_shutdown_get_503_or_refused(swapd):
    s = swapd({"m1": model()})
    s.chat("m1")
    hold = threading.Thread(target=lambda: s.chat("m1", x_sleep=2.0))
    hold.start()
    wait_until(lambda: s.running()["m1"]["in_flight"] == 1, message="in flight")
    conn = socket.create_connection(("127.0.0.1", s.port), timeout=10)  # a kept-alive connection
    s.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: any(e.get("event") == "swapd.shutdown" for e in s.log_events()), message="shutdown to begin")
    body = json.dumps({"model": "m1", "messages": []}).encode()
    try:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        reply = conn.recv(4096)
    except OSError:
        reply = b""
    conn.close()
    assert reply == b"" or reply.startswith(b"HTTP/1.1 503"), reply[:100]
    hold.join()
    assert s.proc.wait(30) == 0


def test_cmd_runs_literally_never_through_a_shell(swapd, tmp_path):
    marker = tmp_path / "pwned"
    evil = f"x; touch {marker} $(touch {marker}) `touch {marker}`"
    s = swapd({"m1": {"cmd": fake_cmd("--model-id", f"'{evil}'")}})
    r = s.post("/v1/chat/completions", {"messages": [], "model": "m1"})
    assert r.status == 200
    proc = psutil.Process(s.running()["m1"]["pid"])
    assert evil in proc.cmdline(), "the whole string arrived as one argument"
    assert proc.name().startswith("python"), "no shell in between"
    assert not marker.exists()


# -- security defaults ---------------------------------------------------------------


def test_secrets_are_redacted_from_logs_and_status(swapd):
    s = swapd({"m1": {"cmd": fake_cmd("--api-key", "sk-backend-secret")}}, apiKeys=["sk-client-secret"])
    ok = s.post("/v1/chat/completions", {"model": "m1", "messages": []},
                headers={"Authorization": "Bearer sk-client-secret", "x-backend-key": "unused"})
    # the backend wants its own key, which the client does not have: its 401 passes through
    assert ok.status == 401 and ok.json()["error"]["type"] == "authentication_error"
    running = s.get("/running", headers={"Authorization": "Bearer sk-client-secret"}).json()["running"][0]
    assert "sk-backend-secret" not in running["cmd"] and "--api-key REDACTED" in running["cmd"]
    text = s.log_text()
    assert "sk-client-secret" not in text and "sk-backend-secret" not in text
    assert "--api-key REDACTED" in text


def test_backend_secret_flags_are_masked():
    from swapd.redact import redact_argv

    argv = ["llama-server", "--api-key", "sk-1", "--hf-token=abc", "-m", "model.gguf", "--port", "8080"]
    assert redact_argv(argv) == ["llama-server", "--api-key", "REDACTED", "--hf-token=REDACTED",
                                 "-m", "model.gguf", "--port", "8080"]


def test_backend_environment_is_parent_plus_config_only(swapd):
    s = swapd({"m1": model(env=["FROM_CONFIG=yes"])})
    s.chat("m1")
    env = psutil.Process(s.running()["m1"]["pid"]).environ()
    parent = psutil.Process(s.proc.pid).environ()
    assert env["FROM_CONFIG"] == "yes"
    extra = set(env) - set(parent) - {"FROM_CONFIG", "SWAPD_TEST_TAG"}
    assert not extra, f"swapd leaked its own variables into the backend: {extra}"


def test_crash_is_noticed_at_once_while_an_orphan_holds_the_pipes(swapd):
    """asyncio's Process.wait() waits for stdout to close; swapd must not."""
    s = swapd({"m1": model("--fork-child", "--exit-after", "1.0")})
    s.chat("m1")
    t_ready = time.monotonic()
    wait_until(lambda: "m1" not in s.running(), timeout=10, message="crash noticed")
    # exit after 1 s; noticed well before the 5 s tree snapshot would have
    assert time.monotonic() - t_ready < 3.5
    crashed = _events(s, "backend.crashed")[0]
    assert crashed["exit_code"] == 4
    assert wait_until(lambda: not tagged_processes(s.tag), timeout=5), "the orphan went with it"


@pytest.mark.parametrize("via", ["setpriv", "preexec"])
def test_death_signal_alone_takes_the_backend_down(swapd, tmp_path, via):
    """With the guardian gone too, the backend's parent-death SIGKILL still fires when swapd is killed.

    swapd sets it through util-linux's setpriv when that is on its PATH (so
    Python can spawn with vfork) and through a preexec_fn otherwise.
    """
    env = None if via == "setpriv" else {"PATH": str(tmp_path)}  # an empty PATH: no setpriv
    s = swapd({"m1": model()}, env=env)
    s.chat("m1")
    pid = s.running()["m1"]["pid"]
    guardian = _status(s)["guardian"]
    os.kill(guardian, signal.SIGKILL)
    wait_until(lambda: _gone(guardian), timeout=5, message="the guardian to die")
    s.proc.kill()
    s.proc.wait()
    assert wait_until(lambda: _gone(pid), timeout=5), "the parent-death signal must take the backend down"


@pytest.mark.parametrize("cmd, reason", [
    ("/nonexistent/llama-server --port ${PORT}", "No such file or directory"),
    ("no-such-command-anywhere --port ${PORT}", "No such file or directory"),
    ("{tmp}/not-executable --port ${PORT}", "Permission denied"),
])
def test_command_that_cannot_run_is_reported_clearly(swapd, tmp_path, cmd, reason):
    (tmp_path / "not-executable").write_text("#!/bin/sh\nexit 0\n")  # mode 0644
    cmd = cmd.replace("{tmp}", str(tmp_path))
    s = swapd({"m1": {"cmd": cmd, "proxy": "http://127.0.0.1:${PORT}"}})
    r = s.chat("m1")
    assert r.status == 502 or r.status == 503, r.body
    message = r.json()["error"]["message"]
    assert "cannot run" in message and reason in message, message
    assert s.get("/health").status == 200


@pytest.mark.parametrize("loop", ["default", "uvloop", "asyncio"])
def test_orphan_that_exits_on_its_own_is_reaped(swapd, loop):
    """A grandchild orphaned while its backend runs becomes swapd's child; when it exits, swapd reaps it.

    asyncio's loop hands swapd SIGCHLD; uvloop keeps SIGCHLD for itself, so
    there swapd checks for zombies once a second. Either way no zombie stays.
    uvloop is a dependency on Linux, so it is the default here.
    """
    # the subshell starts `sleep` and exits: sleep is re-parented to swapd (subreaper)
    cmd = f"sh -c '(sleep 2 &); exec {fake_cmd()}'"
    s = swapd({"m1": {"cmd": cmd}}, extra_args=() if loop == "default" else ("--event-loop", loop))
    assert s.chat("m1").status == 200
    events = _events(s, "swapd.listening")
    expected = "uvloop" if loop == "default" else loop
    assert events and events[0]["event_loop"] == expected
    assert _status(s)["event_loop"] == expected, "the loop swapd really runs on"
    swapd_proc = psutil.Process(s.proc.pid)

    def sleepers():
        out = []
        for child in swapd_proc.children():
            try:
                if child.name() == "sleep" or child.status() == psutil.STATUS_ZOMBIE:
                    out.append(child)
            except psutil.NoSuchProcess:
                pass
        return out

    assert sleepers(), "the orphaned sleep should be swapd's child now"
    assert wait_until(lambda: not sleepers(), timeout=8), [(p.pid, p.status()) for p in sleepers()]
    assert "m1" in s.running(), "the backend itself kept running"


def test_event_loop_uvloop_without_uvloop_is_a_clear_error(tmp_path):
    """--event-loop uvloop where uvloop cannot be imported: exit 2 with a message, no traceback."""
    config = tmp_path / "config.yaml"
    config.write_text("models:\n  m1:\n    cmd: sleep 100\n    proxy: http://127.0.0.1:9\n")
    code = (
        "import sys; sys.modules['uvloop'] = None\n"  # makes `import uvloop` raise ImportError
        "from swapd.cli import main\n"
        f"sys.exit(main(['--config', {str(config)!r}, '--event-loop', 'uvloop']))"
    )
    proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "uvloop is not installed" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
