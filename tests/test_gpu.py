"""Verified VRAM release, end to end: swapd and its backends as real processes,
with the real nvidia-ml-py reading the stub libnvidia-ml.so.1 (tests/nvml_stub)."""

from __future__ import annotations

import ctypes.util
import os
import stat
import time
from pathlib import Path

import psutil
import pytest

from helpers import PY, model, wait_until
from nvml_stub import stub_dir_for, stub_env

BASE_MIB = 400  # the stub's default used memory with no process (memory info v2)


@pytest.fixture(scope="session")
def nvml_lib(request, tmp_path_factory) -> Path:
    return stub_dir_for(request, tmp_path_factory)


@pytest.fixture
def gpu_state(tmp_path) -> Path:
    state = tmp_path / "nvml-state"
    state.mkdir()
    return state


@pytest.fixture
def gpu_env(nvml_lib, gpu_state) -> dict[str, str]:
    return stub_env(nvml_lib, gpu_state)


def _events(s, name, **match):
    return [e for e in s.log_events() if e.get("event") == name and all(e.get(k) == v for k, v in match.items())]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _gpus(s) -> dict:
    r = s.get("/api/gpus")
    assert r.status == 200, r.body
    return r.json()


def _unload(s, model_id: str) -> None:
    r = s.post(f"/api/models/unload/{model_id}", {})
    assert r.status == 200, r.body


# -- normal stops ------------------------------------------------------------------


def test_stop_frees_memory_event_counter_history_and_attribution(swapd, gpu_env, gpu_state):
    s = swapd({"a": model("--vram-mib", "1500")}, env=gpu_env)
    # A process that is not swapd's also holds memory: it must show up unattributed.
    (gpu_state / str(os.getpid())).write_text("300")
    assert s.chat("a").status == 200
    pid = s.running()["a"]["pid"]

    running = s.running()["a"]
    assert running["vram_mib"] == 1500.0 and running["pids"] == [pid]
    meta = {m["id"]: m for m in s.get("/v1/models").json()["data"]}["a"]["meta"]["llamaswap"]
    assert meta["vram_mib"] == 1500.0 and meta["pids"] == [pid]

    gpus = _gpus(s)
    assert gpus["available"] is True and gpus["pid_mode"] == "pids"
    dev = gpus["devices"][0]
    assert dev["used_mib"] == BASE_MIB + 1500 + 300
    assert dev["free_mib"] == dev["total_mib"] - dev["used_mib"] - dev["reserved_mib"]
    assert dev["models"] == [
        {"model": "a", "vram_mib": 1500.0, "pids": [pid], "processes": [{"pid": pid, "vram_mib": 1500.0}]}
    ]
    assert [(u["pid"], u["vram_mib"]) for u in dev["unattributed"]] == [(os.getpid(), 300.0)]
    assert pid in gpus["swapd_pids"] and os.getpid() not in gpus["swapd_pids"]

    _unload(s, "a")
    assert _gone(pid)
    gpus = _gpus(s)
    assert gpus["counters"] == {"freed": 1, "not_freed": 0, "no_vram": 0, "unavailable": 0}
    stop = gpus["stops"][-1]
    assert (stop["model"], stop["reason"], stop["outcome"], stop["mode"]) == ("a", "unload", "freed", "pids")
    assert stop["held_mib"] == 1500.0 and stop["recovered_mib"] == 1500.0 and stop["pids"] == [pid]
    assert stop["lingering"] == [] and stop["killed"] == []
    assert gpus["devices"][0]["used_mib"] == BASE_MIB + 300
    freed = _events(s, "vram.freed", model="a")
    assert len(freed) == 1 and freed[0]["mib"] == 1500.0 and freed[0]["level"] == "info"
    assert 0 <= freed[0]["seconds"] < 2
    assert s.running() == {}


