"""Process trees and pid identity (psutil), shared by swapd.backend and swapd.gpu.

A pid is only meaningful with its create time: the kernel reuses pids, so
every rule here compares ``(pid, create_time)`` and never acts on a pid whose
process was created after the one we meant. Nothing here sends a signal;
killing is swapd.backend's job alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import psutil

# Two create times within this many seconds are the same process.
SAME_CTIME = 0.01
# Slack for "created while the backend ran": the backend's start time is taken
# just after the spawn, and create times have a coarse clock.
ATTRIBUTION_SLACK = 1.0


def pid_key(proc: psutil.Process) -> tuple[int, float] | None:
    """``(pid, create_time)``, or None when the process is gone."""
    try:
        return proc.pid, proc.create_time()
    except psutil.Error:
        return None


def alive(pid: int, ctime: float) -> bool:
    """True while ``pid`` is still the process we tracked and not a zombie."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - ctime) > SAME_CTIME:
            return False  # pid was reused by an unrelated process
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def same_process(pid: int, ctime: float | None, created_before: float) -> psutil.Process | None:
    """The live process ``pid`` if it is still the one we mean, else None.

    With no recorded create time, the process must predate ``created_before``.
    Never swapd itself or pid 1.
    """
    if pid <= 1 or pid == os.getpid():
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        created = proc.create_time()
    except psutil.Error:
        return None
    if ctime is not None:
        return proc if abs(created - ctime) < SAME_CTIME else None
    return proc if created <= created_before else None


def descendants(root: int) -> list[psutil.Process]:
    """``root`` and all its descendants (zombies included); [] when it is gone."""
    try:
        top = psutil.Process(root)
        return [top, *top.children(recursive=True)]
    except psutil.Error:
        return []


def process_tree(root: int | None, tracked: Iterable[int]) -> dict[int, float]:
    """Live pids of a model: its root, the root's descendants and the pids the
    backend tracked (which include children that left with setsid), each with
    its create time so a reused pid is never mistaken for it."""
    out: dict[int, float] = {}
    procs: list[psutil.Process] = descendants(root) if root is not None else []
    for pid in tracked:
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            continue
    for proc in procs:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            out.setdefault(proc.pid, proc.create_time())
        except psutil.Error:
            continue
    return out


def created_during(ctime: float, started_at: float, others_started: Iterable[float | None]) -> bool:
    """The attribution rule for an orphan: created while the backend that
    started at ``started_at`` ran, and after no other running backend started
    (else that one could own it, and it is left alone rather than killed on a guess)."""
    if ctime < started_at - ATTRIBUTION_SLACK:
        return False
    return not any(s is not None and ctime >= s - ATTRIBUTION_SLACK for s in others_started)


def find_orphans(
    candidates: Iterable[int],
    *,
    started_at: float | None,
    other_pids: set[int],
    other_started: Iterable[float | None],
    managed: set[int],
) -> dict[int, float]:
    """GPU processes that can only have come from the model being stopped.

    swapd is a child subreaper, so a grandchild whose parent exited is
    re-parented to swapd. A GPU process qualifies when it descends from swapd,
    belongs to no other running model, is no backend root, was created while
    the stopped model ran, and no other running model started before it (so
    it could not be theirs). This is how a detached helper forked during the
    stop itself is found.
    """
    if started_at is None:
        return {}
    me = os.getpid()
    others_started = list(other_started)
    found: dict[int, float] = {}
    for pid in candidates:
        if pid in other_pids or pid in managed or pid <= 1 or pid == me:
            continue
        try:
            proc = psutil.Process(pid)
            ctime = proc.create_time()
            ancestors = [p.pid for p in proc.parents()]
        except psutil.Error:
            continue
        if not created_during(ctime, started_at, others_started):
            continue
        if me not in ancestors or any(a in other_pids or a in managed for a in ancestors if a != me):
            continue
        found[pid] = ctime
    return found


def own_children() -> list[psutil.Process]:
    """swapd's direct children (its own spawns and re-parented orphans)."""
    try:
        return psutil.Process().children()
    except psutil.Error:  # pragma: no cover
        return []


def is_child_of_me(pid: int) -> bool:
    try:
        return psutil.Process(pid).ppid() == os.getpid()
    except psutil.Error:
        return False


def proc_name(pid: int) -> str | None:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return None
