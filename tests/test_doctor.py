"""``swapd doctor`` as a real command, reading the stub libnvidia-ml.so.1."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import PY, ROOT, free_port, model
from nvml_stub import stub_dir_for, stub_env


@pytest.fixture(scope="session")
def nvml_lib(request, tmp_path_factory) -> Path:
    return stub_dir_for(request, tmp_path_factory)


@pytest.fixture
def gpu_state(tmp_path) -> Path:
    state = tmp_path / "nvml-state"
    state.mkdir()
    return state


def doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full["PYTHONPATH"] = str(ROOT) + os.pathsep + full.get("PYTHONPATH", "")
    full.update(env or {})
    return subprocess.run([PY, "-m", "swapd", "doctor", *args], capture_output=True, text=True, env=full, timeout=60)


def test_healthy_gpu_needs_no_attention(nvml_lib, gpu_state):
    r = doctor(env=stub_env(nvml_lib, gpu_state))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "NVIDIA driver 550.54.15, 1 GPU(s)" in out
    assert "GPU 0: Stub GPU 0" in out
    assert "persistence:  on" in out
    assert "power:        30 W of 300 W limit (10%)" in out
    assert "throttle:     gpu_idle" in out
    assert "processes:    none" in out
    assert out.rstrip().endswith("Nothing needs attention.")


def test_persistence_off_is_flagged_with_the_fix(nvml_lib, gpu_state):
    (gpu_state / "persistence").write_text("0")
    r = doctor(env=stub_env(nvml_lib, gpu_state))
    assert r.returncode == 1
    assert "persistence:  off" in r.stdout
    assert "! persistence mode is off: an idle GPU can stay in a high power state (50-80 W)" in r.stdout
    assert "nvidia-persistenced" in r.stdout
    assert "1 thing(s) need attention" in r.stdout


def test_power_brake_advises_a_lower_power_limit(nvml_lib, gpu_state):
    (gpu_state / "throttle").write_text("0x80")
    (gpu_state / "power").write_text("280 350")
    r = doctor(env=stub_env(nvml_lib, gpu_state))
    assert r.returncode == 1
    assert "throttle:     hw_power_brake_slowdown" in r.stdout
    assert "power:        280 W of 350 W limit (80%)" in r.stdout
    assert "hardware power brake" in r.stdout and "power limit slightly below TDP" in r.stdout
    assert "-pl 315" in r.stdout


@pytest.mark.parametrize("mask, phrase", [("0x40", "hardware thermal slowdown"), ("0x8", "hardware slowdown")])
def test_other_hardware_throttling_is_flagged(nvml_lib, gpu_state, mask, phrase):
    (gpu_state / "throttle").write_text(mask)
    r = doctor(env=stub_env(nvml_lib, gpu_state))
    assert r.returncode == 1 and phrase in r.stdout


def test_without_url_every_process_is_listed_but_not_judged(nvml_lib, gpu_state):
    (gpu_state / str(os.getpid())).write_text("300")
    r = doctor(env=stub_env(nvml_lib, gpu_state))
    assert r.returncode == 0, r.stdout
    assert f"- pid {os.getpid()} (" in r.stdout and "holds 300 MiB" in r.stdout
    assert "pass --url" in r.stdout


def test_with_url_memory_held_by_others_is_flagged(swapd, nvml_lib, gpu_state):
    env = stub_env(nvml_lib, gpu_state)
    s = swapd({"a": model("--vram-mib", "1000")}, env=env)
    assert s.chat("a").status == 200
    backend_pid = s.running()["a"]["pid"]
    (gpu_state / str(os.getpid())).write_text("300")  # this test process: not swapd's
    r = doctor("--url", s.base, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"- pid {backend_pid} (python" in r.stdout and "holds 1000 MiB: swapd's, model a" in r.stdout
    assert f"! pid {os.getpid()} (" in r.stdout and "holds 300 MiB and is not one of swapd's processes" in r.stdout
    assert "1 thing(s) need attention" in r.stdout

    (gpu_state / str(os.getpid())).unlink()
    r = doctor("--url", s.base, "--json", env=env)
    assert r.returncode == 0, r.stdout
    report = json.loads(r.stdout)
    assert report["attention"] == 0 and report["driver_version"] == "550.54.15"
    assert report["devices"][0]["processes"] == [{"pid": backend_pid, "used_mib": 1000.0, "kind": "compute"}]


def test_unreachable_swapd_needs_attention(nvml_lib, gpu_state):
    r = doctor("--url", f"http://127.0.0.1:{free_port()}", env=stub_env(nvml_lib, gpu_state))
    assert r.returncode == 1
    assert "! could not ask swapd at http://127.0.0.1:" in r.stdout


def test_nvml_unavailable_exits_2_with_a_clear_message(nvml_lib, gpu_state):
    (gpu_state / "fail_init").write_text("")
    r = doctor(env=stub_env(nvml_lib, gpu_state))
    assert r.returncode == 2 and r.stdout == ""
    assert "swapd doctor: NVML is not available: the NVIDIA driver is not loaded" in r.stderr
    if not ctypes.util.find_library("nvidia-ml"):
        r = doctor(env={"LD_LIBRARY_PATH": "", "SWAPD_STUB_NVML_STATE": str(gpu_state)})
        assert r.returncode == 2
        assert "libnvidia-ml.so.1 was not found" in r.stderr


def test_nvml_unavailable_with_json_still_prints_json(nvml_lib, gpu_state):
    (gpu_state / "fail_init").write_text("")
    r = doctor("--json", env=stub_env(nvml_lib, gpu_state))
    assert r.returncode == 2, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["nvml_available"] is False and report["devices"] == [] and report["attention"] == 1
    assert "NVML is not available: the NVIDIA driver is not loaded" in report["error"]
    assert report["findings"] == [{"gpu": None, "message": report["error"], "attention": True}]
    if not ctypes.util.find_library("nvidia-ml"):
        r = doctor("--json", env={"LD_LIBRARY_PATH": "", "SWAPD_STUB_NVML_STATE": str(gpu_state)})
        assert r.returncode == 2
        assert "libnvidia-ml.so.1 was not found" in json.loads(r.stdout)["error"]


def test_json_report_says_nvml_is_available(nvml_lib, gpu_state):
    r = doctor("--json", env=stub_env(nvml_lib, gpu_state))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["nvml_available"] is True and report["error"] is None
    assert report["driver_version"] == "550.54.15" and len(report["devices"]) == 1


def test_pids_from_another_namespace_are_listed_without_names(nvml_lib, gpu_state):
    (gpu_state / str(os.getpid())).write_text("512")
    (gpu_state / "hide_pids").write_text("")
    r = doctor(env=stub_env(nvml_lib, gpu_state))
    assert r.returncode == 0, r.stdout
    assert "not visible here (another PID namespace)" in r.stdout
    assert f"- pid {os.getpid() + 1000000000} holds 512 MiB" in r.stdout
