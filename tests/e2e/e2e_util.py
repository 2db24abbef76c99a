"""Plain helpers shared by the end-to-end tests (fixtures live in conftest.py)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from helpers import tagged_processes, wait_until


def stop_swapd(instance) -> list[str]:
    """Stop one swapd and prove that nothing it started is left; return problems found."""
    problems = []
    code = instance.terminate()
    if code not in (0, -9):
        problems.append(f"swapd exited with {code}:\n{instance.log_text()[-3000:]}")
    try:
        wait_until(lambda: not tagged_processes(instance.tag), timeout=15, message="backends to exit")
    except AssertionError:
        leaked = tagged_processes(instance.tag)
        for proc in leaked:
            proc.kill()
        problems.append(f"leaked processes after shutdown: {[p.pid for p in leaked]}")
    return problems


def http_wait(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Wait until GET ``url`` answers 200; fail early (with the log) if ``proc`` exits."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace")[-4000:] if log else ""
            raise AssertionError(f"process exited with {proc.returncode} before {url} answered:\n{text}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            text = log.read_text(errors="replace")[-4000:] if log else ""
            raise AssertionError(f"{url} did not answer within {timeout}s:\n{text}")
        time.sleep(0.2)


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