def test_swap_starts_the_next_model_only_after_memory_is_verified(swapd, gpu_env):
    s = swapd({"a": model("--vram-mib", "2000"), "b": model("--vram-mib", "1000")}, env=gpu_env)
    assert s.chat("a").status == 200
    assert s.chat("b").status == 200
    names = [
        (e["event"], e.get("model"))
        for e in s.log_events()
        if e.get("event") in ("vram.freed", "backend.start", "backend.stop")
    ]
    assert names == [
        ("backend.start", "a"),
        ("backend.stop", "a"),
        ("vram.freed", "a"),
        ("backend.start", "b"),
    ], names
    assert _events(s, "vram.freed", model="a")[0]["reason"] == "swap"


def test_ttl_and_shutdown_stops_are_verified_too(swapd, gpu_env):
    s = swapd({"a": model("--vram-mib", "500", ttl=1), "b": model("--vram-mib", "600")}, env=gpu_env)
    assert s.chat("a").status == 200
    wait_until(lambda: _events(s, "vram.freed", model="a"), timeout=8, message="the TTL stop to be verified")
    assert _events(s, "vram.freed", model="a")[0]["reason"] == "ttl"
    assert s.chat("b").status == 200
    s.terminate()
    shutdown = _events(s, "vram.freed", model="b")
    assert len(shutdown) == 1 and shutdown[0]["reason"] == "shutdown" and shutdown[0]["mib"] == 600.0


def test_model_without_vram_is_counted_apart(swapd, gpu_env):
    s = swapd({"cpu": model()}, env=gpu_env)  # registers 0 MiB
    assert s.chat("cpu").status == 200
    _unload(s, "cpu")
    gpus = _gpus(s)
    assert gpus["counters"]["no_vram"] == 1 and gpus["counters"]["freed"] == 0
    assert gpus["stops"][-1]["outcome"] == "no_vram"
    assert not _events(s, "vram.freed") and not _events(s, "vram.not_freed")


def test_api_gpus_reports_temperature_and_utilisation(swapd, gpu_env, gpu_state):
    (gpu_state / "devices").write_text("2")
    (gpu_state / "sensors").write_text("63 77 29")
    s = swapd({"a": model("--vram-mib", "700")}, env=gpu_env)
    assert s.chat("a").status == 200
    devices = _gpus(s)["devices"]
    assert len(devices) == 2
    for dev in devices:
        assert (dev["temperature_c"], dev["util_percent"], dev["memory_util_percent"]) == (63.0, 77.0, 29.0), dev
    assert devices[0]["models"][0]["model"] == "a"
    # each /api/gpus is a fresh reading
    (gpu_state / "sensors").write_text("48 5 1")
    dev = _gpus(s)["devices"][0]
    assert (dev["temperature_c"], dev["util_percent"], dev["memory_util_percent"]) == (48.0, 5.0, 1.0)


# -- processes that outlive the stop ----------------------------------------------------


def test_setsid_child_holding_vram_is_part_of_the_stop(swapd, gpu_env):
    s = swapd({"a": model("--fork-child", "--fork-child-setsid", "--vram-mib", "400")}, env=gpu_env)
    assert s.chat("a").status == 200
    pids = s.running()["a"]["pids"]
    assert len(pids) == 2 and s.running()["a"]["vram_mib"] == 800.0
    _unload(s, "a")
    assert all(_gone(p) for p in pids)
    stop = _gpus(s)["stops"][-1]
    assert stop["outcome"] == "freed" and stop["held_mib"] == 800.0 and sorted(stop["pids"]) == sorted(pids)
    assert _events(s, "vram.freed", model="a")[0]["mib"] == 800.0


WRAPPER = """\
#!/bin/sh
# A wrapper script that, told to stop, leaves a detached helper holding VRAM
# behind: started after swapd's last look at the tree, in its own session, with
# its own stdio (as a daemon would), and orphaned when this script exits.
spawn_helper() {
  trap '' TERM
  "$PY" -c 'import os, time
os.setsid()
path = os.path.join(os.environ["SWAPD_STUB_NVML_STATE"], str(os.getpid()))
with open(path + ".tmp", "w") as f:
    f.write("700")
os.replace(path + ".tmp", path)
time.sleep(600)' </dev/null >/dev/null 2>&1 &
  helper=$!
  while [ ! -e "$SWAPD_STUB_NVML_STATE/$helper" ]; do sleep 0.02; done
  echo "helper pid $helper"
  exit 0
}
trap spawn_helper TERM
"$PY" -m swapd.fake_backend --port "$1" --quiet --vram-mib 500 &
wait
"""


