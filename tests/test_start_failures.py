"""A backend that cannot start is logged as one backend.start_failed event,
with its cause, exit code and last output lines (real swapd, real log)."""

from __future__ import annotations

from helpers import model, wait_until


def _failed(s) -> list[dict]:
    return [e for e in s.log_events() if e.get("event") == "backend.start_failed"]


def test_missing_binary_is_logged(swapd):
    s = swapd({"gone": {"cmd": "/nonexistent/llama-server --port ${PORT}"}})
    r = s.chat("gone")
    assert r.status == 502 and "cannot run" in r.json()["error"]["message"]
    wait_until(lambda: _failed(s), timeout=5, message="backend.start_failed")
    (event,) = _failed(s)
    assert event["model"] == "gone" and event["level"] == "error"
    assert "cannot run '/nonexistent/llama-server'" in event["cause"]
    assert event["exit_code"] is None and event["pid"] is None and event["tail"] == []


def test_exit_at_start_is_logged_with_code_and_output(swapd):
    s = swapd({"bad": model("--exit-at-start", "7")})
    assert s.chat("bad").status == 502
    wait_until(lambda: _failed(s), timeout=5, message="backend.start_failed")
    (event,) = _failed(s)
    assert event["model"] == "bad" and event["exit_code"] == 7 and isinstance(event["pid"], int)
    assert "exited with code 7 before it was ready" in event["cause"]
    assert any("exiting at startup with code 7" in line for line in event["tail"])
    # and once: not also as a crash
    assert not [e for e in s.log_events() if e.get("event") == "backend.crashed"]


def test_port_in_use_is_logged(swapd):
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        s = swapd({"busy": model()}, startPort=port)
        assert s.chat("busy").status == 502
        wait_until(lambda: _failed(s), timeout=5, message="backend.start_failed")
    (event,) = _failed(s)
    assert f"port {port} is already in use" in event["cause"]
