"""A watchdog process that kills swapd's backends if swapd itself is killed.

``PR_SET_PDEATHSIG`` takes a backend's root process down with swapd, but not
the root's own children (vLLM's engine and workers, a wrapper's grandchild),
and nothing runs in swapd after SIGKILL. So swapd starts this small process
first and tells it, over a pipe, every process group and pid it owns. When the
pipe reaches end-of-file without a goodbye, swapd is gone: the guardian
SIGKILLs everything it was told about, then exits.

The guardian runs in its own session and ignores terminal signals, so a
Ctrl-C to swapd's terminal doesn't take it down first. Before killing a pid it
checks the process start time it was given, so a recycled pid is never hit.

Protocol, one line each: ``group PGID``, ``pid PID STARTTIME``,
``forget PID``, ``bye``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name may contain spaces and parentheses; fields follow the last ')'
    fields = stat[stat.rindex(b")") + 2 :].split()
    return fields[19].decode()


def run_guardian() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    groups: set[int] = set()
    pids: dict[int, str] = {}
    stdin = sys.stdin.buffer
    for raw in stdin:
        parts = raw.split()
        if not parts:
            continue
        verb = parts[0]
        try:
            if verb == b"bye":
                return 0
            if verb == b"group":
                groups.add(int(parts[1]))
            elif verb == b"pid":
                pids[int(parts[1])] = parts[2].decode()
            elif verb == b"forget":
                pid = int(parts[1])
                pids.pop(pid, None)
                groups.discard(pid)
        except (IndexError, ValueError):
            continue
    # EOF without "bye": swapd died. Take its backends with it.
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    for pid, start in pids.items():
        if _start_time(pid) == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return 0


class Guardian:
    """swapd's side of the pipe. Every method is cheap and never raises."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> bool:
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "swapd.guardian"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError:
            self._proc = None
            return False
        return True

    def _send(self, line: str) -> None:
        if self._proc is None or self._proc.stdin is None:
            return
        try:
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            self._proc = None

    def track_group(self, pgid: int) -> None:
        self._send(f"group {pgid}")

    def track_pid(self, pid: int) -> None:
        start = _start_time(pid)
        if start is not None:
            self._send(f"pid {pid} {start}")

    def forget(self, pid: int) -> None:
        self._send(f"forget {pid}")

    def close(self) -> None:
        """A clean exit: everything is stopped already, so the guardian kills nothing."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.write(b"bye\n")
                proc.stdin.close()
            proc.wait(timeout=5)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            proc.kill()


if __name__ == "__main__":
    raise SystemExit(run_guardian())