def test_detached_grandchild_still_holding_vram_is_found_and_killed(swapd, gpu_env, gpu_state, tmp_path):
    script = tmp_path / "wrapper.sh"
    script.write_text(WRAPPER)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    s = swapd({"w": {"cmd": f"/bin/sh {script} ${{PORT}}", "env": [f"PY={PY}"]}}, env=gpu_env)
    assert s.chat("w").status == 200
    assert s.running()["w"]["vram_mib"] == 500.0
    _unload(s, "w")

    helpers = [int(f.name) for f in gpu_state.iterdir() if f.name.isdigit() and f.read_text() == "700"]
    assert len(helpers) == 1, "the wrapper must have left its helper behind"
    helper = helpers[0]
    assert _gone(helper), "the helper must have been killed"
    found = _events(s, "vram.orphan_found", model="w")
    killed = _events(s, "vram.sigkill", model="w")
    assert [e["pid"] for e in found] == [helper] and [e["pid"] for e in killed] == [helper]
    assert killed[0]["mib"] == 700.0
    stop = _gpus(s)["stops"][-1]
    assert stop["outcome"] == "freed" and stop["killed"] == [helper] and stop["held_mib"] == 500.0
    assert _events(s, "vram.freed", model="w")[0]["killed"] == [helper]


# -- memory that does not come back ------------------------------------------------------


def test_memory_that_never_returns_is_reported_and_strict_mode_refuses_the_next_start(swapd, gpu_env, gpu_state):
    s = swapd(
        {"a": model("--vram-mib", "800"), "b": model("--vram-mib", "300")},
        env=gpu_env,
        vramCheck="strict",
        vramCheckTimeout=1.5,
    )
    assert s.chat("a").status == 200
    (gpu_state / "leak_dead").write_text("")  # a's memory stays used after it exits
    t0 = time.monotonic()
    r = s.chat("b")
    assert time.monotonic() - t0 >= 1.5, "the swap must wait out the verification timeout"
    assert r.status == 503, r.body
    err = r.json()["error"]
    assert err["code"] == "vram_not_freed"
    assert "'a' still holds about 800 MiB" in err["message"] and "strict" in err["message"]
    assert s.running() == {}

    bad = _events(s, "vram.not_freed", model="a")
    assert len(bad) == 1 and bad[0]["level"] == "error"
    assert bad[0]["mib"] == 800.0 and bad[0]["pids"] == [] and bad[0]["strict"] is True
    gpus = _gpus(s)
    assert gpus["counters"]["not_freed"] == 1
    assert gpus["stops"][-1]["outcome"] == "not_freed" and gpus["stops"][-1]["remaining_mib"] == 800.0
    assert gpus["unfreed"] == [{"model": "a", "remaining_mib": 800.0, "pids": []}]
    # Still refused while the memory stays missing, for a as well as b.
    assert s.chat("a").json()["error"]["code"] == "vram_not_freed"

    (gpu_state / "leak_dead").unlink()  # the memory comes back
    assert s.chat("b").status == 200
    assert _events(s, "vram.freed_late", model="a")
    assert _gpus(s)["unfreed"] == []


