"""swapd.gpu in-process: the pure decisions, the NVML reader against the stub
library (through the real nvidia-ml-py), and the verifier's own kill path."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from nvml_stub import preload, stub_dir_for

from swapd import gpu
from swapd.backend import State, StopReport
from swapd.config import load_config_text
from swapd.gpu import (
    Baseline,
    Device,
    GpuProcess,
    Nvml,
    Snapshot,
    VramVerifier,
    attribute,
    find_orphans,
    judge,
    make_baseline,
    memory_only_estimate,
    merge_processes,
    pids_visible,
    throttle_names,
)
from swapd.scheduler import SchedulerError


def dev(used, procs=(), index=0, listed=True):
    return Device(
        index=index,
        name="x",
        uuid="u",
        total_mib=24576.0,
        used_mib=float(used),
        free_mib=24576.0 - used,
        processes=tuple(GpuProcess(p, m, "compute") for p, m in procs) if listed else None,
    )


def snap(*devices):
    return Snapshot("550", tuple(devices))


# -- pure parts ----------------------------------------------------------------------


def test_throttle_names():
    assert throttle_names(None) == [] and throttle_names(0) == []
    assert throttle_names(0x81) == ["gpu_idle", "hw_power_brake_slowdown"]
    assert throttle_names(0x10004) == ["sw_power_cap", "other(0x10000)"]


def test_merge_processes_keeps_one_entry_per_pid():
    item = lambda pid, mib: SimpleNamespace(pid=pid, usedGpuMemory=None if mib is None else mib * gpu.MIB)
    merged = merge_processes([item(10, 100)], [item(10, 100), item(11, None)])
    assert merged == (GpuProcess(10, 100.0, "compute+graphics"), GpuProcess(11, None, "graphics"))
    assert merge_processes(None, None) is None
    assert merge_processes([], None) == ()


def test_attribute_splits_models_and_unattributed():
    s = snap(dev(5000, [(1, 1000), (2, 500), (9, 300)]), dev(2000, [(3, 700)], index=1))
    att = attribute(s, {"a": [1, 2, 3], "b": [4]})
    assert att.model_mib("a") == 2200 and att.model_pids("a") == [1, 2, 3]
    assert att.model_mib("b") == 0 and att.model_pids("b") == []
    assert att.by_model["a"] == {0: {1: 1000.0, 2: 500.0}, 1: {3: 700.0}}
    assert [p.pid for p in att.unattributed[0]] == [9] and att.unattributed[1] == ()


def test_baseline_by_pid():
    b = make_baseline(snap(dev(3000, [(1, 1000), (9, 500)])), {1, 2}, "pids")
    assert b == Baseline("pids", {0: 3000.0}, {0: 1000.0}, {0: 500.0}, (1,))


def test_baseline_estimates_a_device_whose_processes_cannot_be_listed():
    s = snap(dev(3000, [(1, 1000)]), dev(5000, index=1, listed=False))
    b = make_baseline(s, {1}, "pids", estimate={1: 2000.0})
    assert b.held == {0: 1000.0, 1: 2000.0} and b.others == {0: 0.0, 1: None}
    after = snap(dev(2000, []), dev(3100, index=1, listed=False))
    assert judge(b, after, {1}).freed  # 1900 of 2000 back on GPU 1
    assert not judge(b, snap(dev(2000, []), dev(3300, index=1, listed=False)), {1}).freed


BASE = Baseline("pids", {0: 3000.0}, {0: 1000.0}, {0: 500.0}, (1,))


def test_judge_freed_when_pids_gone_and_memory_back():
    v = judge(BASE, snap(dev(2000, [(9, 500)])), {1})
    assert v.freed and v.recovered_mib == 1000 and v.remaining_mib == 0 and v.lingering == {}


def test_judge_not_freed_while_a_pid_of_the_tree_is_listed():
    v = judge(BASE, snap(dev(2000, [(9, 500), (1, 0)])), {1})
    assert not v.freed and v.lingering == {1: 0.0}


def test_judge_tolerance_is_ninety_percent_of_what_the_model_held():
    assert judge(BASE, snap(dev(2100, [(9, 500)])), {1}).freed  # 900 of 1000 back
    v = judge(BASE, snap(dev(2101, [(9, 500)])), {1})
    assert not v.freed and v.remaining_mib == pytest.approx(101)


def test_judge_corrects_for_other_processes():
    # Another user allocated 600 MiB during the stop: the model's memory did come back.
    assert judge(BASE, snap(dev(2600, [(9, 1100)])), {1}).freed
    # Another user freed its 500 MiB while the model's memory leaked: no fake recovery.
    v = judge(BASE, snap(dev(2500, [])), {1})
    assert not v.freed and v.remaining_mib == 1000
    # Without per-process numbers (memory_only) there is nothing to correct with.
    mem_only = Baseline("memory_only", {0: 3000.0}, {0: 1000.0}, None)
    assert not judge(mem_only, snap(dev(2600, [(99, 1100)]))).freed
    assert judge(mem_only, snap(dev(2050))).freed


def test_judge_a_vanished_device_is_not_freed():
    v = judge(BASE, snap(dev(0, index=1)), {1})
    assert not v.freed and v.remaining_mib == 1000


def test_memory_only_estimate_runs_to_the_next_start():
    starts = {"a": (1.0, {0: 500.0}), "b": (2.0, {0: 1500.0})}
    assert memory_only_estimate("a", starts, {0: 2300.0}) == {0: 1000.0}
    assert memory_only_estimate("b", starts, {0: 2300.0}) == {0: 800.0}
    assert memory_only_estimate("c", starts, {0: 2300.0}) == {}
    assert memory_only_estimate("b", starts, {0: 1000.0}) == {0: 0.0}


def test_pids_visible(tmp_path):
    (tmp_path / "42").mkdir()
    assert pids_visible([], str(tmp_path)) is None
    assert pids_visible([7, 42], str(tmp_path)) is True
    assert pids_visible([1000000042], str(tmp_path)) is False


def test_find_orphans_only_takes_what_no_other_model_could_own():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ctime = psutil.Process(child.pid).create_time()
        common = dict(other_pids=set(), managed=set())
        assert find_orphans([child.pid], started_at=ctime - 5, other_started=[], **common) == {child.pid: ctime}
        # created before the stopped model started: not its
        assert find_orphans([child.pid], started_at=ctime + 5, other_started=[], **common) == {}
        # another running model started before it: ambiguous, left alone
        assert find_orphans([child.pid], started_at=ctime - 5, other_started=[ctime - 3], **common) == {}
        # a backend root, or a member of another model's tree
        assert find_orphans([child.pid], started_at=ctime - 5, other_started=[], other_pids=set(), managed={child.pid}) == {}
        assert find_orphans([child.pid], started_at=ctime - 5, other_started=[], other_pids={child.pid}, managed=set()) == {}
        # not a descendant of this process
        assert find_orphans([1], started_at=0, other_started=[], **common) == {}
    finally:
        child.kill()
        child.wait()


# -- NVML through nvidia-ml-py and the stub -------------------------------------------------


@pytest.fixture(scope="module")
def stub_loaded(request, tmp_path_factory):
    lib = stub_dir_for(request, tmp_path_factory)
    return preload(lib)


@pytest.fixture
def state(stub_loaded, tmp_path, monkeypatch) -> Path:
    d = tmp_path / "nvml"
    d.mkdir()
    monkeypatch.setenv("SWAPD_STUB_NVML_STATE", str(d))
    return d


def _calls(state: Path) -> list[str]:
    return (state / "calls").read_text().splitlines()


def test_reader_uses_the_versioned_calls(state):
    (state / str(os.getpid())).write_text("1000")
    (state / f"g{os.getpid()}").write_text("1000")  # also a graphics client: listed once
    (state / "throttle").write_text("0x80")
    (state / "calls").write_text("")
    nv = Nvml.open_sync()
    try:
        s = nv.read_sync(full=True)
    finally:
        nv.close_sync()
    (d,) = s.devices
    assert s.driver == "550.54.15" and d.name == "Stub GPU 0"
    assert (d.total_mib, d.used_mib, d.reserved_mib, d.free_mib) == (24576, 1400, 256, 24576 - 1400 - 256)
    assert d.processes == (GpuProcess(os.getpid(), 1000.0, "compute+graphics"),)
    assert (d.persistence, d.power_w, d.power_limit_w, d.throttle) == (True, 30.0, 300.0, 0x80)
    calls = _calls(state)
    for name in (
        "nvmlDeviceGetMemoryInfo_v2",
        "nvmlDeviceGetComputeRunningProcesses_v3",
        "nvmlDeviceGetGraphicsRunningProcesses_v3",
        "nvmlDeviceGetCurrentClocksEventReasons",
    ):
        assert name in calls
    for name in ("nvmlDeviceGetMemoryInfo", "nvmlDeviceGetComputeRunningProcesses_v2", "nvmlDeviceGetCurrentClocksThrottleReasons"):
        assert name not in calls
    assert calls.count("nvmlInitWithFlags") == 1 and calls[-1] == "nvmlShutdown"


def test_reader_falls_back_on_old_drivers(state):
    (state / str(os.getpid())).write_text("1000")
    (state / "legacy").write_text("")
    (state / "calls").write_text("")
    nv = Nvml.open_sync()
    try:
        first, second = nv.read_sync(full=True), nv.read_sync(full=True)
    finally:
        nv.close_sync()
    for s in (first, second):
        (d,) = s.devices
        assert d.reserved_mib is None and d.used_mib == 1400 + 256  # v1 counts the reservation as used
        assert d.processes == (GpuProcess(os.getpid(), 1000.0, "compute"),)
        assert d.throttle == 0x1
    calls = _calls(state)
    # Each versioned call was tried once, then the fallback was remembered.
    assert calls.count("nvmlDeviceGetMemoryInfo_v2") == 1 and calls.count("nvmlDeviceGetMemoryInfo") == 2
    assert calls.count("nvmlDeviceGetComputeRunningProcesses_v3") == 1
    assert calls.count("nvmlDeviceGetComputeRunningProcesses_v2") == 4  # nvidia-ml-py: size, then fill
    assert calls.count("nvmlDeviceGetCurrentClocksThrottleReasons") == 2


def test_reader_reports_several_devices_and_a_failed_init(state):
    (state / "devices").write_text("2")
    (state / f"{os.getpid()}@1").write_text("64")
    nv = Nvml.open_sync()
    try:
        s = nv.read_sync()
    finally:
        nv.close_sync()
    assert [d.index for d in s.devices] == [0, 1]
    assert s.devices[0].processes == () and s.devices[1].process_pids() == {os.getpid()}
    (state / "fail_init").write_text("")
    with pytest.raises(gpu.NvmlUnavailable, match="driver is not loaded"):
        Nvml.open_sync()


# -- the verifier in-process --------------------------------------------------------------


class FakeBackend:
    """What the verifier reads from a Backend."""

    def __init__(self, model_id: str, proc: subprocess.Popen) -> None:
        self.id = model_id
        self.pid = proc.pid
        self.state = State.READY
        self.started_at = psutil.Process(proc.pid).create_time() - 1
        self.model = load_config_text(f"models:\n  {model_id}:\n    cmd: holder --port ${{PORT}}\n").models[model_id]

    def tracked_pids(self) -> list[int]:
        return [self.pid]


def _holder(state: Path, mib: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (state / str(proc.pid)).write_text(str(mib))
    return proc


def _verifier(backends: dict, **config) -> VramVerifier:
    cfg = SimpleNamespace(vram_check=config.get("mode", "warn"), vram_check_timeout=config.get("timeout", 3.0), models={})
    return VramVerifier(SimpleNamespace(config=cfg, backends=backends))


def test_verifier_kills_a_process_of_the_tree_that_the_stop_missed(state):
    proc = _holder(state, 600)
    backend = FakeBackend("m", proc)

    async def missed_stop():  # a stop that left the process running
        backend.state = State.STOPPED
        return StopReport("m", "unload", proc.pid, [proc.pid])

    async def main():
        v = _verifier({"m": backend})
        await v.open()
        try:
            t0 = time.monotonic()
            await v.stop_guard(backend, "unload", missed_stop)
            return v, time.monotonic() - t0
        finally:
            await v.close()

    try:
        v, seconds = asyncio.run(main())
        # Killed and reaped by the verifier (it reaps its own children, as swapd is their subreaper).
        assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    entry = v.history[-1]
    assert (entry["outcome"], entry["killed"], entry["held_mib"], entry["pids"]) == ("freed", [proc.pid], 600.0, [proc.pid])
    assert v.counters["freed"] == 1 and seconds < 2


def test_verifier_strict_gate_refuses_until_the_memory_returns(state):
    proc = _holder(state, 500)
    backend = FakeBackend("m", proc)
    other = SimpleNamespace(id="n", pid=None, state=State.STOPPED, started_at=None, tracked_pids=lambda: [])

    async def stop():
        proc.kill()
        proc.wait()
        backend.state = State.STOPPED
        return StopReport("m", "swap", proc.pid, [proc.pid])

    async def main():
        v = _verifier({"m": backend, "n": other}, mode="strict", timeout=0.5)
        await v.open()
        try:
            (state / "leak_dead").write_text("")
            await v.stop_guard(backend, "swap", stop)
            with pytest.raises(SchedulerError) as info:
                await v.start_gate(other)
            (state / "leak_dead").unlink()
            await v.start_gate(other)  # the memory is back: allowed
            return v, info.value
        finally:
            await v.close()

    v, err = asyncio.run(main())
    assert err.status == 503 and err.code == "vram_not_freed" and "'m' still holds about 500 MiB" in err.message
    assert v.counters["not_freed"] == 1 and v.history[-1]["remaining_mib"] == 500.0
    assert v._unfreed == {}


def test_verifier_off_does_nothing(state):
    calls = state / "calls"
    calls.write_text("")
    proc = _holder(state, 100)
    backend = FakeBackend("m", proc)

    async def stop():
        proc.kill()
        proc.wait()
        return StopReport("m", "unload", proc.pid, [proc.pid])

    async def main():
        v = _verifier({"m": backend}, mode="off")
        await v.open()
        calls.write_text("")
        await v.start_gate(backend)
        await v.stop_guard(backend, "unload", stop)
        await v.close()
        return v

    v = asyncio.run(main())
    assert list(v.history) == [] and sum(v.counters.values()) == 0
    assert calls.read_text().splitlines() == ["nvmlShutdown"]
