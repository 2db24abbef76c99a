"""What a backend inherits from swapd: its stdio and nothing else, on both event loops."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess

import pytest

from helpers import PY, ROOT, free_port, healthy, model, wait_until


def _fds(port: int) -> dict[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/x/fds", headers={"Connection": "close"})
        return {int(fd): target for fd, target in json.loads(conn.getresponse().read())["fds"].items()}
    finally:
        conn.close()


def _kinds(fds: dict[int, str]) -> list[str]:
    """fds above 2 by kind ("socket", "pipe", "anon_inode:[eventpoll]", a path)."""
    return sorted(re.sub(r":\[\d+\]$", "", target) for fd, target in fds.items() if fd > 2)


def _links(pid: int) -> set[str]:
    out = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:  # closed meanwhile
            pass
    return out


@pytest.fixture(scope="module")
def plain_kinds():
    """What the fake backend holds when spawned plainly (close_fds, stdio pipes)."""
    port = free_port()
    proc = subprocess.Popen(
        [PY, "-m", "swapd.fake_backend", "--port", str(port), "--quiet"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        wait_until(lambda: healthy(port), timeout=15, message="plain fake backend")
        return _kinds(_fds(port))
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_backend_inherits_only_stdio(swapd, tmp_path, loop, plain_kinds):
    marker = tmp_path / "secret-marker"
    marker.write_text("x")
    fd = os.open(marker, os.O_RDONLY)
    try:
        os.set_inheritable(fd, True)
        s = swapd(
            {"m": model()},
            extra_args=("--event-loop", loop),
            pass_fds=(fd,),
            hooks={"on_startup": {"preload": ["m"]}},
        )
        assert s.get("/api/status").json()["event_loop"] == loop
        # swapd itself did inherit the fd (the premise of the test).
        assert str(marker) in _links(s.proc.pid)
        wait_until(lambda: s.running().get("m", {}).get("state") == "ready", timeout=15, message="preload")
        port = int(s.running()["m"]["proxy"].rsplit(":", 1)[1])
        seen: list = []

        def same_as_plain():
            fds = _fds(port)
            seen[:] = [fds]
            return _kinds(fds) == plain_kinds

        try:
            wait_until(same_as_plain, timeout=5, message="backend fds")
        except AssertionError:
            raise AssertionError(f"backend fds {seen[0]} differ from a plain spawn's {plain_kinds}") from None
        fds = seen[0]
        assert str(marker) not in fds.values()
        assert {0, 1, 2} <= set(fds)
    finally:
        os.close(fd)
