"""Thin wrappers over the Linux process controls swapd relies on.

Everything here degrades to a no-op off Linux so the package still imports,
but swapd's guarantees (backends die with swapd, orphans are reaped) are only
made on Linux.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import functools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_libc = None
_prctl = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _prctl = _libc.prctl
        _prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        _prctl.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        _prctl = None


def set_child_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants.

    A backend's grandchildren that lose their parent are then re-parented to
    swapd instead of init, so swapd can still see, kill and reap them.
    """
    if _prctl is None:
        return False
    return _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def make_pdeathsig_preexec(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """Return a preexec_fn that makes the child die when swapd dies.

    The function is built before fork so the child does no imports or lookups:
    it only makes the prctl call and checks it did not lose a race with the
    parent's death.
    """
    prctl = _prctl
    parent = os.getpid()
    getppid = os.getppid
    kill = os.kill
    mypid = os.getpid

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        # The parent may have died between fork and prctl; then no signal
        # would ever come, so deliver it now.
        if getppid() != parent:
            kill(mypid(), sig)

    return preexec


def stdio_only_preexec(then: Callable[[], None] | None = None) -> Callable[[], None]:
    """A preexec_fn that leaves the child only its stdio across exec, for uvloop.

    uvloop does not implement ``close_fds``: it marks the child's ends of the
    stdio pipes (and /dev/null) inheritable in swapd before forking, so after
    libuv dup2()s them onto 0-2 the originals stay open in the backend, as
    does any fd swapd itself inherited from its parent. This runs in the
    child after fork and before libuv's dup2s, and marks every fd above 2
    close-on-exec: the dup2 targets 0-2 are created inheritable, everything
    else closes at exec. (asyncio's loop closes them itself: close_fds.)
    Then ``then`` runs (the pdeathsig preexec, where setpriv is missing).
    Everything is looked up before the fork.
    """
    listdir = os.listdir
    get_inheritable = os.get_inheritable
    set_inheritable = os.set_inheritable

    def preexec() -> None:
        try:
            names = listdir("/proc/self/fd")
        except OSError:  # pragma: no cover - no /proc
            names = [str(fd) for fd in range(3, 1024)]
        for name in names:
            fd = int(name)
            if fd > 2:
                try:
                    if get_inheritable(fd):
                        set_inheritable(fd, False)
                except OSError:  # closed (the listing's own fd)
                    pass
        if then is not None:
            then()

    return preexec


def running_on_uvloop() -> bool:
    try:
        return type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    except RuntimeError:
        return False


def reap_zombie(pid: int) -> int | None:
    """Reap ``pid`` if it is an exited child of ours; return its raw status."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return status if got == pid else None


def signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def signal_pid(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    except OSError as exc:  # pragma: no cover
        if exc.errno == errno.ESRCH:
            return False
        raise


@functools.cache
def _pdeathsig_wrapper() -> str | None:
    """util-linux's setpriv, if it has --pdeathsig (2.33 and later); looked up once."""
    path = shutil.which("setpriv")
    if not path:
        return None
    try:
        out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "--pdeathsig" in out else None


def pdeathsig_command(argv: Sequence[str], env: dict[str, str]) -> tuple[Sequence[str], Callable[[], None] | None]:
    """The argv and preexec_fn that start ``argv`` with a parent-death SIGKILL.

    With util-linux's ``setpriv --pdeathsig KILL`` in front of the command
    (it sets the signal, then execs the command in the same process), Python
    needs no ``preexec_fn`` and can use vfork: spawning from a 40 MB swapd
    takes about 1 ms instead of 25-33 ms. Without setpriv, a preexec_fn does
    the prctl. Either way the guardian process covers a SIGKILLed swapd.

    Because setpriv would turn a missing command into its own exit 127, the
    command is looked up first and a missing or non-executable one raises
    ``OSError`` here, as exec would have.
    """
    wrapper = _pdeathsig_wrapper()
    if wrapper is None:
        return argv, make_pdeathsig_preexec()
    program = argv[0]
    found = shutil.which(program, path=env.get("PATH", os.defpath))
    if found is None:
        if os.sep in program and os.path.exists(program):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    return [wrapper, "--pdeathsig", "KILL", "--", *argv], None


# -- event loop and orphan reaping -------------------------------------------------

EVENT_LOOPS = ("auto", "uvloop", "asyncio")

# How often a loop that keeps SIGCHLD to itself (uvloop) checks for zombie
# children: one waitid() call, and the /proc scan only when one exists.
ZOMBIE_CHECK_SECONDS = 1.0


def event_loop_factory(choice: str):
    """``(name, factory)`` for ``--event-loop``: ``auto`` is uvloop when it imports, else asyncio's loop.

    The factory goes to ``asyncio.Runner``; None there means asyncio's own
    loop, set up exactly as ``asyncio.run`` does. Raises ``RuntimeError``
    when ``uvloop`` is asked for and is not installed.
    """
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise RuntimeError("--event-loop uvloop: uvloop is not installed (pip install uvloop)") from None
        else:
            return "uvloop", uvloop.new_event_loop
    return "asyncio", None


def has_zombie_child() -> bool:
    """Whether any child of this process has exited and is not yet reaped (nothing is reaped here)."""
    if not hasattr(os, "waitid"):  # pragma: no cover - not Linux
        return False
    try:
        return os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # no children at all
        return False


def watch_orphans(loop: asyncio.AbstractEventLoop, reap: Callable[[], object]) -> Callable[[], None]:
    """Call ``reap`` when children may have exited; return the function that stops it.

    asyncio's loop delivers SIGCHLD, so ``reap`` runs at once. uvloop keeps
    SIGCHLD for its own subprocesses (it refuses a handler), so there a timer
    checks every ``ZOMBIE_CHECK_SECONDS`` with one ``waitid`` call and runs
    ``reap`` only when a zombie exists: an orphan waits at most that long.
    """
    try:
        loop.add_signal_handler(signal.SIGCHLD, reap)
    except RuntimeError:
        pass
    else:

        def stop() -> None:
            loop.remove_signal_handler(signal.SIGCHLD)

        return stop
    handle = None

    def check() -> None:
        nonlocal handle
        if has_zombie_child():
            reap()
        handle = loop.call_later(ZOMBIE_CHECK_SECONDS, check)

    handle = loop.call_later(ZOMBIE_CHECK_SECONDS, check)
    return lambda: handle.cancel()
