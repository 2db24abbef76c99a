"""The decisions, pure: who holds which GPU memory, and whether a stopped model's came back.

No NVML calls and no processes here: snapshots in, verdicts out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from swapd.gpu.nvml import GpuProcess, Snapshot

# A stopped model's memory counts as returned when the device's used memory
# fell by at least this share of what the model's processes held (after
# correcting for other processes' changes; see judge()).
RECOVERY_FRACTION = 0.90


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
        loose: list[GpuProcess] = []
        for proc in dev.processes or ():
            owner_id = owner.get(proc.pid)
            if owner_id is None:
                loose.append(proc)
            else:
                by_model[owner_id].setdefault(dev.index, {})[proc.pid] = proc.used_mib
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


def make_baseline(
    snapshot: Snapshot, tree: Iterable[int], mode: str, estimate: Mapping[int, float] | None = None
) -> Baseline:
    """The baseline for a stop: by pid in ``pids`` mode, from ``estimate`` otherwise
    (and for a device whose processes NVML cannot list)."""
    used = {dev.index: dev.used_mib for dev in snapshot.devices}
    if mode == "memory_only":
        held: dict[int, float] = {d: max(0.0, mib) for d, mib in (estimate or {}).items() if d in used}
        return Baseline(mode, used, held, None)
    tree = set(tree)
    held = {}
    others: dict[int, float | None] = {}
    pids: list[int] = []
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
    for device in snapshot.devices:
        for proc in device.processes or ():
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
