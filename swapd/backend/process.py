"""One model's backend process: spawn, health wait, crash watch, full-tree stop.

A ``Backend`` owns its process and its state. The scheduler decides *when* a
backend starts or stops; the backend decides *how*, and it is the only code
that changes its own state (along swapd.backend.state.TRANSITIONS).

Over 500 lines on purpose: one class whose start, crash watch and stop share
the process, the tracked tree and the stop lock; splitting it would spread
one state machine over several files.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shlex
import signal
import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp
import psutil

from swapd import osutil
from swapd.backend.children import CHILDREN
from swapd.backend.probe import _RawProbeTarget
from swapd.backend.state import StartError, State, StopReport, check_transition
from swapd.config import ModelConfig
from swapd.logging import get_logger
from swapd.logring import LogRing
from swapd.proctree import alive, descendants, pid_key
from swapd.redact import redact_argv, redact_url

log = get_logger("swapd.backend")

TAIL_LINES = 20
START_FAILED_TAIL = 10  # output lines a backend.start_failed log event carries
_READ_CHUNK = 64 * 1024
_MAX_LINE = 8 * 1024
# Tree snapshots while a backend runs; cheap (one /proc walk) and rare.
_TRACK_INTERVAL = 5.0


class Backend:
    """The process behind one configured model."""

    def __init__(
        self,
        model: ModelConfig,
        *,
        logs: LogRing,
        session: aiohttp.ClientSession,
        on_exit: Callable[[Backend, int | None], None] | None = None,
        on_state: Callable[[Backend, State, State], None] | None = None,
    ) -> None:
        CHILDREN.backends.add(self)
        self.model = model
        self.next_model: ModelConfig | None = None  # set by a reload; used from the next start
        self._state = State.STOPPED
        self._logs = logs
        self._session = session
        self._on_exit = on_exit
        self._on_state = on_state
        self._proc: asyncio.subprocess.Process | None = None
        self._tracked: dict[int, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self._pumps: list[asyncio.Task] = []
        self._exited = asyncio.Event()
        self._stop_lock = asyncio.Lock()
        self._recent: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._stopping_by_us = False
        self.started_at: float | None = None  # wall clock, for orphan attribution
        self.ready_at: float | None = None
        self.last_exit_code: int | None = None
        self.last_error: str | None = None

    # -- introspection -------------------------------------------------
    @property
    def state(self) -> State:
        """Read-only: only the backend itself moves it, through TRANSITIONS."""
        return self._state

    @property
    def id(self) -> str:
        return self.model.id

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def tracked_pids(self) -> list[int]:
        return sorted(self._tracked)

    def tail(self) -> list[str]:
        return list(self._recent)

    def _set_state(self, new: State) -> None:
        old = self._state
        check_transition(self.id, old, new)
        self._state = new
        log.debug("backend.state", model=self.id, old=old.value, new=new.value)
        if self._on_state is not None:
            self._on_state(self, old, new)

    # -- configuration (a reload) ----------------------------------------
    def reconfigure(self, model: ModelConfig, *, restart: bool) -> None:
        """Take a reloaded config: at once when ``restart`` is False (nothing that
        affects the process changed), else from the next start, so the running
        process is still stopped the way its own config says."""
        if restart:
            self.next_model = model
        else:
            self.model = model

    def _spawn_task(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- start ---------------------------------------------------------
    async def start(self) -> None:
        """Spawn the backend and return once its health check passes.

        Raises ``StartError`` when the process exits first or the health check
        times out; the process tree is gone by then. Cancellation also stops
        the tree before propagating.
        """
        if self.state is not State.STOPPED:
            raise RuntimeError(f"start() in state {self.state.value}")
        t0 = time.monotonic()
        if self.next_model is not None:
            self.model, self.next_model = self.next_model, None
        self._set_state(State.STARTING)
        self._exited = asyncio.Event()
        self._proc = None  # the last run's process is gone; pid is None until this one spawns
        self._tracked = {}
        self._recent.clear()
        self._stopping_by_us = False
        self.last_error = None
        try:
            self._check_port_free()
            await self._spawn()
            await self._wait_healthy(t0)
        except BaseException as exc:
            if isinstance(exc, StartError):
                self.last_error = exc.detail()
                log.error(
                    "backend.start_failed",
                    model=self.id,
                    pid=self.pid,
                    cause=str(exc),
                    exit_code=exc.exit_code,
                    tail=exc.tail[-START_FAILED_TAIL:],
                    seconds=round(time.monotonic() - t0, 3),
                )
            elif isinstance(exc, Exception):  # a bug, but the log must still say the start failed
                log.exception("backend.start_failed", model=self.id, pid=self.pid, cause=repr(exc))
            await self._teardown("start failed")
            raise
        self.ready_at = time.time()
        self._set_state(State.READY)
        # The tree walk reads all of /proc (several ms): let the waiting
        # requests go first. stop() takes its own snapshot anyway.
        asyncio.get_running_loop().call_soon(self._snapshot_tree)
        log.info("backend.ready", model=self.id, pid=self.pid, seconds=round(time.monotonic() - t0, 3))

    def _check_port_free(self) -> None:
        """Refuse to start when another process already listens on the model's port.

        Otherwise the health check could pass against that other server and
        swapd would route requests to the wrong process.
        """
        port = self.model.port
        if port is None:
            return
        host = (urlsplit(self.model.proxy).hostname or "").lower()
        if host not in ("localhost", "127.0.0.1", "::1", "0.0.0.0", ""):
            return
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
                return
            except OSError:
                pass
        owner = ""
        try:
            for conn in psutil.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                    owner = f" by pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                    break
        except (psutil.Error, OSError):
            pass
        raise StartError(
            self.id, f"model {self.id}: port {port} is already in use{owner}; stop that process or change startPort"
        )

    async def _spawn(self) -> None:
        model = self.model
        env = dict(os.environ)
        env.update(model.env)
        CHILDREN.ensure_guardian()
        CHILDREN.spawning += 1
        try:
            argv, preexec = osutil.pdeathsig_command(model.cmd, env)
            if osutil.running_on_uvloop():  # only stdio may reach the backend
                preexec = osutil.stdio_only_preexec(preexec)
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # own process group: one signal reaches the tree
                preexec_fn=preexec,
            )
        except OSError as exc:
            raise StartError(self.id, f"model {self.id}: cannot run {model.cmd[0]!r}: {exc.strerror or exc}") from exc
        finally:
            CHILDREN.spawning -= 1
        proc = self._proc
        assert proc.stdout is not None and proc.stderr is not None  # both were asked for as PIPEs
        CHILDREN.managed.add(proc.pid)
        CHILDREN.track(proc.pid, group=True)
        self.started_at = time.time()
        key = pid_key(psutil.Process(proc.pid)) if psutil.pid_exists(proc.pid) else None
        if key:
            self._tracked[key[0]] = key[1]
        log.info("backend.start", model=self.id, pid=proc.pid, cmd=shlex.join(redact_argv(model.cmd)))
        self._pumps = [
            self._spawn_task(self._pump(proc.stdout, "stdout")),
            self._spawn_task(self._pump(proc.stderr, "stderr")),
        ]
        self._spawn_task(self._watch(proc))

    async def _pump(self, reader: asyncio.StreamReader, stream: str) -> None:
        """Copy a pipe into the log ring line by line, whatever its volume."""
        pending = b""
        while True:
            chunk = await reader.read(_READ_CHUNK)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self._add_line(stream, raw)
            while len(pending) > _MAX_LINE:  # an endless line must not grow without bound
                self._add_line(stream, pending[:_MAX_LINE])
                pending = pending[_MAX_LINE:]
        if pending:
            self._add_line(stream, pending)

    def _add_line(self, stream: str, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        self._recent.append(text)
        self._logs.append(self.id, stream, text)

    async def _wait_exit(self, proc: asyncio.subprocess.Process) -> int | None:
        """The root's exit code, as soon as it exits.

        asyncio's ``Process.wait()`` also waits for the stdout and stderr pipes
        to close, and an orphaned grandchild can hold them open indefinitely,
        so the exit itself is watched through a pidfd.
        """
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # no pidfd (old kernel), or already reaped
            return await proc.wait()
        loop = asyncio.get_running_loop()
        exited = loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, on_exit)
        waiter = asyncio.ensure_future(proc.wait())
        try:
            try:
                await asyncio.wait({exited, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                loop.remove_reader(pidfd)
                os.close(pidfd)
            if waiter.done():
                return waiter.result()
            # The child watcher reaps it and records the code within moments.
            for _ in range(400):
                if proc.returncode is not None:
                    break
                await asyncio.sleep(0.005)
            return proc.returncode
        finally:
            if not waiter.done():
                waiter.cancel()

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        """Notice the root process exiting, expected or not."""
        exit_task = asyncio.ensure_future(self._wait_exit(proc))
        try:
            while True:
                done, _ = await asyncio.wait({exit_task}, timeout=_TRACK_INTERVAL)
                if done:
                    code = exit_task.result()
                    break
                self._snapshot_tree()
        finally:
            exit_task.cancel()
        CHILDREN.managed.discard(proc.pid)
        self.last_exit_code = code
        self._exited.set()
        if self._stopping_by_us or self.state is State.STARTING:
            return  # start() or stop() owns what happens next
        # A ready backend died on its own: clean up what it left and tell the scheduler.
        crashed = False
        async with self._stop_lock:
            if self.state is State.READY and not self._stopping_by_us:
                crashed = True
                log.error("backend.crashed", model=self.id, pid=proc.pid, exit_code=code, tail=self.tail()[-5:])
                self.last_error = f"model {self.id} exited unexpectedly with code {code}"
                self._set_state(State.STOPPING)
                CHILDREN.claim_orphans(self)
                await self._kill_tree(list(self._live_tracked().items()), reason="crash", grace=0.0)
                self._finish_stop()
        if crashed and self._on_exit is not None:
            self._on_exit(self, code)

    # -- health --------------------------------------------------------
    async def _wait_healthy(self, t0: float) -> None:
        model = self.model
        deadline = t0 + model.health_check_timeout
        check = model.check_endpoint
        url = None if check.strip().lower() == "none" else model.proxy.rstrip("/") + "/" + check.lstrip("/")
        target = _RawProbeTarget.parse(url) if url is not None else None
        exited = asyncio.ensure_future(self._exited.wait())  # one waiter for the whole load
        try:
            while True:
                if self._exited.is_set():
                    # Let the pipes drain so the error shows the backend's last words.
                    if self._pumps:
                        await asyncio.wait(self._pumps, timeout=0.5)
                    code = self.last_exit_code
                    tail = self.tail()[-TAIL_LINES:]
                    raise StartError(
                        self.id,
                        f"model {self.id}: backend exited with code {code} before it was ready",
                        exit_code=code,
                        tail=tail,
                    )
                if url is None or await self._probe(url, target):
                    return
                now = time.monotonic()
                if now >= deadline:
                    raise StartError(
                        self.id,
                        f"model {self.id}: health check {redact_url(url)} did not answer 200 within "
                        f"{model.health_check_timeout:g}s (healthCheckTimeout)",
                        tail=self.tail()[-TAIL_LINES:],
                    )
                # A probe costs tens of microseconds (see _probe), so readiness is
                # noticed within 5 ms while a load is young and 10 ms after.
                interval = 0.005 if now - t0 < 10 else 0.01
                await asyncio.wait((exited,), timeout=min(interval, deadline - now))
        finally:
            exited.cancel()

    async def _probe(self, url: str, target: _RawProbeTarget | None = None) -> bool:
        """GET the health URL; True on 200.

        Plain ``http://`` URLs are probed on a bare non-blocking socket: while a
        backend loads, a probe is usually a refused connect or one 503, and
        this costs a few percent of aiohttp's client path, so swapd can poll
        every few milliseconds. Anything else (https, a redirect, which aiohttp
        follows) goes through the aiohttp session as before.
        """
        if target is not None:
            try:
                async with asyncio.timeout(2):
                    verdict = await target.probe()
            except (TimeoutError, OSError):
                return False
            if verdict is not None:
                return verdict
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    # -- stop ----------------------------------------------------------
    def _snapshot_tree(self) -> None:
        """Add the root's current descendants (and process-group members) to the tracked set."""
        if self._proc is None:
            return
        for proc in descendants(self._proc.pid):
            key = pid_key(proc)
            if key is not None and key[0] not in self._tracked:
                self._tracked[key[0]] = key[1]
                CHILDREN.track(key[0])

    def _live_tracked(self) -> dict[int, float]:
        return {pid: ctime for pid, ctime in self._tracked.items() if alive(pid, ctime)}

    def claim(self, pid: int, ctime: float) -> None:
        """Attribute an orphan (found by the registry) to this backend."""
        if pid not in self._tracked:
            self._tracked[pid] = ctime
            CHILDREN.track(pid)

    async def stop(self, reason: str) -> StopReport:
        """Stop the whole process tree; return what was stopped and how.

        Safe to call in any state and from several callers: later callers wait
        for the stop already running.
        """
        async with self._stop_lock:
            if self.state is State.STOPPED or self._proc is None:
                return StopReport(self.id, reason, None, [])
            t0 = time.monotonic()
            self._stopping_by_us = True
            self._set_state(State.STOPPING)
            self._snapshot_tree()
            CHILDREN.claim_orphans(self)
            root = self._proc.pid
            pids = sorted(self._tracked)
            forced, survivors = await self._terminate(reason)
            report = StopReport(
                self.id,
                reason,
                root,
                pids,
                forced=forced,
                survivors=survivors,
                seconds=time.monotonic() - t0,
                exit_code=self.last_exit_code,
            )
            self._finish_stop()
        log.info(
            "backend.stop",
            model=self.id,
            reason=reason,
            pid=root,
            pids=pids,
            forced=forced,
            survivors=survivors,
            seconds=round(report.seconds, 3),
        )
        return report

    async def _teardown(self, reason: str) -> None:
        """Stop after a failed or cancelled start; never raises.

        A ``stop()`` that ran meanwhile may have finished the job already (the
        backend is STOPPED then) or be finishing it: the stop lock orders the two.
        """
        self._stopping_by_us = True
        await asyncio.shield(self._teardown_locked(reason))

    async def _teardown_locked(self, reason: str) -> None:
        async with self._stop_lock:
            if self._state is State.STOPPED:
                return
            try:
                if self._proc is not None:
                    self._snapshot_tree()
                    await self._terminate(reason, grace_override=0.0)
            except Exception:  # pragma: no cover - cleanup must not mask the start error
                log.exception("backend.teardown_failed", model=self.id)
            self._finish_stop()

    def _finish_stop(self) -> None:
        self._proc_cleanup()
        self._set_state(State.STOPPED)

    def _proc_cleanup(self) -> None:
        for pid in list(self._tracked):
            if pid not in CHILDREN.managed:
                osutil.reap_zombie(pid)
            CHILDREN.forget(pid)
        self._tracked.clear()
        self.ready_at = None

    async def _terminate(self, reason: str, grace_override: float | None = None) -> tuple[list[int], list[int]]:
        """SIGTERM (or cmdStop), wait up to unloadTimeout, then SIGKILL what is left."""
        proc = self._proc
        assert proc is not None
        grace = self.model.unload_timeout if grace_override is None else grace_override
        targets = list(self._live_tracked().items())
        if grace > 0 and not self._exited.is_set():
            if self.model.cmd_stop:
                await self._run_cmd_stop(proc.pid, grace)
            else:
                osutil.signal_group(proc.pid, signal.SIGTERM)
                for pid, _ in targets:
                    osutil.signal_pid(pid, signal.SIGTERM)
        elif grace > 0:
            # The root is gone already; its descendants still get a polite signal.
            for pid, _ in targets:
                osutil.signal_pid(pid, signal.SIGTERM)
        return await self._kill_tree(targets, reason=reason, grace=grace)

    async def _kill_tree(
        self, targets: list[tuple[int, float]], *, reason: str, grace: float
    ) -> tuple[list[int], list[int]]:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if self._exited.is_set() and not any(alive(p, c) for p, c in targets):
                return [], []
            await asyncio.sleep(0.02)
        remaining = [(p, c) for p, c in targets if alive(p, c)]
        forced = [p for p, _ in remaining]
        if not self._exited.is_set() and proc.pid not in forced:
            forced.insert(0, proc.pid)
        if forced:
            log.warning("backend.sigkill", model=self.id, pids=forced, reason=reason, after_seconds=grace)
        osutil.signal_group(proc.pid, signal.SIGKILL)
        for pid, _ in remaining:
            osutil.signal_pid(pid, signal.SIGKILL)
        # SIGKILL cannot be refused; wait for the kernel to finish the job.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            for pid, _ in remaining:
                if pid not in CHILDREN.managed:
                    osutil.reap_zombie(pid)
            if self._exited.is_set() and not any(alive(p, c) for p, c in remaining):
                return forced, []
            await asyncio.sleep(0.02)
        survivors = [p for p, c in remaining if alive(p, c)]
        return forced, survivors

    async def _run_cmd_stop(self, pid: int, timeout: float) -> None:
        argv = [part.replace("${PID}", str(pid)) for part in self.model.cmd_stop]
        log.info("backend.cmd_stop", model=self.id, cmd=shlex.join(redact_argv(argv)))
        CHILDREN.spawning += 1
        try:
            stopper = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                env={**os.environ, **dict(self.model.env)},
                start_new_session=True,
                preexec_fn=osutil.stdio_only_preexec() if osutil.running_on_uvloop() else None,
            )
        except OSError as exc:
            log.error("backend.cmd_stop_failed", model=self.id, error=str(exc))
            osutil.signal_group(pid, signal.SIGTERM)
            return
        finally:
            CHILDREN.spawning -= 1
        CHILDREN.managed.add(stopper.pid)
        try:
            await asyncio.wait_for(stopper.wait(), timeout)
        except TimeoutError:
            log.warning("backend.cmd_stop_timeout", model=self.id, seconds=timeout)
            osutil.signal_group(stopper.pid, signal.SIGKILL)
            await stopper.wait()
        finally:
            CHILDREN.managed.discard(stopper.pid)

    async def close(self) -> None:
        """Stop (if needed) and wait for the helper tasks; used at shutdown."""
        await self.stop("shutdown")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
