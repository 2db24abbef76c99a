"""What machine swapd runs on: llama-swap's ``HardwareSnapshot`` (schema version 1) for ``GET /api/hardware``.

The facts do not change while swapd runs, so they are read once (the server
does it in a thread at start-up). Every optional fact that cannot be read is
``null``, never a guess, as llama-swap's ``internal/hw`` promises; the JSON
keys and their order are that package's.

Sources: the platform module and psutil (architecture, system, CPU counts
and memory), ``/proc/cpuinfo`` (CPU vendor, model, sockets),
``/proc/zoneinfo`` and the cgroup memory limit (usable memory, as llama-swap
adjusts it), ``/etc/os-release``, WSL and container markers and
``systemd-detect-virt`` (the environment), and NVML through swapd's GPU
verifier (NVIDIA GPUs: name, memory, driver, power limit, architecture from
the compute capability). Unlike llama-swap, swapd does not probe AMD or
other GPUs (rocm-smi, KFD topology, DRM sysfs): those machines list no
accelerators.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import psutil

SCHEMA_VERSION = 1

_CONTAINERS = ("docker", "lxc", "rkt", "podman", "containerd", "systemd-nspawn")
_DISPLAY = {
    "docker": "Docker",
    "kvm": "KVM",
    "vmware": "VMware",
    "vbox": "VirtualBox",
    "hyperv": "Hyper-V",
    "lxc": "LXC",
}

# NVIDIA compute capability -> architecture name (the table llama-swap falls back to)
_NVIDIA_ARCH = {
    "2.0": "Fermi",
    "2.1": "Fermi",
    "3.0": "Kepler",
    "3.2": "Kepler",
    "3.5": "Kepler",
    "3.7": "Kepler",
    "5.0": "Maxwell",
    "5.2": "Maxwell",
    "5.3": "Maxwell",
    "6.0": "Pascal",
    "6.1": "Pascal",
    "6.2": "Pascal",
    "7.0": "Volta",
    "7.2": "Volta",
    "7.5": "Turing",
    "8.0": "Ampere",
    "8.6": "Ampere",
    "8.7": "Ampere",
    "8.9": "Ada Lovelace",
    "9.0": "Hopper",
    "10.0": "Blackwell",
    "10.3": "Blackwell",
    "11.0": "Blackwell",
    "12.0": "Blackwell",
    "12.1": "Blackwell",
}


def _text(value: Any) -> str | None:
    """A fact as llama-swap keeps it: trimmed, and None for empty, "n/a" or "unknown"."""
    if value is None:
        return None
    text = str(value).strip()
    if not text or text.lower() in ("n/a", "unknown"):
        return None
    return text


def architecture(machine: str | None = None) -> dict[str, Any]:
    raw = (machine if machine is not None else platform.machine()).strip()
    lowered = raw.lower()
    if lowered in ("x86_64", "amd64"):
        name = "x86_64"
    elif lowered in ("aarch64", "arm64"):
        name = "arm64"
    elif lowered.startswith("armv7"):
        name = "armv7"
    elif lowered in ("ppc64le", "riscv64", "s390x"):
        name = lowered
    else:
        name = "other"
    return {"name": name, "raw_name": raw if raw and raw != name else None}


def os_release(path: str = "/etc/os-release") -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep:
                    out[key] = value.strip().strip('"').strip("'")
    except OSError:
        pass
    return out


def operating_system() -> dict[str, Any]:
    families = {"linux": "linux", "darwin": "macos", "win32": "windows"}
    family = families.get(sys.platform, "freebsd" if sys.platform.startswith("freebsd") else "other")
    name = version = None
    if family == "linux":
        release = os_release()
        name, version = _text(release.get("ID")), _text(release.get("VERSION_ID"))
    elif family == "macos":
        name, version = "macOS", _text(platform.mac_ver()[0])
    elif family == "windows":
        name, version = "Windows", _text(platform.version())
    out: dict[str, Any] = {"family": family, "name": name, "version": version, "kernel": _text(platform.release())}
    if family == "other":
        out["raw_family"] = sys.platform
    return out


def environment(kernel: str | None = None, root: str = "/") -> dict[str, Any]:
    """Native, container, virtual machine, WSL or unknown (Linux; elsewhere unknown)."""
    if not sys.platform.startswith("linux"):
        return {"kind": "unknown", "name": None, "version": None}
    kernel = (kernel if kernel is not None else platform.release()).lower()
    if "microsoft" in kernel or "wsl" in kernel:
        return {"kind": "wsl", "name": "WSL", "version": None}
    if os.path.exists(os.path.join(root, ".dockerenv")):
        return {"kind": "container", "name": "Docker", "version": None}
    if os.path.exists(os.path.join(root, "run/.containerenv")):
        return {"kind": "container", "name": "Podman", "version": None}
    tool = shutil.which("systemd-detect-virt")
    if tool is not None:
        try:
            done = subprocess.run([tool], capture_output=True, text=True, timeout=5, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return {"kind": "unknown", "name": None, "version": None}
        found = done.stdout.strip()
        if done.returncode == 0 and found and found != "none":
            kind = "container" if found.lower() in _CONTAINERS else "virtual_machine"
            return {"kind": kind, "name": _DISPLAY.get(found.lower(), found), "version": None}
        if done.returncode == 1:
            return {"kind": "native", "name": None, "version": None}
    return {"kind": "unknown", "name": None, "version": None}


def cpu(cpuinfo: str = "/proc/cpuinfo") -> dict[str, Any]:
    vendor = model = None
    sockets: set[str] = set()
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not sep:
                    continue
                key = key.strip()
                if key == "vendor_id" and vendor is None:
                    vendor = _text(value)
                elif key == "model name" and model is None:
                    model = _text(value)
                elif key == "physical id" and value.strip():
                    sockets.add(value.strip())
    except OSError:
        pass
    logical = psutil.cpu_count(logical=True) or None
    physical = psutil.cpu_count(logical=False) or None
    if physical is not None and logical is not None and physical > logical:
        physical = None
    return {
        "vendor": vendor,
        "model": model,
        "socket_count": len(sockets) or None,
        "physical_core_count": physical,
        "logical_thread_count": logical,
    }


def zoneinfo_capacity(path: str = "/proc/zoneinfo", page_size: int | None = None) -> int:
    """Physical memory from the present pages of every zone but ``Device`` (0 if unknown)."""
    page = page_size if page_size is not None else os.sysconf("SC_PAGE_SIZE")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return 0
    pages = 0
    include = False
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] == "Node" and fields[2] == "zone":
            include = fields[3] != "Device"
            continue
        if include and len(fields) == 2 and fields[0] == "present" and fields[1].isdigit():
            pages += int(fields[1])
    return pages * page


def memory_capacity(
    total: int | None = None,
    zoneinfo: str = "/proc/zoneinfo",
    limits: Iterable[str] = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"),
) -> int:
    """Usable memory as llama-swap reports it: the larger of MemTotal and the zones' pages, then a cgroup limit."""
    capacity = total if total is not None else psutil.virtual_memory().total
    if sys.platform.startswith("linux"):
        capacity = max(capacity, zoneinfo_capacity(zoneinfo))
        for path in limits:
            try:
                with open(path, encoding="utf-8") as f:
                    value = f.read().strip()
            except OSError:
                continue
            if value.isdigit() and 0 < int(value) < capacity:
                capacity = int(value)
    return capacity


