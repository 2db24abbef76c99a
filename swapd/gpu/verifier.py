"""The VRAM verifier: verified stops and gated starts (see swapd.gpu's doc).

One class; over 400 lines because the stop path (baseline, stop, poll,
SIGKILL through swapd.backend, record) and /api/gpus' report share its state.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from swapd.backend import CHILDREN, Backend, State, StopReport, kill_leftovers
from swapd.footprints import FootprintBook
from swapd.gpu.nvml import Nvml, NvmlUnavailable, Snapshot, throttle_names
from swapd.gpu.verdict import (
    RECOVERY_FRACTION,
    Attribution,
    Baseline,
    Verdict,
    attribute,
    judge,
    make_baseline,
    memory_only_estimate,
    pids_visible,
)
from swapd.logging import get_logger
from swapd.proctree import find_orphans, proc_name, process_tree
from swapd.scheduler import RuntimeView, Scheduler, SchedulerError
from swapd.vram_router import DeviceMemory, MemoryView

log = get_logger("swapd.gpu")

POLL_INTERVAL = 0.1  # seconds between NVML reads while a stop is verified
USAGE_TTL = 1.0  # /running and /v1/models reuse an attribution this young
HISTORY_SIZE = 100
# While models run, their memory is sampled (for measured footprints and the vram router):
SAMPLE_FAST = 1.0  # seconds between samples in the first SAMPLE_FAST_FOR seconds after a start
SAMPLE_FAST_FOR = 30.0
SAMPLE_SLOW = 5.0  # afterwards


@dataclass
class _Unfreed:
    model: str
    baseline: Baseline
    tree: set[int]
    at: float
    remaining_mib: float
    lingering: list[int]


def _mib(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class VramVerifier:
    """Verified stops and gated starts for one swapd (see the module doc)."""

    def __init__(self, runtime: RuntimeView, footprints: FootprintBook | None = None) -> None:
        self._runtime = runtime  # owns the config and the backends; read, never copied
        self.footprints = footprints if footprints is not None else FootprintBook()
        self._view: MemoryView | None = None
        self._last_start = -1e9
        self._wake = asyncio.Event()
        self._sampler: asyncio.Task | None = None
        self._closing = False
        self._preparing: asyncio.Task | None = None
        self.nvml: Nvml | None = None
        self.unavailable_reason: str | None = None
        self._opened = asyncio.Event()
        self.counters = {"freed": 0, "not_freed": 0, "no_vram": 0, "unavailable": 0}
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY_SIZE)
        self.pid_mode = "unknown"  # becomes "pids" or "memory_only" at the first evidence
        self._unfreed: dict[str, _Unfreed] = {}
        self._starts: dict[str, tuple[float, dict[int, float]]] = {}
        self._usage: dict[str, dict[str, Any]] = {}
        self._usage_key: tuple = ()
        self._usage_at = -1e9
        self._usage_lock = asyncio.Lock()
        self._read_error_logged = False

    # -- set-up ----------------------------------------------------------------
    def attach(self, scheduler: Scheduler) -> None:
        """Register as the scheduler's start gate and stop guard, and as its memory source."""
        scheduler.add_stop_guard(self)
        scheduler.add_start_gate(self)
        scheduler.set_memory_source(self)

    async def open(self) -> None:
        try:
            self.nvml = await Nvml.open()
        except Exception as exc:  # NvmlUnavailable, or a library that misbehaves
            self.unavailable_reason = str(exc) if isinstance(exc, NvmlUnavailable) else f"NVML failed: {exc!r}"
            log.info(
                "gpu.unavailable",
                reason=self.unavailable_reason,
                detail="no GPU memory verification; swapd works normally and reports stops as unavailable",
            )
        else:
            log.info("gpu.ready", driver=self.nvml.driver, gpus=self.nvml.device_names, vram_check=self._mode())
            self.footprints.set_device_uuids(self.nvml.device_uuids)
            self._sampler = asyncio.get_running_loop().create_task(self._sample_loop())
        finally:
            self._opened.set()
        self.prepare_footprints()

    def prepare_footprints(self) -> None:
        """Estimate, in the background, the footprints nothing else gives (after start-up and reloads)."""
        if self._preparing is not None and not self._preparing.done():
            self._preparing.cancel()
        self.footprints.forget_stale(self._runtime.config)
        self._preparing = asyncio.get_running_loop().create_task(
            self._estimate_and_flush([mc for mc in self._runtime.config.models.values() if not mc.remote])
        )

    async def _estimate_and_flush(self, models: list) -> None:
        await self.footprints.prepare(models)
        await self.footprints.flush()  # forgotten measurements leave the store too

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        for task in (self._sampler, self._preparing):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:  # pragma: no cover - logged by the task itself
                    pass
        await self.footprints.flush()
        if self.nvml is not None:
            await self.nvml.close()

    # -- memory for the vram router (swapd.scheduler.MemorySource) ----------------------
    def memory_view(self) -> MemoryView | None:
        return self._view if self.nvml is not None else None

    async def refresh_memory(self) -> None:
        """Read and attribute NVML now; update the view and the measured footprints."""
        if self.nvml is None:
            return
        running = self._running()
        try:
            snap, att, _ = await self.nvml.call(self._attribution_sync, running)
            await self._observe(snap)
        except Exception as exc:
            self._log_read_error(exc)
            return
        self._learn(snap, att, running)

    def _learn(self, snap: Snapshot, att: Attribution, running: Mapping[str, object]) -> None:
        memory_only = self.pid_mode == "memory_only"
        used_now = {d.index: d.used_mib for d in snap.devices}
        usage: dict[str, dict[int, float]] = {}
        for model_id in running:
            if memory_only:
                usage[model_id] = memory_only_estimate(model_id, self._starts, used_now)
            else:
                per_dev = att.by_model.get(model_id, {})
                usage[model_id] = {d: sum(m or 0.0 for m in pids.values()) for d, pids in per_dev.items()}
        devices = {}
        for dev in snap.devices:
            managed = sum(u.get(dev.index, 0.0) for u in usage.values())
            held = dev.used_mib + (dev.reserved_mib or 0.0)
            devices[dev.index] = DeviceMemory(dev.index, dev.total_mib, max(0.0, held - managed))
        self._view = MemoryView(devices, usage, snap.at)
        for model_id, held_mib in usage.items():
            backend = self._runtime.backends.get(model_id)
            if backend is not None and backend.state in (State.READY, State.STARTING):
                self.footprints.observe(backend.model, held_mib)

    async def _sample_loop(self) -> None:
        """Sample the running models' memory: every second just after a start, then every 5 s."""
        while not self._closing:
            if self._running():
                await self.refresh_memory()
                await self.footprints.flush()
            fast = time.monotonic() - self._last_start < SAMPLE_FAST_FOR
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the event is set, and close() would wait for this loop forever.
            try:
                async with asyncio.timeout(SAMPLE_FAST if fast else SAMPLE_SLOW):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _mode(self) -> str:
        return getattr(self._runtime.config, "vram_check", "warn")

    def _timeout(self) -> float:
        return float(getattr(self._runtime.config, "vram_check_timeout", 10.0))

    # -- pid namespace detection --------------------------------------------------
    async def _observe(self, snapshot: Snapshot) -> None:
        if self.pid_mode != "unknown" or self.nvml is None:
            return
        visible = pids_visible(snapshot.pids())
        if visible is None:
            return
        if not visible:
            # Confirm with a second read: a process that just exited is not evidence.
            again = await self.nvml.snapshot()
            if pids_visible(again.pids()) is not False or self.pid_mode != "unknown":
                return
            self.pid_mode = "memory_only"
            log.info(
                "gpu.pid_namespace",
                nvml_pids=sorted(again.pids())[:10],
                detail="NVML's pids are not visible in /proc (swapd runs in another PID namespace); "
                "verifying stops by device memory only",
            )
        else:
            self.pid_mode = "pids"
            log.debug("gpu.pids_visible")

    # -- the start gate -------------------------------------------------------------
    async def start_gate(self, backend: Backend) -> None:
        """Before every start: note the device memory; in strict mode refuse while
        a stopped model's memory has not come back."""
        self._last_start = time.monotonic()
        self._wake.set()  # the sampler measures the new model from its first seconds
        mode = self._mode()
        if mode == "off":
            return
        await self._opened.wait()
        if self.nvml is None:
            return
        try:
            snapshot = await self.nvml.snapshot()
        except Exception as exc:
            self._log_read_error(exc)
            return
        still = []
        for model_id, entry in list(self._unfreed.items()):
            verdict = judge(entry.baseline, snapshot, entry.tree)
            if verdict.freed:
                del self._unfreed[model_id]
                log.info("vram.freed_late", model=model_id, seconds=round(time.monotonic() - entry.at, 3))
            else:
                entry.remaining_mib = verdict.remaining_mib
                entry.lingering = sorted(verdict.lingering)
                still.append(entry)
        if still and mode == "strict":
            parts = []
            for entry in still:
                text = f"model {entry.model!r} still holds about {entry.remaining_mib:.0f} MiB"
                if entry.lingering:
                    text += f" (pids {', '.join(map(str, entry.lingering))})"
                parts.append(text)
            raise SchedulerError(
                503,
                f"GPU memory of a stopped model has not been freed: {'; '.join(parts)}. "
                f"vramCheck is strict, so swapd will not start {backend.id!r} until it is; see GET /api/gpus",
                "vram_not_freed",
                {"Retry-After": "5"},
            )
        # The start goes ahead: an old measurement of this model says nothing about
        # its new run, and its memory is counted from here.
        self._unfreed.pop(backend.id, None)
        self._starts[backend.id] = (time.monotonic(), {d.index: d.used_mib for d in snapshot.devices})

    # -- the stop guard ---------------------------------------------------------------
    async def stop_guard(
        self, backend: Backend, reason: str, do_stop: Callable[[], Awaitable[StopReport]]
    ) -> StopReport:
        """Wrap one stop: baseline, stop, then verify that the memory came back."""
        mode = self._mode()
        if mode == "off":
            return await do_stop()
        await self._opened.wait()
        model_id = backend.id
        if self.nvml is None:
            report = await do_stop()
            self._record(model_id, reason, "unavailable", detail=self.unavailable_reason, stop_seconds=report.seconds)
            log.debug("vram.unavailable", model=model_id, reason=reason)
            return report

        root, tracked, started_at = backend.pid, backend.tracked_pids(), backend.started_at
        others = [
            (b.pid, b.tracked_pids(), b.started_at)
            for b in self._runtime.backends.values()
            if b is not backend and b.state is not State.STOPPED
        ]
        stop_began = time.time()
        try:
            snapshot, tree = await self.nvml.call(self._prepare, root, tracked)
            await self._observe(snapshot)
        except Exception as exc:
            self._log_read_error(exc)
            report = await do_stop()
            self._record(
                model_id, reason, "unavailable", detail=f"NVML read failed: {exc}", stop_seconds=report.seconds
            )
            return report
        estimate = None
        if self.pid_mode == "memory_only" or any(d.processes is None for d in snapshot.devices):
            estimate = memory_only_estimate(model_id, self._starts, {d.index: d.used_mib for d in snapshot.devices})

        if not estimate and self.pid_mode != "memory_only" and backend.state is State.READY:
            # The last reading of what the model held (its peak may be now); backend.model is
            # the config this process was started with.
            self.footprints.observe(backend.model, make_baseline(snapshot, tree, "pids").held)

        report = await do_stop()

        try:
            await self._verify(model_id, reason, report, snapshot, tree, estimate, started_at, others, stop_began)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed check must never fail the stop
            log.exception("vram.check_failed", model=model_id)
            self._record(
                model_id, reason, "unavailable", detail=f"verification failed: {exc}", stop_seconds=report.seconds
            )
        return report

    def _require_nvml(self) -> Nvml:
        """NVML, for the paths that run only after their caller saw it open (``self.nvml`` is set)."""
        nvml = self.nvml
        if nvml is None:
            raise RuntimeError("NVML is not open (VramVerifier.open() did not find it)")
        return nvml

    def _prepare(self, root: int | None, tracked: list[int]) -> tuple[Snapshot, dict[int, float | None]]:
        tree: dict[int, float | None] = dict(process_tree(root, tracked))
        return self._require_nvml().read(), tree

    async def _verify(
        self,
        model_id: str,
        reason: str,
        report: StopReport,
        snapshot: Snapshot,
        tree: dict[int, float | None],
        estimate: dict[int, float] | None,
        started_at: float | None,
        others: list[tuple[int | None, list[int], float | None]],
        stop_began: float,
    ) -> None:
        memory_only = self.pid_mode == "memory_only"
        for pid in getattr(report, "pids", ()):  # children and orphans the stop itself found
            tree.setdefault(pid, None)
        if memory_only:
            tree = {}
        baseline = make_baseline(snapshot, tree, "memory_only" if memory_only else "pids", estimate)
        timeout = self._timeout()
        t0 = time.monotonic()
        deadline = t0 + timeout
        killed: list[int] = []
        kill_failed: dict[int, str] = {}
        other_started = [s for _, _, s in others]
        while True:
            # CHILDREN.managed is changed on the loop: copy it here, not on the NVML thread.
            snap, orphans = await self._require_nvml().call(
                self._poll, set(tree), started_at, others, other_started, set(CHILDREN.managed), not memory_only
            )
            for pid, ctime in orphans.items():
                if pid not in tree:
                    tree[pid] = ctime
                    log.warning("vram.orphan_found", model=model_id, pid=pid)
            verdict = judge(baseline, snap, tree)
            if verdict.freed or time.monotonic() >= deadline:
                break
            targets = {pid: tree.get(pid) for pid in verdict.lingering if pid not in killed and pid not in kill_failed}
            if targets and not memory_only:
                done, failed = await self._require_nvml().call(
                    kill_leftovers, targets, stop_began, set(CHILDREN.managed)
                )
                for pid in done:
                    killed.append(pid)
                    log.warning("vram.sigkill", model=model_id, pid=pid, mib=_mib(verdict.lingering.get(pid)))
                kill_failed.update(failed)
            await asyncio.sleep(min(POLL_INTERVAL, max(0.0, deadline - time.monotonic())))
        seconds = time.monotonic() - t0
        held = sum(baseline.held.values())
        common = dict(
            mode=baseline.mode,
            held_mib=held,
            recovered_mib=verdict.recovered_mib,
            remaining_mib=verdict.remaining_mib,
            pids=list(baseline.pids),
            lingering=sorted(verdict.lingering),
            killed=killed,
            seconds=seconds,
            stop_seconds=report.seconds,
            devices=verdict.devices,
        )
        if verdict.freed and held <= 0:
            self._record(model_id, reason, "no_vram", **common)
            log.debug("vram.none_held", model=model_id, reason=reason, mode=baseline.mode)
        elif verdict.freed:
            report.vram_freed_mib = _mib(verdict.recovered_mib)
            self._record(model_id, reason, "freed", **common)
            log.info(
                "vram.freed",
                model=model_id,
                reason=reason,
                mib=_mib(verdict.recovered_mib),
                held_mib=_mib(held),
                seconds=round(seconds, 3),
                killed=killed,
                mode=baseline.mode,
            )
        else:
            strict = self._mode() == "strict"
            detail = _not_freed_detail(verdict, kill_failed, timeout)
            self._record(model_id, reason, "not_freed", detail=detail, **common)
            self._unfreed[model_id] = _Unfreed(
                model_id, baseline, set(tree), time.monotonic(), verdict.remaining_mib, sorted(verdict.lingering)
            )
            log.error(
                "vram.not_freed",
                model=model_id,
                reason=reason,
                pids=sorted(verdict.lingering),
                mib=_mib(verdict.remaining_mib),
                held_mib=_mib(held),
                seconds=round(seconds, 3),
                killed=killed,
                mode=baseline.mode,
                strict=strict,
                detail=detail,
            )

    def _poll(
        self,
        tree: set[int],
        started_at: float | None,
        others: list[tuple[int | None, list[int], float | None]],
        other_started: list[float | None],
        managed: set[int],
        look_for_orphans: bool,
    ) -> tuple[Snapshot, dict[int, float]]:
        snap = self._require_nvml().read()
        orphans: dict[int, float] = {}
        if look_for_orphans:
            candidates = snap.pids() - tree
            if candidates:
                other_pids: set[int] = set()
                for root, tracked, _ in others:
                    other_pids |= set(process_tree(root, tracked))
                orphans = find_orphans(
                    candidates,
                    started_at=started_at,
                    other_pids=other_pids,
                    other_started=other_started,
                    managed=managed,
                )
        return snap, orphans

    def _record(self, model_id: str, reason: str, outcome: str, **fields: Any) -> None:
        self.counters[outcome] = self.counters.get(outcome, 0) + 1
        entry: dict[str, Any] = {
            "model": model_id,
            "reason": reason,
            "outcome": outcome,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for key, value in fields.items():
            if key.endswith("_mib"):
                value = _mib(value)
            elif key.endswith("seconds") and value is not None:
                value = round(value, 3)
            elif key == "devices":
                value = {str(d): {k: _mib(v) for k, v in info.items()} for d, info in value.items()}
            entry[key] = value
        self.history.append(entry)

    def _log_read_error(self, exc: Exception) -> None:
        if not self._read_error_logged:
            self._read_error_logged = True
            log.warning("gpu.read_failed", error=str(exc))

    # -- attribution for /running, /v1/models and /api/gpus ------------------------------
    def _running(self) -> dict[str, tuple[int | None, list[int]]]:
        return {
            model_id: (b.pid, b.tracked_pids())
            for model_id, b in self._runtime.backends.items()
            if b.state is not State.STOPPED
        }

    def _attribution_sync(
        self, running: dict[str, tuple[int | None, list[int]]]
    ) -> tuple[Snapshot, Attribution, dict[str, list[int]]]:
        snap = self._require_nvml().read(full=True)
        trees = {m: sorted(process_tree(root, tracked)) for m, (root, tracked) in running.items()}
        return snap, attribute(snap, trees), trees

    async def usage(self) -> dict[str, dict[str, Any]]:
        """Per running model: {"vram_mib", "pids"}; at most one NVML read a second,
        and never on the event loop. Empty when NVML is unavailable."""
        if self.nvml is None:
            return {}
        running = self._running()
        if not running:
            return {}
        key = tuple(sorted((m, pid) for m, (pid, _) in running.items()))
        if key == self._usage_key and time.monotonic() - self._usage_at < USAGE_TTL:
            return self._usage
        async with self._usage_lock:
            if key == self._usage_key and time.monotonic() - self._usage_at < USAGE_TTL:
                return self._usage
            try:
                snap, att, _ = await self.nvml.call(self._attribution_sync, running)
                await self._observe(snap)
            except Exception as exc:
                self._log_read_error(exc)
                return {}
            self._learn(snap, att, running)
            visible = self.pid_mode != "memory_only"
            self._usage = {
                m: {
                    "vram_mib": _mib(att.model_mib(m)) if visible else None,
                    "pids": att.model_pids(m) if visible else [],
                }
                for m in running
            }
            self._usage_key = key
            self._usage_at = time.monotonic()
            return self._usage

    async def status(self) -> dict[str, Any]:
        """The body of GET /api/gpus."""
        out: dict[str, Any] = {
            "available": self.nvml is not None,
            "reason": self.unavailable_reason,
            "vram_check": self._mode(),
            "vram_check_timeout": self._timeout(),
            "recovery_fraction": RECOVERY_FRACTION,
            "pid_mode": self.pid_mode,
            "driver_version": self.nvml.driver if self.nvml else None,
            "swapd_pid": os.getpid(),
            "devices": [],
            "swapd_pids": [],
            "counters": dict(self.counters),
            "unfreed": [
                {"model": e.model, "remaining_mib": _mib(e.remaining_mib), "pids": e.lingering}
                for e in self._unfreed.values()
            ],
            "stops": list(self.history),
            "footprints": {m: fp.as_json() for m, fp in self.footprints.all(self._runtime.config).items()},
        }
        if self.nvml is None:
            return out
        running = self._running()
        snap, att, trees = await self.nvml.call(self._attribution_sync, running)
        await self._observe(snap)
        self._learn(snap, att, running)
        out["pid_mode"] = self.pid_mode
        visible = self.pid_mode != "memory_only"
        out["swapd_pids"] = sorted({os.getpid(), *(p for pids in trees.values() for p in pids)})
        used_now = {d.index: d.used_mib for d in snap.devices}
        for dev in snap.devices:
            models = []
            if visible:
                for model_id in sorted(att.by_model):
                    pids = att.by_model[model_id].get(dev.index)
                    if pids:
                        models.append(
                            {
                                "model": model_id,
                                "vram_mib": _mib(sum(m or 0.0 for m in pids.values())),
                                "pids": sorted(pids),
                                "processes": [{"pid": p, "vram_mib": _mib(m)} for p, m in sorted(pids.items())],
                            }
                        )
            else:
                for model_id in sorted(running):
                    est = memory_only_estimate(model_id, self._starts, used_now).get(dev.index)
                    models.append({"model": model_id, "vram_mib": _mib(est), "estimated": True, "pids": []})
            out["devices"].append(
                {
                    "index": dev.index,
                    "name": dev.name,
                    "uuid": dev.uuid,
                    "total_mib": _mib(dev.total_mib),
                    "used_mib": _mib(dev.used_mib),
                    "free_mib": _mib(dev.free_mib),
                    "reserved_mib": _mib(dev.reserved_mib),
                    "persistence_mode": dev.persistence,
                    "power_w": dev.power_w,
                    "power_limit_w": dev.power_limit_w,
                    "temperature_c": dev.temperature_c,
                    "util_percent": dev.util_percent,
                    "memory_util_percent": dev.memory_util_percent,
                    "throttle_reasons": throttle_names(dev.throttle),
                    "processes_listed": dev.processes is not None,
                    "models": models,
                    "unattributed": [
                        {
                            "pid": p.pid,
                            "vram_mib": _mib(p.used_mib),
                            "type": p.kind,
                            "name": proc_name(p.pid) if visible else None,
                        }
                        for p in att.unattributed.get(dev.index, ())
                    ],
                }
            )
        return out


def _not_freed_detail(verdict: Verdict, kill_failed: Mapping[int, str], timeout: float) -> str:
    parts = [f"after {timeout:g}s about {verdict.remaining_mib:.0f} MiB had not come back"]
    if verdict.lingering:
        parts.append("NVML still lists pid(s) " + ", ".join(map(str, sorted(verdict.lingering))))
    for pid, why in sorted(kill_failed.items()):
        parts.append(f"pid {pid}: {why}")
    return "; ".join(parts)