def test_pid_that_cannot_be_killed_is_reported_and_warn_mode_continues(swapd, gpu_env, gpu_state):
    s = swapd({"a": model("--vram-mib", "600"), "b": model()}, env=gpu_env, vramCheckTimeout=1.0)
    assert s.chat("a").status == 200
    pid = s.running()["a"]["pid"]
    (gpu_state / "stuck").write_text("")  # NVML keeps listing a's pid after it died
    assert s.chat("b").status == 200, "warn mode logs and starts the next model anyway"
    bad = _events(s, "vram.not_freed", model="a")
    assert len(bad) == 1 and bad[0]["pids"] == [pid] and bad[0]["mib"] == 600.0 and bad[0]["strict"] is False
    assert f"pid {pid}: gone, yet NVML still lists it" in bad[0]["detail"]
    assert _events(s, "backend.start", model="b")
    stop = _gpus(s)["stops"][-1]
    assert stop["outcome"] == "not_freed" and stop["lingering"] == [pid] and stop["seconds"] >= 1.0
    (gpu_state / "stuck").unlink()


# -- no NVML, and NVML from another PID namespace ---------------------------------------------


def test_without_nvml_swapd_works_and_reports_unavailable(swapd, tmp_path):
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("a real NVML library is installed on this machine")
    s = swapd({"a": model("--vram-mib", "900")}, env={"SWAPD_STUB_NVML_STATE": str(tmp_path)})
    assert s.chat("a").status == 200
    assert s.running()["a"]["vram_mib"] is None
    gpus = _gpus(s)
    assert gpus["available"] is False and "libnvidia-ml.so.1" in gpus["reason"] and gpus["devices"] == []
    _unload(s, "a")
    gpus = _gpus(s)
    assert gpus["counters"] == {"freed": 0, "not_freed": 0, "no_vram": 0, "unavailable": 1}
    assert gpus["stops"][-1]["outcome"] == "unavailable" and "libnvidia-ml.so.1" in gpus["stops"][-1]["detail"]
    assert len(_events(s, "gpu.unavailable")) == 1
    assert not _events(s, "vram.freed") and not _events(s, "vram.not_freed")


def test_driver_not_loaded_is_unavailable_too(swapd, gpu_env, gpu_state):
    (gpu_state / "fail_init").write_text("")
    s = swapd({"a": model()}, env=gpu_env)
    gpus = _gpus(s)
    assert gpus["available"] is False and "driver is not loaded" in gpus["reason"]
    assert s.chat("a").status == 200
    info = _events(s, "gpu.unavailable")
    assert len(info) == 1 and info[0]["level"] == "info"


def test_pids_from_another_namespace_fall_back_to_memory_only(swapd, gpu_env, gpu_state):
    (gpu_state / "hide_pids").write_text("1000000000")
    s = swapd({"a": model("--vram-mib", "1200")}, env=gpu_env)
    for _ in range(2):
        assert s.chat("a").status == 200
        pid = s.running()["a"]["pid"]
        gpus = _gpus(s)
        assert gpus["pid_mode"] == "memory_only"
        dev = gpus["devices"][0]
        assert [u["pid"] for u in dev["unattributed"]] == [pid + 1000000000]
        assert dev["models"] == [{"model": "a", "vram_mib": 1200.0, "estimated": True, "pids": []}]
        assert s.running()["a"]["vram_mib"] is None  # no per-pid attribution in this mode
        _unload(s, "a")
        stop = _gpus(s)["stops"][-1]
        assert (stop["outcome"], stop["mode"], stop["held_mib"]) == ("freed", "memory_only", 1200.0)
    assert len(_events(s, "gpu.pid_namespace")) == 1, "the namespace is detected and logged once"
    assert len(_events(s, "vram.freed", mode="memory_only")) == 2


# -- hot paths ---------------------------------------------------------------------------


def test_status_endpoints_do_not_read_nvml_per_request(swapd, gpu_env, gpu_state):
    s = swapd({"a": model("--vram-mib", "100")}, env=gpu_env)
    assert s.chat("a").status == 200
    calls = gpu_state / "calls"
    calls.write_text("")
    t0 = time.monotonic()
    for _ in range(40):
        assert s.get("/v1/models").status == 200
        assert s.get("/running").json()["running"][0]["vram_mib"] == 100.0
    elapsed = time.monotonic() - t0
    reads = calls.read_text().splitlines().count("nvmlDeviceGetMemoryInfo_v2")
    assert 1 <= reads <= int(elapsed / 1.0) + 2, (reads, elapsed)
