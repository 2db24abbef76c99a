"""The vram router: pure decisions (plan), then real swapd processes on the stub NVML.

The stub GPU (tests/nvml_stub) reports 400 MiB used with no process and 256 MiB
driver-reserved, so with the default 512 MiB reserve a GPU of T MiB gives the
models a budget of T - 1168 MiB.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from helpers import model, wait_until, write_config
from nvml_stub import stub_dir_for, stub_env
from test_estimate import smollm2  # noqa: F401  (the fixture)
from swapd.config import load_config_text
from swapd.footprints import Footprint, FootprintBook, FootprintStore, command_key
from swapd.router import RunningModel
from swapd.vram_router import DeviceMemory, MemoryView, plan

STUB_OVERHEAD = 400 + 256  # used + reserved on an empty stub GPU


def _config(models: dict, **vram) -> object:
    doc = {
        "routing": {"router": {"use": "vram", "settings": {"vram": vram}}},
        "models": {m: {"cmd": "serve --port ${PORT}", **keys} for m, keys in models.items()},
    }
    return load_config_text(yaml.safe_dump(doc))


def _view(*totals: float, unmanaged: float = 0.0, usage=None) -> MemoryView:
    return MemoryView({i: DeviceMemory(i, t, unmanaged) for i, t in enumerate(totals)}, usage or {})


def _rm(model_id: str, last_used: float | None, in_flight: int = 0, state: str = "ready") -> RunningModel:
    return RunningModel(model_id, in_flight, last_used, state)


def _plan(cfg, target, running, view, book=None, **kw):
    book = book or FootprintBook()
    return plan(cfg.models[target], {r.id: r for r in running}, cfg, book.footprint, view, now=100.0, **kw)


# -- plan(), pure ------------------------------------------------------------------------


def test_models_that_fit_run_together_and_the_lru_idle_one_makes_room():
    cfg = _config({m: {"vram": "4GiB"} for m in "abcd"})
    view = _view(10_000 + 512)  # room for two 4 GiB models
    assert _plan(cfg, "b", [_rm("a", 10.0)], view).evict == ()
    d = _plan(cfg, "c", [_rm("a", 50.0), _rm("b", 20.0)], view)
    assert d.evict == ("b",) and d.refuse is None
    assert d.why["b"].reason == "vram" and d.why["b"].idle_seconds == 80.0 and d.why["b"].mib == 4096.0
    # an idle model goes before a busy one even if the busy one was used longer ago
    d = _plan(cfg, "c", [_rm("a", 5.0, in_flight=1), _rm("b", 20.0)], view)
    assert d.evict == ("b",)
    # already loaded: nothing to do
    assert _plan(cfg, "c", [_rm("a", 50.0), _rm("b", 20.0)], view, loaded=True).evict == ()


def test_busy_models_are_chosen_last_and_pinned_ones_never():
    cfg = _config({"a": {"vram": 6000}, "b": {"vram": 3000}, "c": {"vram": 6000}}, pinned=["b"])
    view = _view(10_000)  # budget 9488: a+b fit, c needs a gone
    d = _plan(cfg, "c", [_rm("a", 90.0, in_flight=2), _rm("b", 1.0)], view)
    assert d.evict == ("a",)  # busy: the scheduler waits for it; b is older but pinned


def test_never_fits_is_refused_with_the_numbers():
    cfg = _config({"big": {"vram": "30GiB"}, "p": {"vram": 2000}}, pinned=["p"])
    d = _plan(cfg, "big", [], _view(24_576, unmanaged=656))
    assert d.evict == () and d.refuse is not None
    assert "'big' needs 30720 MiB on GPU 0" in d.refuse and "24576 MiB total" in d.refuse
    assert "512 MiB reserve" in d.refuse and "656 MiB held by processes swapd does not manage" in d.refuse
    # pinned models count against the budget too
    cfg = _config({"m": {"vram": 21_000}, "p": {"vram": 4000}}, pinned=["p"])
    d = _plan(cfg, "m", [_rm("p", 1.0)], _view(24_576))
    assert d.refuse is not None and "4000 MiB held by pinned models" in d.refuse


def test_models_max_evicts_by_count_without_any_gpu():
    cfg = _config({m: {} for m in "abc"}, modelsMax=2)
    d = _plan(cfg, "c", [_rm("a", 30.0), _rm("b", 10.0)], None)
    assert d.evict == ("b",) and d.why["b"].reason == "count"
    assert _plan(cfg, "b", [_rm("a", 30.0)], None).evict == ()
    cfg = _config({m: {} for m in "abc"}, modelsMax=1, pinned=["a"])
    assert "pinned" in (_plan(cfg, "c", [_rm("a", 30.0)], None).refuse or "")


def test_an_unknown_footprint_clears_its_gpu_of_idle_models():
    cfg = _config({"a": {"vram": 1000}, "b": {"vram": 1000}, "p": {"vram": 1000}, "new": {}}, pinned=["p"])
    d = _plan(cfg, "new", [_rm("a", 3.0), _rm("b", 50.0), _rm("p", 1.0)], _view(24_576))
    assert d.evict == ("a", "b") and {w.reason for w in d.why.values()} == {"unknown_footprint"}
    # while it starts, unmeasured, it is charged its whole GPU: nothing starts beside it
    d = _plan(cfg, "a", [_rm("new", None, state="starting")], _view(24_576))
    assert d.evict == ("new",)


def test_two_gpus_are_budgeted_apart():
    cfg = _config(
        {
            "on0": {"vram": 7000, "env": ["CUDA_VISIBLE_DEVICES=0"]},
            "on1": {"vram": 7000, "env": ["CUDA_VISIBLE_DEVICES=1"]},
            "both": {"vram": {0: 2000, 1: 2000}},
            "new1": {"vram": 7000, "env": ["CUDA_VISIBLE_DEVICES=1"]},
        }
    )
    view = _view(10_000, 10_000)  # 9488 each
    assert _plan(cfg, "both", [_rm("on0", 1.0), _rm("on1", 2.0)], view).evict == ()
    # new1 needs GPU 1: on1 (or both) must go, never on0
    d = _plan(cfg, "new1", [_rm("on0", 1.0), _rm("on1", 2.0), _rm("both", 3.0)], view)
    assert d.evict == ("on1",)


def test_a_model_is_charged_what_nvml_sees_when_that_is_more_than_its_footprint():
    cfg = _config({"a": {"vram": 1000}, "b": {"vram": 5000}})
    view = _view(10_000, usage={"a": {0: 6000}})  # a grew past its declared 1000
    assert _plan(cfg, "b", [_rm("a", 1.0)], view).evict == ("a",)


def test_an_admission_decision_stays_fast_with_1000_models_and_50_running():
    cfg = _config({f"m{i}": {"vram": 480} for i in range(1000)})  # 50 x 480 + 480 > 24064
    running = [_rm(f"m{i}", float(i)) for i in range(50)]
    view = _view(24_576)
    book = FootprintBook()
    _plan(cfg, "m999", running, view, book)  # warm the footprint cache
    t0 = time.perf_counter()
    for _ in range(100):
        d = _plan(cfg, "m999", running, view, book)
    per_decision = (time.perf_counter() - t0) / 100
    assert d.evict == ("m0",)  # the least recently used
    assert per_decision < 0.05  # generous; bench/ reports the real p50/p99


# -- footprints ---------------------------------------------------------------------


def test_footprint_sources_and_the_store(tmp_path):
    cfg = _config({"conf": {"vram": "900MiB"}, "meas": {}, "none": {}})
    store = FootprintStore(tmp_path)
    book = FootprintBook(store, estimator=lambda m: None)
    assert book.footprint(cfg.models["conf"]) == Footprint("configured", (0,), {0: 900.0})
    assert book.footprint(cfg.models["none"]).source == "unknown"
    book.observe(cfg.models["meas"], {1: 1500.0})
    book.observe(cfg.models["meas"], {1: 1200.0})  # a peak is kept
    fp = book.footprint(cfg.models["meas"])
    assert (fp.source, fp.devices, fp.mib) == ("measured", (1,), {1: 1500.0})
    asyncio.run(book.flush())
    data = json.loads((tmp_path / "footprints.json").read_text())
    assert data["models"]["meas"] == {"key": command_key(cfg.models["meas"]), "mib": {"1": 1500.0}, "at": data["models"]["meas"]["at"]}
    again = FootprintBook(FootprintStore(tmp_path), estimator=lambda m: None)
    assert again.footprint(cfg.models["meas"]).mib == {1: 1500.0}
    # a changed cmd is measured again
    changed = _config({"meas": {"cmd": "serve --port ${PORT} --bigger"}})
    assert again.footprint(changed.models["meas"]).source == "unknown"
    assert again.forget_stale(changed) == ["meas"]


def test_a_corrupt_store_is_ignored(tmp_path):
    (tmp_path / "footprints.json").write_text("{not json")
    cfg = _config({"a": {}})
    book = FootprintBook(FootprintStore(tmp_path), estimator=lambda m: None)
    assert book.footprint(cfg.models["a"]).source == "unknown"


# -- end to end, stub NVML ------------------------------------------------------------


@pytest.fixture(scope="module")
def nvml_lib(request, tmp_path_factory) -> Path:
    return stub_dir_for(request, tmp_path_factory)


def _gpu(tmp_path: Path, nvml_lib: Path, total: int = 10_000, devices: int = 1) -> dict[str, str]:
    state = tmp_path / "nvml-state"
    state.mkdir(exist_ok=True)
    (state / "total_mib").write_text(str(total))
    (state / "devices").write_text(str(devices))
    return stub_env(nvml_lib, state)


def _routing(**vram) -> dict:
    return {"routing": {"router": {"use": "vram", "settings": {"vram": vram}}}}


def _events(s, name):
    return [e for e in s.log_events() if e.get("event") == name]


def _started(s) -> list[str]:
    return [e["model"] for e in _events(s, "backend.start")]


def test_e2e_fit_together_then_lru_eviction_logged(swapd, tmp_path, nvml_lib):
    env = _gpu(tmp_path, nvml_lib, total=4000 + 4000 + 1168 + 100)
    models = {m: model("--vram-mib", "4000", vram=4000) for m in "abc"}
    s = swapd(models, env=env, **_routing())
    assert s.chat("a").status == 200
    assert s.chat("b").status == 200
    assert set(s.running()) == {"a", "b"}  # side by side
    assert s.chat("a").status == 200  # b is now the least recently used
    assert s.chat("c").status == 200
    assert set(s.running()) == {"a", "c"}
    (ev,) = _events(s, "scheduler.evict")
    assert (ev["model"], ev["for_model"], ev["reason"]) == ("b", "c", "vram")
    assert ev["freed_mib"] == 4000.0 and ev["counted_mib"] == 4000.0 and ev["idle_seconds"] >= 0
    body = s.get("/running").json()
    assert body["gpus"]["0"]["models_mib"] == 8000.0
    assert {r["model"]: r["footprint"]["source"] for r in body["running"]} == {"a": "configured", "c": "configured"}


def test_e2e_a_busy_model_is_never_evicted_and_never_fits_is_503(swapd, tmp_path, nvml_lib):
    env = _gpu(tmp_path, nvml_lib, total=6000 + 1168)
    models = {
        "slow": model("--vram-mib", "4000", "--interval", "0.2", vram=4000),
        "other": model("--vram-mib", "4000", vram=4000),
        "huge": model(vram="64GiB"),
    }
    s = swapd(models, env=env, **_routing())
    r = s.chat("huge")
    assert r.status == 503 and "can never fit" in r.json()["error"]["message"]
    assert _started(s) == []
    assert s.chat("slow").status == 200
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("s", s.stream("slow", max_tokens=15)))
    t.start()
    wait_until(lambda: s.running().get("slow", {}).get("in_flight") == 1, message="slow to be busy")
    assert s.chat("other").status == 200  # waited for the stream to end, then evicted slow
    t.join(30)
    status, _, events = result["s"]
    assert status == 200 and events[-1][1] == "[DONE]" and len(events) >= 15
    stop = next(e for e in _events(s, "backend.stop") if e.get("model") == "slow")
    assert stop["reason"] == "evict"


def test_e2e_unknown_then_measured_then_remembered_then_forgotten(swapd, tmp_path, nvml_lib):
    env = _gpu(tmp_path, nvml_lib, total=24_576)
    models = {"m": model("--vram-mib", "3000", "--vram-grow-mib", "500", "--vram-grow-after", "0.3")}
    s = swapd(models, env=env, **_routing())
    fp = s.get("/api/gpus").json()["footprints"]["m"]
    assert fp["source"] == "unknown" and fp["mib"] is None
    assert s.chat("m").status == 200
    wait_until(
        lambda: s.get("/api/gpus").json()["footprints"]["m"] == {"mib": 3500.0, "source": "measured", "devices": [0]},
        timeout=15,
        message="the grown peak to be measured",
    )
    assert s.terminate() == 0
    store = tmp_path / "state" / "swapd" / "footprints.json"
    assert json.loads(store.read_text())["models"]["m"]["mib"] == {"0": 3500.0}

    s2 = swapd(models, env=env, tag=s.tag, **_routing())  # same state dir and env: remembered before any start
    assert s2.get("/api/gpus").json()["footprints"]["m"]["source"] == "measured"
    # a reload that changes the cmd forgets the measurement
    changed = {"m": model("--vram-mib", "3000", "--chunks", "2")}
    write_config(s2.config_path, changed, s2.tag, **_routing())
    s2.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: _events(s2, "config.reloaded"), message="the reload")
    wait_until(
        lambda: s2.get("/api/gpus").json()["footprints"]["m"]["source"] == "unknown",
        message="the changed model's measurement to be forgotten",
    )
    wait_until(lambda: "\"m\"" not in store.read_text(), message="the store to drop it")


def test_an_estimated_footprint_from_the_real_smollm2_gguf(smollm2):
    from swapd.gpu.estimate import estimate_footprint

    cfg = _config({"s": {"cmd": f"llama-server --port ${{PORT}} -m {smollm2} -c 2048"}, "v": {}})
    book = FootprintBook()
    assert book.footprint(cfg.models["s"]).source == "unknown"  # not estimated until prepare() ran
    asyncio.run(book.prepare(cfg.models.values()))
    fp = book.footprint(cfg.models["s"])
    direct = estimate_footprint(cfg.models["s"].cmd, dict(cfg.models["s"].env))
    assert direct is not None and fp.source == "estimated" and fp.mib == {0: direct.mib}
    assert 300 < direct.mib < 2000 and "SmolLM2" in (fp.detail or "")
    assert book.footprint(cfg.models["v"]).source == "unknown"  # no GGUF in its cmd


def test_e2e_models_max_without_nvml(swapd):
    s = swapd({m: model() for m in "abc"}, **_routing(modelsMax=2))
    assert s.get("/api/gpus").json()["available"] is False
    for m in "abac":  # b is the least recently used when c arrives
        assert s.chat(m).status == 200
    assert set(s.running()) == {"a", "c"}
    (ev,) = _events(s, "scheduler.evict")
    assert (ev["model"], ev["for_model"], ev["reason"]) == ("b", "c", "count")


def test_e2e_two_gpus_and_a_pinned_model(swapd, tmp_path, nvml_lib):
    env = _gpu(tmp_path, nvml_lib, total=5000 + 1168, devices=2)  # 5000 MiB for models on each GPU
    on = lambda d, *more: model("--vram-mib", "3000", "--vram-device", str(d), *more, vram=3000,  # noqa: E731
                                env=[f"CUDA_VISIBLE_DEVICES={d}"])
    s = swapd({"p0": on(0), "x0": on(0), "y1": on(1), "z1": on(1)}, env=env, **_routing(pinned=["p0"]))
    assert s.chat("p0").status == 200
    assert s.chat("y1").status == 200  # the other GPU: beside
    assert set(s.running()) == {"p0", "y1"}
    r = s.chat("x0")  # GPU 0 holds the pinned p0: 3000 + 3000 > 5000 can never fit
    assert r.status == 503 and "pinned" in r.json()["error"]["message"]
    assert s.chat("z1").status == 200  # GPU 1: y1 makes room, p0 on GPU 0 is untouched
    assert set(s.running()) == {"p0", "z1"}
    (ev,) = _events(s, "scheduler.evict")
    assert (ev["model"], ev["for_model"], ev["reason"], ev["freed_mib"]) == ("y1", "z1", "vram", 3000.0)
    gpus = s.get("/running").json()["gpus"]
    assert gpus["0"]["models_mib"] == 3000.0 and gpus["1"]["models_mib"] == 3000.0


@pytest.mark.parametrize(
    "patch, key, words",
    [
        ({"models": {"a": {"vram": "11TB"}}}, "key 'vram'", "positive size"),
        ({"models": {"a": {"vram": {"x": 100}}}}, "key 'vram'", "GPU index"),
        ({"vram": {"pinned": ["nope"]}}, "routing.router.settings.vram.pinned[0]", "not a defined model"),
        ({"vram": {"modelsMax": -1}}, "routing.router.settings.vram.modelsMax", ">= 0"),
        ({"vram": {"reserve": "lots"}}, "routing.router.settings.vram.reserve", "size in MiB"),
        ({"groups": {"g": {"members": ["a"]}}}, "routing.router.settings.groups", "pinned"),
    ],
)
def test_vram_config_errors_name_the_key(patch, key, words):
    from swapd.config import ConfigError

    settings = {"vram": patch.get("vram", {})}
    if "groups" in patch:
        settings["groups"] = patch["groups"]
    models = {"a": {"cmd": "serve --port ${PORT}", **patch.get("models", {}).get("a", {})}}
    doc = {"routing": {"router": {"use": "vram", "settings": settings}}, "models": models}
    with pytest.raises(ConfigError) as err:
        load_config_text(yaml.safe_dump(doc))
    assert key in str(err.value) and words in str(err.value)
    if "models" in patch:
        assert "model 'a'" in str(err.value)
