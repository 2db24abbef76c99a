"""swapd.proctree: pid identity and tree rules, against real processes."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from swapd import proctree


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_identity_is_pid_and_create_time():
    proc = _sleeper()
    try:
        pid, ctime = proctree.pid_key(psutil.Process(proc.pid))
        assert pid == proc.pid
        assert proctree.alive(pid, ctime)
        assert not proctree.alive(pid, ctime - 5)  # the same pid, another process
        assert proctree.same_process(pid, ctime, created_before=0) is not None
        assert proctree.same_process(pid, None, created_before=ctime - 5) is None  # created too late
        assert proctree.same_process(pid, None, created_before=ctime + 5) is not None
    finally:
        proc.kill()
        proc.wait()
    assert not proctree.alive(pid, ctime)
    assert proctree.same_process(pid, ctime, created_before=ctime + 5) is None
    assert proctree.same_process(os.getpid(), None, created_before=1e12) is None  # never swapd itself
    assert proctree.same_process(1, None, created_before=1e12) is None


def test_process_tree_has_root_descendants_and_tracked_pids():
    outer = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"]
    )
    loose = _sleeper()
    try:
        root = psutil.Process(outer.pid)
        for _ in range(200):
            if root.children():
                break
            psutil.wait_procs([], timeout=0.02)
        child = root.children()[0].pid
        tree = proctree.process_tree(outer.pid, [loose.pid])
        assert set(tree) == {outer.pid, child, loose.pid}
        assert {p.pid for p in proctree.descendants(outer.pid)} == {outer.pid, child}
        assert proctree.process_tree(None, []) == {}
    finally:
        for p in psutil.Process(outer.pid).children(recursive=True):
            p.kill()
        for p in (outer, loose):
            p.kill()
            p.wait()


def test_created_during_rule():
    assert proctree.created_during(100.0, started_at=90.0, others_started=[])
    assert proctree.created_during(99.5, started_at=100.0, others_started=[])  # within the slack
    assert not proctree.created_during(95.0, started_at=100.0, others_started=[])
    # another running backend started before it: it could be theirs
    assert not proctree.created_during(100.0, started_at=90.0, others_started=[95.0])
    assert proctree.created_during(100.0, started_at=90.0, others_started=[None, 120.0])