def nvidia_accelerators(devices: Iterable[Mapping[str, Any]], driver: str | None) -> list[dict[str, Any]]:
    """Accelerator records from NVML's per-GPU facts (``Nvml.describe``), sorted by PCI address, then indexed."""
    found = []
    for dev in devices:
        total = dev.get("total_bytes")
        limit = dev.get("power_limit_w")
        version = _text(driver)
        accel = {
            "index": 0,
            "kind": "gpu",
            "vendor": "NVIDIA",
            "model": _text(dev.get("name")),
            "architecture": _NVIDIA_ARCH.get(str(dev.get("compute_capability") or "")),
            "memory": {"kind": "dedicated", "capacity_bytes": int(total) if total else None},
            "driver": {"name": "NVIDIA", "version": version} if version else None,
            "power_limit_watts": float(limit) if limit and limit > 0 else None,
        }
        identity = (dev.get("pci_bus_id") or dev.get("uuid") or "").lower()
        found.append((identity, accel["model"] or "", accel))
    found.sort(key=lambda item: (item[0], item[1]))
    out = []
    for index, (_, _, accel) in enumerate(found):
        accel["index"] = index
        out.append(accel)
    return out


def snapshot(
    detector_version: str, gpus: Iterable[Mapping[str, Any]] = (), driver: str | None = None
) -> dict[str, Any]:
    """The whole ``HardwareSnapshot``; raises OSError when the system memory cannot be read (llama-swap's 503)."""
    arch = architecture()
    system = operating_system()
    capacity = memory_capacity()
    if capacity <= 0:
        raise OSError("the system memory reads as zero")
    return {
        "schema_version": SCHEMA_VERSION,
        "captured_at": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "capture": {
            "scope": "inference_host",
            "method": "detected",
            "detector": {"name": "swapd", "version": detector_version},
        },
        "architecture": arch,
        "operating_system": system,
        "environment": environment(system.get("kernel")),
        "cpu": cpu(),
        "memory": {"capacity_bytes": capacity},
        "accelerators": nvidia_accelerators(gpus, driver),
    }
