"""GPU memory through NVML: attribution to models and verified stops.

After a model stops, its VRAM must really be free: llama.cpp router children,
vLLM engine workers and processes forked by wrapper scripts can outlive the
process swapd started. This module measures instead of assuming.

* :class:`Nvml` reads every GPU through nvidia-ml-py (``pynvml``; never
  nvidia-smi). NVML is initialised once and all its calls run on one dedicated
  thread, off the event loop.
* :func:`attribute` matches NVML's per-process memory with the models' process
  trees.
* :func:`judge` decides whether a stopped model's memory came back (the rule
  is described there).
* :class:`VramVerifier` wraps every stop (``Scheduler.stop_guard``) and gates
  every start (``Scheduler.start_gate``): baseline, stop, then poll NVML until
  the memory is back, SIGKILLing any process of the model's tree that still
  holds memory; the outcome is logged, counted and kept in a bounded history.

Without an NVIDIA driver (or without nvidia-ml-py) swapd logs one info line
and runs as before; stops are then recorded as ``unavailable`` and nothing
polls.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from swapd.backend import CHILDREN, Backend, State, StopReport, kill_leftovers
from swapd.scheduler import RuntimeView, Scheduler, SchedulerError
from swapd.logging import get_logger
from swapd.proctree import find_orphans, proc_name, process_tree

log = get_logger("swapd.gpu")

MIB = 1024 * 1024
# A stopped model's memory counts as returned when the device's used memory
# fell by at least this share of what the model's processes held (after
# correcting for other processes' changes; see judge()).
RECOVERY_FRACTION = 0.90
POLL_INTERVAL = 0.1  # seconds between NVML reads while a stop is verified
USAGE_TTL = 1.0  # /running and /v1/models reuse an attribution this young
HISTORY_SIZE = 100

# Clock event (throttle) reason bits, nvml.h nvmlClocksEventReason*.
THROTTLE_REASONS: tuple[tuple[int, str], ...] = (
    (0x001, "gpu_idle"),
    (0x002, "applications_clocks_setting"),
    (0x004, "sw_power_cap"),
    (0x008, "hw_slowdown"),
    (0x010, "sync_boost"),
    (0x020, "sw_thermal_slowdown"),
    (0x040, "hw_thermal_slowdown"),
    (0x080, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)

# NVML return codes this module tells apart (nvml.h).
_NOT_SUPPORTED = 3
_NO_PERMISSION = 4
_FUNCTION_NOT_FOUND = 13
_ARGUMENT_VERSION_MISMATCH = 25
_MISSING = (_NOT_SUPPORTED, _FUNCTION_NOT_FOUND, _ARGUMENT_VERSION_MISMATCH)


def throttle_names(mask: int | None) -> list[str]:
    """The names of the clock event reasons set in ``mask``."""
    if not mask:
        return []
    names = [name for bit, name in THROTTLE_REASONS if mask & bit]
    known = 0
    for bit, _ in THROTTLE_REASONS:
        known |= bit
    if mask & ~known:
        names.append(f"other(0x{mask & ~known:x})")
    return names


# -- what NVML reports --------------------------------------------------------


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_mib: float | None  # None when NVML cannot say (some vGPU/WDDM set-ups)
    kind: str  # "compute", "graphics" or "compute+graphics"


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    uuid: str
    total_mib: float
    used_mib: float
    free_mib: float
    reserved_mib: float | None = None  # memory info v2 only
    processes: tuple[GpuProcess, ...] | None = ()  # None: NVML cannot list them
    persistence: bool | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    throttle: int | None = None

    def process_pids(self) -> set[int]:
        return {p.pid for p in self.processes or ()}


@dataclass(frozen=True)
class Snapshot:
    driver: str | None
    devices: tuple[Device, ...]
    at: float = field(default_factory=time.monotonic)

    def device(self, index: int) -> Device | None:
        for dev in self.devices:
            if dev.index == index:
                return dev
        return None

    def pids(self) -> set[int]:
        out: set[int] = set()
        for dev in self.devices:
            out |= dev.process_pids()
        return out


def merge_processes(compute: Iterable[Any] | None, graphics: Iterable[Any] | None) -> tuple[GpuProcess, ...] | None:
    """One entry per pid from NVML's compute and graphics lists.

    A process using both APIs appears in both lists with the same memory, so
    the larger figure is kept rather than the sum.
    """
    if compute is None and graphics is None:
        return None
    merged: dict[int, GpuProcess] = {}
    for kind, items in (("compute", compute or ()), ("graphics", graphics or ())):
        for item in items:
            pid = int(item.pid)
            raw = getattr(item, "usedGpuMemory", None)
            mib = None if raw is None else raw / MIB
            old = merged.get(pid)
            if old is None:
                merged[pid] = GpuProcess(pid, mib, kind)
                continue
            best = old.used_mib if mib is None else mib if old.used_mib is None else max(old.used_mib, mib)
            kinds = old.kind if kind in old.kind.split("+") else f"{old.kind}+{kind}"
            merged[pid] = GpuProcess(pid, best, kinds)
    return tuple(sorted(merged.values(), key=lambda p: p.pid))


class NvmlUnavailable(Exception):
    """NVML cannot be used here; the message says why, for a person."""


class Nvml:
    """One initialised NVML session. Every NVML call runs on its own thread."""

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="swapd-nvml")
        self._nv: Any = None
        self._handles: list[Any] = []
        self._names: list[str] = []
        self._uuids: list[str] = []
        self.driver: str | None = None
        # Which versioned entry points work on this driver, learnt once.
        self._mem_v2: bool | None = None
        self._proc_fn: dict[str, str | None] = {}
        self._throttle_fn: str | None = None
        self._closed = False

    # -- lifecycle ----------------------------------------------------------
    @classmethod
    async def open(cls) -> Nvml:
        """Initialise NVML on its thread; raises NvmlUnavailable."""
        self = cls()
        try:
            await self.call(self._init)
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        return self

    @classmethod
    def open_sync(cls) -> Nvml:
        self = cls()
        try:
            self._executor.submit(self._init).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        return self

    def _init(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise NvmlUnavailable(f"nvidia-ml-py (pynvml) is not installed: {exc}") from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound:
            raise NvmlUnavailable(
                "libnvidia-ml.so.1 was not found: no NVIDIA driver is installed or visible to this process"
            ) from None
        except pynvml.NVMLError_DriverNotLoaded:
            raise NvmlUnavailable("the NVIDIA driver is not loaded") from None
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(f"NVML could not be initialised: {exc}") from None
        self._nv = pynvml
        try:
            self.driver = _text(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError:
            self.driver = None
        try:
            count = pynvml.nvmlDeviceGetCount()
            for index in range(count):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                self._handles.append(handle)
                self._names.append(self._optional(pynvml.nvmlDeviceGetName, handle) or f"GPU {index}")
                self._uuids.append(self._optional(pynvml.nvmlDeviceGetUUID, handle) or "")
        except pynvml.NVMLError as exc:
            pynvml.nvmlShutdown()
            raise NvmlUnavailable(f"NVML could not list the GPUs: {exc}") from None
        if not self._handles:
            pynvml.nvmlShutdown()
            raise NvmlUnavailable("NVML reports no GPU")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.call(self._nv.nvmlShutdown)
        except Exception as exc:  # pragma: no cover - nothing to do about it at exit
            log.debug("gpu.shutdown_failed", error=str(exc))
        self._executor.shutdown(wait=True)

    def close_sync(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._executor.submit(self._nv.nvmlShutdown).result()
        except Exception:  # pragma: no cover
            pass
        self._executor.shutdown(wait=True)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the NVML thread (everything touching NVML goes here)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def snapshot(self, full: bool = False) -> Snapshot:
        return await self.call(self.read, full)

    def read_sync(self, full: bool = True) -> Snapshot:
        return self._executor.submit(self.read, full).result()

    @property
    def device_names(self) -> list[str]:
        return list(self._names)

    # -- reading (on the NVML thread only) ------------------------------------
    def read(self, full: bool = False) -> Snapshot:
        """Memory and processes of every GPU; with ``full`` also power and clocks."""
        devices = []
        for index, handle in enumerate(self._handles):
            total, used, free, reserved = self._memory(handle)
            compute = self._process_list(handle, "compute")
            graphics = self._process_list(handle, "graphics")
            extra: dict[str, Any] = {}
            if full:
                persistence = self._optional(self._nv.nvmlDeviceGetPersistenceMode, handle)
                power = self._optional(self._nv.nvmlDeviceGetPowerUsage, handle)
                limit = self._optional(self._nv.nvmlDeviceGetEnforcedPowerLimit, handle)
                if limit is None:
                    limit = self._optional(self._nv.nvmlDeviceGetPowerManagementLimit, handle)
                extra = {
                    "persistence": None if persistence is None else bool(persistence),
                    "power_w": None if power is None else power / 1000.0,
                    "power_limit_w": None if limit is None else limit / 1000.0,
                    "throttle": self._throttle(handle),
                }
            devices.append(
                Device(
                    index=index,
                    name=self._names[index],
                    uuid=self._uuids[index],
                    total_mib=total / MIB,
                    used_mib=used / MIB,
                    free_mib=free / MIB,
                    reserved_mib=None if reserved is None else reserved / MIB,
                    processes=merge_processes(compute, graphics),
                    **extra,
                )
            )
        return Snapshot(self.driver, tuple(devices))

    def _optional(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return _text(fn(*args))
        except self._nv.NVMLError:
            return None

    def _memory(self, handle: Any) -> tuple[int, int, int, int | None]:
        nv = self._nv
        version = getattr(nv, "nvmlMemory_v2", None)
        if self._mem_v2 is not False and version is not None:
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(handle, version=version)
            except TypeError:  # an nvidia-ml-py without the version argument
                self._mem_v2 = False
            except nv.NVMLError as exc:
                if self._mem_v2 or _code(exc) not in _MISSING:
                    raise
                self._mem_v2 = False
            else:
                self._mem_v2 = True
                return mem.total, mem.used, mem.free, mem.reserved
        mem = nv.nvmlDeviceGetMemoryInfo(handle)
        return mem.total, mem.used, mem.free, None

    def _process_list(self, handle: Any, kind: str) -> list[Any] | None:
        nv = self._nv
        base = "nvmlDeviceGetComputeRunningProcesses" if kind == "compute" else "nvmlDeviceGetGraphicsRunningProcesses"
        known = self._proc_fn.get(kind, "")
        if known is None:
            return None
        names = [known] if known else [f"{base}_v3", f"{base}_v2"]
        for name in names:
            fn = getattr(nv, name, None)
            if fn is None:
                continue
            try:
                procs = fn(handle)
            except nv.NVMLError as exc:
                code = _code(exc)
                if code == _FUNCTION_NOT_FOUND and not known:
                    continue
                if code in (_NOT_SUPPORTED, _NO_PERMISSION):
                    return None
                raise
            self._proc_fn[kind] = name
            return procs
        self._proc_fn[kind] = None
        return None

    def _throttle(self, handle: Any) -> int | None:
        nv = self._nv
        names = (
            [self._throttle_fn]
            if self._throttle_fn
            else ["nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"]
        )
        for name in names:
            fn = getattr(nv, name, None)
            if fn is None:
                continue
            try:
                value = fn(handle)
            except nv.NVMLError as exc:
                if _code(exc) == _FUNCTION_NOT_FOUND:
                    continue
                return None
            self._throttle_fn = name
            return int(value)
        return None


def _code(exc: BaseException) -> int | None:
    return getattr(exc, "value", None)


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


# -- attribution and the decision ---------------------------------------------


@dataclass(frozen=True)
class Attribution:
    """Who holds what, per device."""

    by_model: dict[str, dict[int, dict[int, float | None]]]  # model -> device -> pid -> MiB
    unattributed: dict[int, tuple[GpuProcess, ...]]  # device -> processes of no model

    def model_mib(self, model_id: str) -> float:
        return sum(mib or 0.0 for dev in self.by_model.get(model_id, {}).values() for mib in dev.values())

    def model_pids(self, model_id: str) -> list[int]:
        return sorted({pid for dev in self.by_model.get(model_id, {}).values() for pid in dev})


def attribute(snapshot: Snapshot, trees: Mapping[str, Iterable[int]]) -> Attribution:
    """Match NVML's processes with each model's process tree."""
    owner: dict[int, str] = {}
    for model_id, pids in trees.items():
        for pid in pids:
            owner.setdefault(pid, model_id)
    by_model: dict[str, dict[int, dict[int, float | None]]] = {m: {} for m in trees}
    unattributed: dict[int, tuple[GpuProcess, ...]] = {}
    for dev in snapshot.devices:
        loose = []
        for proc in dev.processes or ():
            model_id = owner.get(proc.pid)
            if model_id is None:
                loose.append(proc)
            else:
                by_model[model_id].setdefault(dev.index, {})[proc.pid] = proc.used_mib
        unattributed[dev.index] = tuple(loose)
    return Attribution(by_model, unattributed)


@dataclass(frozen=True)
class Baseline:
    """What a model held just before its stop."""

    mode: str  # "pids": NVML's pids are ours; "memory_only": they are not visible here
    used: dict[int, float]  # device -> used MiB
    held: dict[int, float]  # device -> MiB the model held (attributed, or estimated)
    others: dict[int, float | None] | None  # device -> MiB of every other listed process (pids mode)
    pids: tuple[int, ...] = ()  # the model's pids NVML listed


def make_baseline(snapshot: Snapshot, tree: Iterable[int], mode: str, estimate: Mapping[int, float] | None = None) -> Baseline:
    """The baseline for a stop: by pid in ``pids`` mode, from ``estimate`` otherwise
    (and for a device whose processes NVML cannot list)."""
    used = {dev.index: dev.used_mib for dev in snapshot.devices}
    if mode == "memory_only":
        held = {d: max(0.0, mib) for d, mib in (estimate or {}).items() if d in used}
        return Baseline(mode, used, held, None)
    tree = set(tree)
    held: dict[int, float] = {}
    others: dict[int, float | None] = {}
    pids = []
    for dev in snapshot.devices:
        if dev.processes is None:
            held[dev.index] = max(0.0, (estimate or {}).get(dev.index, 0.0))
            others[dev.index] = None
            continue
        mine = [p for p in dev.processes if p.pid in tree]
        held[dev.index] = sum(p.used_mib or 0.0 for p in mine)
        others[dev.index] = sum(p.used_mib or 0.0 for p in dev.processes or () if p.pid not in tree)
        pids.extend(p.pid for p in mine)
    return Baseline(mode, used, {d: m for d, m in held.items() if m > 0}, others, tuple(sorted(set(pids))))


@dataclass(frozen=True)
class Verdict:
    freed: bool
    lingering: dict[int, float | None]  # the model's pids NVML still lists -> MiB
    recovered_mib: float
    remaining_mib: float
    devices: dict[int, dict[str, float]]


def judge(baseline: Baseline, snapshot: Snapshot, tree: Iterable[int] = ()) -> Verdict:
    """Has the stopped model's memory come back?

    The rule: no pid of the model's tree is listed by NVML any more, and on
    every device where the model held memory, the device's used memory fell by
    at least RECOVERY_FRACTION (90 %) of what the model held. In ``pids`` mode
    the fall is corrected by how much every *other* listed process grew or
    shrank meanwhile, so another user allocating (or freeing) during the stop
    neither hides a leak nor fakes a recovery; the remaining 10 % absorbs what
    NVML cannot attribute (driver bookkeeping, memory freed lazily, rounding).
    In ``memory_only`` mode there is nothing to correct with, and the 10 % is
    all the slack there is.
    """
    tree = set(tree)
    lingering: dict[int, float | None] = {}
    devices: dict[int, dict[str, float]] = {}
    recovered_total = remaining_total = 0.0
    ok = True
    for dev in snapshot.devices:
        for proc in dev.processes or ():
            if proc.pid in tree:
                lingering[proc.pid] = proc.used_mib
    for index, held in baseline.held.items():
        dev = snapshot.device(index)
        if dev is None:  # the GPU vanished from NVML: nothing can be confirmed
            ok = False
            remaining_total += held
            devices[index] = {"held_mib": held, "recovered_mib": 0.0}
            continue
        fall = baseline.used.get(index, dev.used_mib) - dev.used_mib
        others_before = baseline.others.get(index) if baseline.others is not None else None
        if others_before is not None and dev.processes is not None:
            others_now = sum(p.used_mib or 0.0 for p in dev.processes if p.pid not in tree)
            fall += others_now - others_before
        recovered = min(max(fall, 0.0), held)
        recovered_total += recovered
        remaining_total += held - recovered
        devices[index] = {"held_mib": held, "recovered_mib": recovered}
        if fall < RECOVERY_FRACTION * held:
            ok = False
    return Verdict(ok and not lingering, lingering, recovered_total, remaining_total, devices)


def memory_only_estimate(
    model_id: str, starts: Mapping[str, tuple[float, Mapping[int, float]]], used_now: Mapping[int, float]
) -> dict[int, float]:
    """What a model holds when NVML's pids cannot be matched (another PID namespace).

    The growth of each device's used memory from just before the model started
    up to the next start of another model, or up to now when none came later.
    Models started side by side, or one that grows long after another started,
    make this an estimate, and it is reported as one.
    """
    record = starts.get(model_id)
    if record is None:
        return {}
    t0, before = record
    later = sorted((t, used) for other, (t, used) in starts.items() if other != model_id and t > t0)
    reference = later[0][1] if later else used_now
    return {d: max(0.0, reference[d] - before[d]) for d in before if d in reference}


def pids_visible(pids: Iterable[int], proc_root: str = "/proc") -> bool | None:
    """True when NVML's pids are this process's pids, False when none is; None: no evidence."""
    pids = list(pids)
    if not pids:
        return None
    return any(os.path.exists(f"{proc_root}/{pid}") for pid in pids)


# -- the verifier ---------------------------------------------------------------


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

    def __init__(self, runtime: RuntimeView) -> None:
        self._runtime = runtime  # owns the config and the backends; read, never copied
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
        """Register as the scheduler's start gate and stop guard."""
        scheduler.add_stop_guard(self)
        scheduler.add_start_gate(self)

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
        finally:
            self._opened.set()

    async def close(self) -> None:
        if self.nvml is not None:
            await self.nvml.close()

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
    async def stop_guard(self, backend: Backend, reason: str, do_stop: Callable[[], Awaitable[StopReport]]) -> StopReport:
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
            self._record(model_id, reason, "unavailable", detail=f"NVML read failed: {exc}", stop_seconds=report.seconds)
            return report
        estimate = None
        if self.pid_mode == "memory_only" or any(d.processes is None for d in snapshot.devices):
            estimate = memory_only_estimate(model_id, self._starts, {d.index: d.used_mib for d in snapshot.devices})

        report = await do_stop()

        try:
            await self._verify(model_id, reason, report, snapshot, tree, estimate, started_at, others, stop_began)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed check must never fail the stop
            log.exception("vram.check_failed", model=model_id)
            self._record(model_id, reason, "unavailable", detail=f"verification failed: {exc}", stop_seconds=report.seconds)
        return report

    def _prepare(self, root: int | None, tracked: list[int]) -> tuple[Snapshot, dict[int, float | None]]:
        tree: dict[int, float | None] = dict(process_tree(root, tracked))
        return self.nvml.read(), tree

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
            snap, orphans = await self.nvml.call(
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
                done, failed = await self.nvml.call(kill_leftovers, targets, stop_began, set(CHILDREN.managed))
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
        snap = self.nvml.read()
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

    def _attribution_sync(self, running: dict[str, tuple[int | None, list[int]]]) -> tuple[Snapshot, Attribution, dict[str, list[int]]]:
        snap = self.nvml.read(full=True)
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
            visible = self.pid_mode != "memory_only"
            self._usage = {
                m: {"vram_mib": _mib(att.model_mib(m)) if visible else None, "pids": att.model_pids(m) if visible else []}
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
        }
        if self.nvml is None:
            return out
        running = self._running()
        snap, att, trees = await self.nvml.call(self._attribution_sync, running)
        await self._observe(snap)
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
                    "throttle_reasons": throttle_names(dev.throttle),
                    "processes_listed": dev.processes is not None,
                    "models": models,
                    "unattributed": [
                        {"pid": p.pid, "vram_mib": _mib(p.used_mib), "type": p.kind, "name": proc_name(p.pid) if visible else None}
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
