"""NVML through nvidia-ml-py: one session, every call on its own thread.

What NVML reports (:class:`Device`, :class:`Snapshot`, :class:`GpuProcess`)
and the reader (:class:`Nvml`), which learns once which versioned entry points
the driver has. Never nvidia-smi.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar, TypeVarTuple

from swapd.logging import get_logger

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")

log = get_logger("swapd.gpu")

MIB = 1024 * 1024

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
    temperature_c: float | None = None
    util_percent: float | None = None
    memory_util_percent: float | None = None
    fan_percent: float | None = None  # None: no fan NVML can read (data-centre GPUs have none)

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

    async def call(self, fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        """Run ``fn`` on the NVML thread (everything touching NVML goes here)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def snapshot(self, full: bool = False) -> Snapshot:
        return await self.call(self.read, full)

    def read_sync(self, full: bool = True) -> Snapshot:
        return self._executor.submit(self.read, full).result()

    @property
    def device_names(self) -> list[str]:
        return list(self._names)

    @property
    def device_uuids(self) -> dict[str, int]:
        """GPU UUID -> index, for CUDA_VISIBLE_DEVICES=GPU-..."""
        return {uuid: index for index, uuid in enumerate(self._uuids) if uuid}

    def describe(self) -> list[dict[str, Any]]:
        """What does not change while swapd runs, per GPU (on the NVML thread): for ``GET /api/hardware``.

        ``{"index", "name", "uuid", "pci_bus_id", "total_bytes", "power_limit_w", "compute_capability"}``;
        a value NVML cannot give is None.
        """
        out = []
        for index, handle in enumerate(self._handles):
            try:
                total: int | None = self._memory(handle)[0]
            except self._nv.NVMLError:
                total = None
            pci = self._optional(self._nv.nvmlDeviceGetPciInfo, handle)
            bus_id = _text(getattr(pci, "busId", None)) if pci is not None else None
            limit = self._optional(self._nv.nvmlDeviceGetEnforcedPowerLimit, handle)
            if limit is None:
                limit = self._optional(self._nv.nvmlDeviceGetPowerManagementLimit, handle)
            capability = self._optional(self._nv.nvmlDeviceGetCudaComputeCapability, handle)
            ok = isinstance(capability, tuple) and len(capability) == 2
            out.append(
                {
                    "index": index,
                    "name": self._names[index],
                    "uuid": self._uuids[index],
                    "pci_bus_id": bus_id or None,
                    "total_bytes": total,
                    "power_limit_w": None if limit is None else limit / 1000.0,
                    "compute_capability": f"{capability[0]}.{capability[1]}" if ok else None,
                }
            )
        return out

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
                temp = self._optional(self._nv.nvmlDeviceGetTemperature, handle, 0)  # NVML_TEMPERATURE_GPU
                util = self._optional(self._nv.nvmlDeviceGetUtilizationRates, handle)
                extra["temperature_c"] = None if temp is None else float(temp)
                if util is not None:
                    extra["util_percent"] = float(util.gpu)
                    extra["memory_util_percent"] = float(util.memory)
                fan = self._optional(self._nv.nvmlDeviceGetFanSpeed, handle)
                extra["fan_percent"] = None if fan is None else float(fan)
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
