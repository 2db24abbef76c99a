"""swapd's own children: the registry used to reap orphans safely, the guardian,
and the kill of a stopped model's leftovers (signals are swapd.backend's alone)."""

from __future__ import annotations

import os
import signal
import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING

import psutil

from swapd import osutil
from swapd.backend.state import State
from swapd.guardian import Guardian
from swapd.logging import get_logger
from swapd.proctree import created_during, is_child_of_me, own_children, same_process

if TYPE_CHECKING:
    from swapd.backend.process import Backend

log = get_logger("swapd.backend")


class ChildRegistry:
    """What swapd knows about its own children, for reaping orphans safely.

    swapd is a child subreaper, so orphaned grandchildren of a backend become
    swapd's children and must be reaped by us. Processes that asyncio spawned
    are reaped by asyncio's child watcher; reaping one of those here would lose
    its exit code, so they are excluded, and nothing is reaped while a spawn is
    between fork and registration.
    """

    def __init__(self) -> None:
        self.managed: set[int] = set()
        self.spawning = 0
        self.guardian: Guardian | None = None
        self.backends: weakref.WeakSet[Backend] = weakref.WeakSet()

    def claim_orphans(self, stopping: Backend) -> None:
        """Give ``stopping`` the orphans re-parented to swapd that only it could own.

        An orphan belongs to a backend if it was created while that backend
        ran; when another live backend could also have created it, it is left
        alone rather than killed on a guess.
        """
        if stopping.started_at is None:
            return
        others = [b.started_at for b in self.backends if b is not stopping and b.state is not State.STOPPED]
        for child in own_children():
            if child.pid in self.managed:
                continue
            try:
                ctime = child.create_time()
            except psutil.Error:
                continue
            if created_during(ctime, stopping.started_at, others):
                stopping.claim(child.pid, ctime)

    def ensure_guardian(self) -> Guardian | None:
        """Start the watchdog that kills our backends if swapd is SIGKILLed (once)."""
        if self.guardian is None:
            guardian = Guardian()
            if guardian.start() and guardian.pid is not None:  # a started guardian has a pid
                self.guardian = guardian
                self.managed.add(guardian.pid)
            else:
                log.warning("guardian.unavailable", detail="backends' descendants may outlive a SIGKILL of swapd")
        return self.guardian

    def close_guardian(self) -> None:
        if self.guardian is not None:
            pid = self.guardian.pid
            self.guardian.close()
            self.managed.discard(pid)
            self.guardian = None

    def track(self, pid: int, group: bool = False) -> None:
        if self.guardian is not None:
            if group:
                self.guardian.track_group(pid)
            self.guardian.track_pid(pid)

    def forget(self, pid: int) -> None:
        if self.guardian is not None:
            self.guardian.forget(pid)

    def reap_orphans(self) -> list[int]:
        if self.spawning:
            return []
        reaped = []
        for child in own_children():
            if child.pid in self.managed:
                continue
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    continue
            except psutil.Error:
                continue
            if osutil.reap_zombie(child.pid) is not None:
                reaped.append(child.pid)
        return reaped


CHILDREN = ChildRegistry()


def kill_leftovers(
    targets: Mapping[int, float | None], created_before: float, managed: set[int]
) -> tuple[list[int], dict[int, str]]:
    """SIGKILL processes of a stopped model that still hold resources (the GPU
    verifier finds them); blocking, so it runs off the event loop.

    Each pid is checked to still be the process meant (its create time, or
    created before ``created_before``); returns the pids killed and, per pid
    that could not be, why. What became swapd's child (it is the subreaper)
    is reaped unless asyncio owns it (``managed``).
    """
    done: list[int] = []
    failed: dict[int, str] = {}
    for pid, ctime in targets.items():
        if same_process(pid, ctime, created_before) is None:
            failed[pid] = "gone, yet NVML still lists it"
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            failed[pid] = "gone, yet NVML still lists it"
            continue
        except PermissionError:
            failed[pid] = "not permitted to kill it"
            continue
        done.append(pid)
    pending = [p for p in done if p not in managed]
    for _ in range(50):
        pending = [p for p in pending if _unreaped_child(p)]
        if not pending:
            break
        time.sleep(0.01)
    return done, failed


def _unreaped_child(pid: int) -> bool:
    """Reap ``pid`` if it is our exited child; True while it is our child still dying."""
    if osutil.reap_zombie(pid) is not None:
        return False
    return is_child_of_me(pid)
