"""Which models run: admission, the FIFO queue, swaps, leases and TTLs.

All decisions are made synchronously inside this class, on the event loop, so
they never interleave; the slow effects (stopping and starting processes) run
in tasks the scheduler owns and report back through ``_on_swap_done``.

The rules follow llama-swap's FIFO scheduler:

* A request for a ready model with nothing to evict is served at once.
* A request for a model that is already being swapped in joins that swap.
* A swap never evicts a model that has requests in flight; the request waits
  in the queue until the busy model drains.
* Swaps whose evict sets are disjoint run in parallel.
* Queued requests are retried in order whenever something finishes, so
  requests arriving A B A B are served A A B B.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from swapd.backend import CHILDREN, Backend, StartError, State, StopReport
from swapd.config import Config
from swapd.footprints import FootprintBook
from swapd.logging import get_logger
from swapd.matrix import MatrixRouter
from swapd.router import Decision, Eviction, GroupRouter, Router, RunningModel
from swapd.telemetry.record import Wait
from swapd.vram_router import MemoryView, VramRouter

log = get_logger("swapd.scheduler")


class RuntimeView(Protocol):
    """What the scheduler (and the GPU verifier) read from the runtime that owns
    the state: the current config and the backends table. Neither keeps a copy;
    a reload changes both in the runtime alone."""

    @property
    def config(self) -> Config: ...

    @property
    def backends(self) -> Mapping[str, Backend]: ...


class StartGate(Protocol):
    """An extension point run before every backend start (swapd.gpu implements it)."""

    async def start_gate(self, backend: Backend) -> None:
        """Return to let the start go ahead; raise SchedulerError to refuse it."""
        ...


class StopGuard(Protocol):
    """An extension point wrapped around every stop of a running backend."""

    async def stop_guard(
        self, backend: Backend, reason: str, do_stop: Callable[[], Awaitable[StopReport]]
    ) -> StopReport:
        """Call ``do_stop`` exactly once and return its report (measuring around it)."""
        ...


class MemorySource(Protocol):
    """What the vram router reads about GPU memory (swapd.gpu's verifier implements it)."""

    @property
    def footprints(self) -> FootprintBook: ...

    def memory_view(self) -> MemoryView | None:
        """The latest attributed NVML reading; None without NVML."""
        ...

    async def refresh_memory(self) -> None:
        """Read NVML now, so the next ``memory_view`` is fresh."""
        ...


class SchedulerError(Exception):
    """A request the scheduler refuses; rendered as an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


class Lease:
    """Permission to send one request to a ready backend.

    While any lease on a model is held, no swap may stop it and its TTL clock
    does not run. ``release`` is idempotent.
    """

    __slots__ = ("backend", "_scheduler", "_released", "waited")

    def __init__(self, scheduler: Scheduler, backend: Backend, waited: Wait | None = None) -> None:
        self.backend = backend
        self._scheduler = scheduler
        self._released = False
        self.waited = waited  # the start (or swap) this request waited on, for telemetry; None if none

    @property
    def model_id(self) -> str:
        return self.backend.id

    def release(self, keep_alive: float | None = None) -> None:
        """Give the slot back. ``keep_alive`` (seconds; < 0: forever, 0: stop when idle) replaces the
        model's TTL for the idle time that follows, as Ollama's per-request ``keep_alive`` does."""
        if not self._released:
            self._released = True
            self._scheduler._on_serve_done(self.backend.id, keep_alive)


@dataclass(eq=False)
class _Request:
    model: str
    future: asyncio.Future
    priority: int = 0
    arrived: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Swap:
    target: str
    evict: list[str]
    waiters: list[_Request]
    task: asyncio.Task | None = None
    why: Mapping[str, Eviction] = field(default_factory=dict)
    memory_aware: bool = False  # the vram router decided: recheck the fit with fresh numbers before starting
    started: float = 0.0  # monotonic: the swap task began
    stops_done: float = 0.0  # ... its stops were done
    did_start: bool = False  # it started the target (not only waited for a ready one)


class _NeedsRoom(Exception):
    """Fresh NVML numbers say the target no longer fits: its waiters go back to the queue."""


def _guarded(
    guard: StopGuard, backend: Backend, reason: str, inner: Callable[[], Awaitable[StopReport]]
) -> Callable[[], Awaitable[StopReport]]:
    def run() -> Awaitable[StopReport]:
        return guard.stop_guard(backend, reason, inner)

    return run


class Scheduler:
    def __init__(self, runtime: RuntimeView, router: Router | None = None) -> None:
        self._runtime = runtime
        self._router_override = router
        self._group_router = GroupRouter()
        self._matrix_router = MatrixRouter()
        self._memory: MemorySource | None = None
        self._book = FootprintBook()  # replaced by the memory source's book (set_memory_source)
        self._vram_router = VramRouter(self._book, self._memory_view, self._loaded)
        self._last_used: dict[str, float] = {}
        self._active: dict[str, _Swap] = {}
        self._queue: list[_Request] = []
        self._reserved: dict[str, int] = {}
        self._in_flight: dict[str, int] = {}
        self._ttl_timers: dict[str, asyncio.TimerHandle] = {}
        # a TTL set by the last finished request (Ollama's keep_alive), in place of the model's own
        self._keep_alive: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self.swap_count = 0
        self.stop_history: list[StopReport] = []
        self.on_stop: list[Callable[[StopReport], None]] = []
        # Extension points (swapd.gpu registers both): see add_start_gate / add_stop_guard.
        self._start_gates: list[StartGate] = []
        self._stop_guards: list[StopGuard] = []

    # -- extension points --------------------------------------------------
    def add_start_gate(self, gate: StartGate) -> None:
        """Run ``gate.start_gate(backend)`` before every start, in registration order."""
        self._start_gates.append(gate)

    def add_stop_guard(self, guard: StopGuard) -> None:
        """Wrap every stop of a running backend in ``guard.stop_guard``; the first
        registered guard is the outermost."""
        self._stop_guards.append(guard)

    def set_memory_source(self, source: MemorySource) -> None:
        """Where the vram router reads footprints and GPU memory (swapd.gpu registers itself)."""
        self._memory = source
        self._book = source.footprints
        self._vram_router = VramRouter(self._book, self._memory_view, self._loaded)

    @property
    def footprints(self) -> FootprintBook:
        return self._book

    @property
    def router(self) -> Router:
        """The rule the config asks for: ``routing.router.use`` (group, matrix or vram)."""
        if self._router_override is not None:
            return self._router_override
        kind = self.config.router
        if kind == "vram":
            return self._vram_router
        if kind == "matrix":
            return self._matrix_router
        return self._group_router

    def _memory_view(self) -> MemoryView | None:
        return None if self._memory is None else self._memory.memory_view()

    def _loaded(self, model_id: str) -> bool:
        backend = self.backends.get(model_id)
        return backend is not None and backend.state in (State.READY, State.STARTING)

    def memory_budget(self) -> dict[int, dict[str, float]]:
        """Per GPU, what the vram router counts and the budget it has left (empty otherwise)."""
        if self.config.router != "vram":
            return {}
        return self._vram_router.budget(self.config, self._running_set(""))

    # -- the runtime's state, read through -----------------------------------
    @property
    def config(self) -> Config:
        return self._runtime.config

    @property
    def backends(self) -> Mapping[str, Backend]:
        return self._runtime.backends

    # -- public API ------------------------------------------------------
    def in_flight(self, model_id: str) -> int:
        return self._in_flight.get(model_id, 0)

    def queued(self) -> list[str]:
        return [r.model for r in self._queue]

    def ttl_remaining(self, model_id: str) -> float | None:
        """Seconds until ``model_id``'s TTL stops it (0 when due), or None with no timer armed.

        No timer is armed for a model with ttl 0, one with requests in flight,
        or one that is not ready. Call it on the event loop.
        """
        handle = self._ttl_timers.get(model_id)
        if handle is None or handle.cancelled():
            return None
        return max(0.0, handle.when() - asyncio.get_running_loop().time())

    def request(self, model_id: str) -> _Request:
        """Admit one request for ``model_id`` now, or refuse it (429, 404, 503).

        Admission is synchronous so a refusal reaches the client before any
        loading stream starts. Pass the ticket to ``wait``; a caller that
        gives up before waiting must ``abandon`` it.
        """
        self.check_admission(model_id)
        self._reserved[model_id] = self._reserved.get(model_id, 0) + 1
        req = _Request(model_id, asyncio.get_running_loop().create_future(), self._priority(model_id))
        self._on_request(req)
        return req

    def admitted(self) -> dict[str, int]:
        """Requests admitted and not yet finished, per model (waiting, loading or in flight)."""
        return {m: n for m, n in self._reserved.items() if n}

    def check_admission(self, model_id: str) -> None:
        """Raise the refusal ``request`` would give now (429, 404, 503), reserving nothing.

        The JSON route asks this as soon as a large body names its model, so a
        model at its concurrencyLimit refuses before the rest of the body is
        read, while a slow upload holds no slot.
        """
        if self._closing:
            raise SchedulerError(503, "swapd is shutting down", "shutting_down")
        if model_id not in self.backends:
            raise SchedulerError(404, f"model {model_id!r} is not configured", "model_not_found")
        limit = self.backends[model_id].model.concurrency_limit or 10
        if self._reserved.get(model_id, 0) >= limit:
            raise SchedulerError(
                429,
                f"too many requests for model {model_id!r} (concurrencyLimit {limit})",
                "concurrency_limit",
                {"Retry-After": "1"},
            )

    async def wait(self, req: _Request) -> Lease:
        """Wait until the admitted request may be served."""
        try:
            return await req.future
        except asyncio.CancelledError:
            self.abandon(req)
            raise

    def abandon(self, req: _Request) -> None:
        """The caller is gone: drop the request from the queue or hand its lease back."""
        self._on_cancel(req)
        if not req.future.done():
            req.future.cancel()

    async def acquire(self, model_id: str) -> Lease:
        """Admit and wait: a lease on a ready ``model_id``."""
        return await self.wait(self.request(model_id))

    def serving_now(self, model_id: str) -> bool:
        """True when a request for ``model_id`` is being served without waiting."""
        backend = self.backends.get(model_id)
        return backend is not None and backend.state is State.READY and model_id not in self._active

    async def unload(self, model_ids: Iterable[str] | None = None, reason: str = "unload") -> list[StopReport]:
        """Stop models now (all when ``model_ids`` is None), as llama-swap's /unload does."""
        targets = list(self.backends) if model_ids is None else list(model_ids)
        err = SchedulerError(503, "model was unloaded while the request waited", "model_unloaded")
        for target in targets:
            swap = self._active.pop(target, None)
            if swap is not None:
                for waiter in swap.waiters:
                    self._grant_error(waiter, err)
        kept = []
        for req in self._queue:
            if req.model in targets:
                self._grant_error(req, err)
            else:
                kept.append(req)
        self._queue = kept
        reports = await asyncio.gather(*(self._stop(t, reason) for t in targets))
        self._drain()
        return [r for r in reports if r.pids]

    def drain(self) -> None:
        """Shutdown has begun: refuse new requests and fail queued ones with 503.

        Requests already being served keep their leases and may finish.
        """
        self._closing = True
        err = SchedulerError(503, "swapd is shutting down", "shutting_down")
        for swap in list(self._active.values()):
            for waiter in swap.waiters:
                self._grant_error(waiter, err)
            swap.waiters.clear()
            if swap.task is not None:
                swap.task.cancel()
        for req in self._queue:
            self._grant_error(req, err)
        self._queue.clear()

    async def close(self) -> None:
        """Refuse new work, fail waiters, cancel swaps and stop every backend."""
        self._closing = True
        err = SchedulerError(503, "swapd is shutting down", "shutting_down")
        for swap in list(self._active.values()):
            for waiter in swap.waiters:
                self._grant_error(waiter, err)
            if swap.task is not None:
                swap.task.cancel()
        self._active.clear()
        for req in self._queue:
            self._grant_error(req, err)
        self._queue.clear()
        for handle in self._ttl_timers.values():
            handle.cancel()
        self._ttl_timers.clear()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await asyncio.gather(*(self._stop(m, "shutdown") for m in self.backends))
        await asyncio.gather(*(b.close() for b in self.backends.values()), return_exceptions=True)
        CHILDREN.close_guardian()

    # -- decisions (synchronous) ----------------------------------------
    def _priority(self, model_id: str) -> int:
        return self.config.priority.get(model_id, 0)

    def _running_set(self, exclude: str) -> dict[str, RunningModel]:
        """What the router sees: every model not stopped, and every model a swap
        is bringing in, except ``exclude`` (the target)."""
        out: dict[str, RunningModel] = {}
        for model_id, backend in self.backends.items():
            if backend.state is not State.STOPPED and model_id != exclude:
                out[model_id] = self._running_model(model_id, backend.state.value)
        for model_id in self._active:
            if model_id != exclude and model_id not in out:
                out[model_id] = self._running_model(model_id, "swapping")
        return out

    def _running_model(self, model_id: str, state: str) -> RunningModel:
        return RunningModel(model_id, self._in_flight.get(model_id, 0), self._last_used.get(model_id), state)

    def _decision_for(self, target: str) -> Decision:
        """What must happen before ``target`` may run (the router decides)."""
        return self.router.decide(target, self._running_set(target), self.config)

    def _collides(self, target: str, evict: list[str]) -> bool:
        for other, swap in self._active.items():
            if other == target:
                continue
            if other in evict or target in swap.evict or set(evict) & set(swap.evict):
                return True
        return False

    def _decide(self, req: _Request) -> bool:
        """Try to make progress on ``req``; return False when it must stay queued."""
        swap = self._active.get(req.model)
        if swap is not None:
            swap.waiters.append(req)
            return True
        backend = self.backends[req.model]
        decision = self._decision_for(req.model)
        evict = list(decision.evict)
        if decision.refuse is not None:
            log.warning("scheduler.refused", model=req.model, reason=decision.refuse)
            self._grant_error(req, SchedulerError(503, decision.refuse, "model_does_not_fit", {"Retry-After": "30"}))
            return True
        if backend.state is State.READY and not evict and not self._collides(req.model, evict):
            self._grant(req)
            return True
        if self._collides(req.model, evict):
            return False
        if any(self._in_flight.get(m, 0) > 0 for m in evict):
            return False
        self._start_swap(req, evict, decision)
        return True

    def _on_request(self, req: _Request) -> None:
        if not self._decide(req):
            self._enqueue(req)

    def _enqueue(self, req: _Request) -> None:
        index = len(self._queue)
        for i, queued in enumerate(self._queue):
            if queued.priority < req.priority:
                index = i
                break
        self._queue.insert(index, req)
        log.debug("scheduler.queued", model=req.model, position=index + 1)

    def _drain(self) -> None:
        if not self._queue or self._closing:
            return
        pending, self._queue = self._queue, []
        for req in pending:
            if req.future.done():
                continue
            if not self._decide(req):
                self._queue.append(req)

    def _on_cancel(self, req: _Request) -> None:
        if req.future.done() and not req.future.cancelled() and req.future.exception() is None:
            # Granted just before the client went away: hand the lease back.
            req.future.result().release()
            return
        removed = False
        if req in self._queue:
            self._queue.remove(req)
            removed = True
        for swap in self._active.values():
            if req in swap.waiters:
                swap.waiters.remove(req)
                removed = True
        if removed:
            self._release(req.model)
            log.debug("scheduler.cancelled", model=req.model)

    def _grant(self, req: _Request, waited: Wait | None = None) -> None:
        if req.future.done():  # the caller is gone; its reservation went with _on_cancel
            return
        self._in_flight[req.model] = self._in_flight.get(req.model, 0) + 1
        self._last_used[req.model] = time.monotonic()
        timer = self._ttl_timers.pop(req.model, None)
        if timer is not None:
            timer.cancel()
        req.future.set_result(Lease(self, self.backends[req.model], waited))

    def _grant_error(self, req: _Request, err: Exception) -> None:
        if not req.future.done():
            self._release(req.model)
            req.future.set_exception(err)

    def _release(self, model_id: str) -> None:
        n = self._reserved.get(model_id, 0) - 1
        if n > 0:
            self._reserved[model_id] = n
        else:
            self._reserved.pop(model_id, None)

    def _on_serve_done(self, model_id: str, keep_alive: float | None = None) -> None:
        if keep_alive is None:
            self._keep_alive.pop(model_id, None)
        else:
            self._keep_alive[model_id] = keep_alive
        self._release(model_id)
        self._last_used[model_id] = time.monotonic()
        n = self._in_flight.get(model_id, 0) - 1
        if n > 0:
            self._in_flight[model_id] = n
            return
        self._in_flight.pop(model_id, None)
        self._arm_ttl(model_id)
        self._drain()

    # -- TTL ---------------------------------------------------------------
    def _arm_ttl(self, model_id: str) -> None:
        backend = self.backends.get(model_id)
        if backend is None or backend.state is not State.READY or self._closing:
            return
        ttl = self._keep_alive.get(model_id)
        if ttl is None:
            ttl = backend.model.ttl
            if ttl <= 0:
                return
        elif ttl < 0:
            return  # keep_alive < 0: loaded until something else stops it
        old = self._ttl_timers.pop(model_id, None)
        if old is not None:
            old.cancel()
        self._ttl_timers[model_id] = asyncio.get_running_loop().call_later(ttl, self._ttl_expired, model_id)

    def _ttl_expired(self, model_id: str) -> None:
        self._ttl_timers.pop(model_id, None)
        keep_alive = self._keep_alive.pop(model_id, None)
        backend = self.backends.get(model_id)
        if (
            backend is None
            or backend.state is not State.READY
            or self._in_flight.get(model_id, 0) > 0
            or model_id in self._active
            or any(r.model == model_id for r in self._queue)
        ):
            return
        log.info("scheduler.ttl_expired", model=model_id, ttl=backend.model.ttl if keep_alive is None else keep_alive)
        self._spawn(self._stop_then_drain(model_id, "ttl"))

    # -- effects (tasks) ---------------------------------------------------
    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_swap(self, req: _Request, evict: list[str], decision: Decision) -> None:
        memory_aware = self.router is self._vram_router
        swap = _Swap(req.model, evict, [req], why=decision.why, memory_aware=memory_aware)
        self._active[req.model] = swap
        if evict:
            log.info("scheduler.swap", target=req.model, evict=evict)
        swap.task = self._spawn(self._run_swap(swap))

    async def _evict(self, swap: _Swap, model_id: str) -> None:
        why = swap.why.get(model_id)
        report = await self._stop(model_id, "evict" if swap.memory_aware else "swap")
        if why is not None and swap.memory_aware:
            log.info(
                "scheduler.evict",
                model=model_id,
                for_model=swap.target,
                reason=why.reason,
                idle_seconds=why.idle_seconds,
                counted_mib=why.mib,
                freed_mib=report.vram_freed_mib,
            )

    async def _run_swap(self, swap: _Swap) -> None:
        t0 = swap.started = swap.stops_done = time.monotonic()
        err: Exception | None = None
        requeue = False
        try:
            if swap.evict:
                await asyncio.gather(*(self._evict(swap, m) for m in swap.evict))
                swap.stops_done = time.monotonic()
            backend = self.backends[swap.target]
            if swap.memory_aware and backend.state is not State.READY and self._memory is not None:
                # The decision used the last reading; the stops above were verified. Decide again on
                # fresh numbers (another process may have taken memory) before anything starts.
                await self._memory.refresh_memory()
                again = self._decision_for(swap.target)
                if again.evict or again.refuse is not None:
                    raise _NeedsRoom()
            if backend.state is not State.READY:
                await self._stop(swap.target, "restart")  # waits out a stop already in progress
                for gate in self._start_gates:
                    await gate.start_gate(backend)
                await backend.start()
                swap.did_start = True
                if swap.evict:
                    self.swap_count += 1
        except (StartError, SchedulerError) as exc:
            err = exc
        except _NeedsRoom:
            requeue = True
        except asyncio.CancelledError:
            err = SchedulerError(503, "swapd is shutting down", "shutting_down")
            raise
        except Exception as exc:  # pragma: no cover - a bug, but waiters must not hang on it
            log.exception("scheduler.swap_failed", target=swap.target)
            err = exc
        finally:
            self._on_swap_done(swap, err, time.monotonic() - t0, requeue)

    def _on_swap_done(self, swap: _Swap, err: Exception | None, seconds: float, requeue: bool = False) -> None:
        if self._active.get(swap.target) is swap:
            del self._active[swap.target]
        if requeue:
            log.info("scheduler.recheck", model=swap.target, detail="fresh GPU numbers: deciding again")
            waiting = [w for w in swap.waiters if not w.future.done()]
            self._queue[:0] = waiting
        elif err is not None:
            for waiter in swap.waiters:
                self._grant_error(waiter, err)
        else:
            waited = None
            if swap.did_start or swap.evict:
                waited = Wait(swap.target, swap.started, swap.stops_done, time.monotonic(), tuple(swap.evict))
            for waiter in swap.waiters:
                self._grant(waiter, waited)
            if self._in_flight.get(swap.target, 0) == 0:
                self._arm_ttl(swap.target)  # every waiter left; the clock runs from now
        self._drain()

    async def _stop(self, model_id: str, reason: str) -> StopReport:
        timer = self._ttl_timers.pop(model_id, None)
        if timer is not None:
            timer.cancel()
        backend = self.backends[model_id]

        def do_stop() -> Awaitable[StopReport]:
            return backend.stop(reason)

        if backend.state is not State.STOPPED:
            for guard in reversed(self._stop_guards):
                do_stop = _guarded(guard, backend, reason, do_stop)
        report = await do_stop()
        if report.pids:
            self.stop_history.append(report)
            del self.stop_history[:-100]
            for callback in self.on_stop:
                callback(report)
        return report

    async def _stop_then_drain(self, model_id: str, reason: str) -> None:
        await self._stop(model_id, reason)
        self._drain()

    def on_backend_exit(self, backend: Backend, code: int | None) -> None:
        """A ready backend crashed; queued work may now proceed or restart it."""
        timer = self._ttl_timers.pop(backend.id, None)
        if timer is not None:
            timer.cancel()
        self._drain()
