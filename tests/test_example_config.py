"""The shipped config.example.yaml works as a user runs it: ``.venv/bin/swapd``, venv not activated."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import psutil
from helpers import PY, ROOT, Response, free_port, free_port_range, wait_until

from swapd.config import load_config_text


def _request(port: int, method: str, path: str, body: bytes | None = None) -> Response:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return Response(resp.status, dict(resp.getheaders()), resp.read())
    finally:
        conn.close()


def test_swapd_python_macro_is_swapds_interpreter():
    cfg = load_config_text("models:\n  m:\n    cmd: ${swapd.python} -m x --port ${PORT}\n", "c.yaml", {})
    assert cfg.models["m"].cmd[0] == PY


def test_example_config_serves_its_model_without_the_venv_on_path(tmp_path: Path):
    # A `python` first on PATH that is not swapd's (a system python without aiohttp, say).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrong = bin_dir / "python"
    wrong.write_text("#!/bin/sh\necho 'not the python swapd runs on' >&2\nexit 1\n")
    wrong.chmod(0o755)

    text = (ROOT / "config.example.yaml").read_text()
    text, count = re.subn(r"(?m)^startPort: \d+", f"startPort: {free_port_range()}", text)
    assert count == 1
    config = tmp_path / "config.yaml"
    config.write_text(text)

    script = Path(PY).parent / "swapd"  # the console script, as `.venv/bin/swapd` is run
    argv = [str(script)] if script.exists() else [PY, "-m", "swapd"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"
    env["PYTHONPATH"] = str(ROOT)
    log = open(tmp_path / "swapd.log", "wb")
    proc = subprocess.Popen([*argv, "--config", str(config), "--listen", f"127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path, env=env)
    backend_pids: list[int] = []
    try:
        def healthy() -> bool:
            assert proc.poll() is None, (tmp_path / "swapd.log").read_text()
            try:
                return _request(port, "GET", "/health").status == 200
            except OSError:
                return False

        wait_until(healthy, timeout=20, message="swapd /health")
        reply = _request(port, "POST", "/v1/chat/completions",
                         b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}')
        assert reply.status == 200, reply.body[:2000]
        assert reply.json()["choices"][0]["message"]["content"]
        running = _request(port, "GET", "/running").json()["running"]
        assert [r["model"] for r in running] == ["fast"]
        backend_pids = [r["pid"] for r in running]
        # swapd's own interpreter, from its virtualenv, not the `python` on PATH
        assert Path(psutil.Process(backend_pids[0]).cmdline()[0]).parent == Path(PY).parent
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    for pid in backend_pids:
        wait_until(lambda pid=pid: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                   timeout=10, message=f"backend {pid} to exit")
