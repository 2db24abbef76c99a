"""Selectors (llama-swap's ``selectors``): the loader, the strategies, and routing on a real swapd.

Ported from llama-swap's ``internal/config/selectors_test.go`` and
``internal/server/selector_test.go`` (each test names the one it ports). The
strategy cases run against the pure ``warm``/``spillover`` functions, where
the load of a target is what the scheduler reports as admitted; the server
cases run a real swapd with fake backends (and fake backends as peers).
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import time

import pytest
from helpers import PY, ROOT, free_port, model, wait_until

from swapd.backend import State
from swapd.config import ConfigError, load_config, load_config_sources, load_config_text
from swapd.server.selectors import Candidate, NoTarget, spillover, warm

# -- the loader ------------------------------------------------------------------------------


def load(text: str, path: str = "c.yaml"):
    return load_config_text(text, path, {})


def test_selectors_load_defaults_and_fields():
    """Ports TestConfig_Selectors_LoadDefaultsAndFields."""
    cfg = load(
        """
models:
  a:
    cmd: echo ${PORT}
  b:
    cmd: echo ${PORT}
groups:
  balanced:
    swap: false
    members: [a, b]
selectors:
  coding:
    strategy: warm
    targets: [a, b]
    name: Coding Model
    description: Best available coding model
    unlisted: true
    metadata:
      family: coding
  workers:
    strategy: spillover
    targets: [a, b]
"""
    )
    assert cfg.warnings == ()
    coding = cfg.selectors["coding"]
    assert (coding.strategy, coding.targets, coding.spillover) == ("warm", ("a", "b"), 1)
    assert (coding.name, coding.description, coding.unlisted) == ("Coding Model", "Best available coding model", True)
    assert coding.metadata == {"family": "coding"}
    assert cfg.selectors["workers"].spillover == 1


SELECTOR_BASE = """
models:
  a:
    cmd: echo ${PORT}
    aliases: [alias-a]
    filters:
      setParamsByID:
        variant:
          temperature: 0
  b:
    cmd: echo ${PORT}
peers:
  remote:
    proxy: http://example.com
    models: [remote-model]
"""


@pytest.mark.parametrize(
    ("name", "selectors", "key", "message"),
    [
        ("empty selector id", "' ':\n    strategy: pin\n    targets: [a]", "selectors", "selector names cannot be empty"),
        ("missing strategy", "public:\n    targets: [a]", "selectors.public.strategy", "is required"),
        ("unknown strategy", "public:\n    strategy: random\n    targets: [a]", "selectors.public.strategy",
         "unknown strategy 'random'"),
        ("missing targets", "public:\n    strategy: pin", "selectors.public.targets", "must list at least one target"),
        ("selector chaining", "first:\n    strategy: pin\n    targets: [a]\n  second:\n    strategy: pin\n"
         "    targets: [first]", "selectors.second.targets[0]", "selectors cannot target selectors"),
        ("model id collision", "a:\n    strategy: pin\n    targets: [a]", "selectors.a", "'a' is already a model id"),
        ("explicit alias collision", "alias-a:\n    strategy: pin\n    targets: [a]", "selectors.alias-a",
         "already an alias of model 'a'"),
        ("generated alias collision", "variant:\n    strategy: pin\n    targets: [a]", "selectors.variant",
         "already an alias of model 'a'"),
        ("peer full name collision", "remote/remote-model:\n    strategy: pin\n    targets: [a]",
         "selectors.remote/remote-model", "already a peer model's full name"),
        ("warm peer target", "public:\n    strategy: warm\n    targets: [remote-model]", "selectors.public.targets[0]",
         "strategy 'warm' needs local models"),
        ("invalid spillover", "public:\n    strategy: spillover\n    targets: [a]\n    settings:\n      spillover: 0",
         "selectors.public.settings.spillover", "must be >= 1"),
        ("duplicate resolved spillover target", "public:\n    strategy: spillover\n    targets: [a, alias-a]",
         "selectors.public.targets[1]", "is model 'a' again"),
        ("duplicate resolved peer spillover target",
         "public:\n    strategy: spillover\n    targets: [remote-model, remote/remote-model]",
         "selectors.public.targets[1]", "is model 'remote/remote-model' again"),
        ("spillover swapping group", "public:\n    strategy: spillover\n    targets: [a, b]", "selectors.public.targets",
         "must share a group with swap: false"),
        ("not a mapping", "public: [a]", "selectors.public", "expected a mapping with strategy and targets"),
    ],
)
def test_selectors_validation(name, selectors, key, message):
    """Ports TestConfig_Selectors_Validation (plus a peer full name and a non-mapping); errors name file and key."""
    with pytest.raises(ConfigError) as info:
        load(SELECTOR_BASE + "selectors:\n  " + selectors + "\n")
    err = info.value
    assert (err.file, err.key) == ("c.yaml", key), str(err)
    assert message in err.message, str(err)


def test_selector_target_naming_no_model_is_dropped_with_a_warning():
    """Ports TestConfig_Selectors_Validation "unknown target": llama-swap refuses the file, swapd warns.

    As for group members naming no model (docs/compatibility.md); a selector
    left with no target at all is dropped, with its own warning.
    """
    cfg = load(SELECTOR_BASE + "selectors:\n  public:\n    strategy: pin\n    targets: [missing, a]\n"
               "  nothing:\n    strategy: pin\n    targets: [missing]\n")
    assert cfg.warnings == (
        "key 'selectors.public.targets[0]': 'missing' is not a defined model; ignored",
        "key 'selectors.nothing.targets[0]': 'missing' is not a defined model; ignored",
        "key 'selectors.nothing.targets': none of them is a defined model; the selector is ignored",
    )
    assert cfg.selectors["public"].targets == ("a",) and "nothing" not in cfg.selectors


def test_selectors_peer_model_fqn():
    """Ports TestConfig_Selectors_PeerModelFQN: a selector may share a peer model's short name."""
    cfg = load(
        "peers:\n  remote:\n    proxy: http://example.com\n    models: [remote-model]\n"
        "selectors:\n  remote-model:\n    strategy: spillover\n    targets: [remote/remote-model]\n"
    )
    assert cfg.selectors["remote-model"].targets == ("remote/remote-model",)


TWO = "models:\n  a:\n    cmd: echo ${PORT}\n  b:\n    cmd: echo ${PORT}\n"
SPILL = "selectors:\n  public:\n    strategy: spillover\n    targets: [a, b]\n"


def test_selectors_spillover_coexistence():
    """Ports TestConfig_Selectors_SpilloverCoexistence (group, matrix sets, remote and mixed targets)."""
    cfg = load(TWO + "groups:\n  pool:\n    swap: false\n    members: [a, b]\n" + SPILL + "    settings:\n      spillover: 4\n")
    assert cfg.selectors["public"].spillover == 4
    load(TWO + "matrix:\n  vars:\n    A: a\n    B: b\n  sets:\n    pool: 'A & B'\n" + SPILL)  # one common set
    with pytest.raises(ConfigError) as info:
        load(TWO + "matrix:\n  vars:\n    A: a\n    B: b\n  sets:\n    pool: 'A | B'\n" + SPILL)
    assert "must all appear together in one matrix set" in info.value.message
    assert info.value.key == "selectors.public.targets"
    with pytest.raises(ConfigError) as info:  # two groups, one of them swapping nothing
        load(TWO + "groups:\n  g1:\n    swap: false\n    members: [a]\n  g2:\n    swap: false\n    members: [b]\n" + SPILL)
    assert "must share one routing group" in info.value.message

    # matrix symbolic large: 4 dimensions of 11 choices, never expanded
    lines = ["models:", "  target:", "    cmd: echo ${PORT}"]
    groups = []
    for dimension in range(4):
        names = [f"model-{dimension}-{choice}" for choice in range(11)]
        for name in names:
            lines += [f"  {name}:", "    cmd: echo ${PORT}"]
        groups.append("(" + " | ".join(names) + ")")
    lines += ["matrix:", "  sets:", f"    large: \"target & {' & '.join(groups)}\""]
    lines += ["selectors:", "  public:", "    strategy: spillover", "    targets: [target, model-0-0]"]
    load("\n".join(lines) + "\n")

    load("peers:\n  remote:\n    proxy: http://example.com\n    models: [a, b]\n"
         "selectors:\n  public:\n    strategy: spillover\n    targets: [remote/a, remote/b]\n")
    load("models:\n  local:\n    cmd: echo ${PORT}\n"
         "peers:\n  remote:\n    proxy: http://example.com\n    models: [remote-model]\n"
         "selectors:\n  public:\n    strategy: spillover\n    targets: [local, remote/remote-model]\n")
    # swapd's vram router runs any models side by side while they fit: nothing to check
    load(TWO + "routing:\n  router:\n    use: vram\n" + SPILL)


def test_selectors_profile_targets_selector():
    """Ports TestConfig_Selectors_ProfileTargetsSelector."""
    cfg = load(
        "models:\n  a:\n    cmd: echo ${PORT}\n"
        "selectors:\n  public:\n    strategy: pin\n    targets: [a]\n"
        "profiles:\n  coding:\n    pins:\n      llm-code: public\n"
    )
    assert cfg.profiles["coding"].pins["llm-code"] == "public" and cfg.warnings == ()


def test_selectors_merge_duplicate(tmp_path):
    """Ports TestConfig_Selectors_MergeDuplicate: one selector id in two --config-dir files."""
    (tmp_path / "a.yaml").write_text(
        "models:\n  a:\n    cmd: echo ${PORT}\nselectors:\n  public:\n    strategy: pin\n    targets: [a]\n"
    )
    (tmp_path / "b.yaml").write_text("selectors:\n  public:\n    strategy: pin\n    targets: [a]\n")
    with pytest.raises(ConfigError) as info:
        load_config_sources(None, str(tmp_path), {})
    assert info.value.file.endswith("b.yaml") and "duplicate selector 'public'" in info.value.message


def test_selector_errors_after_a_merge_name_the_file_they_came_from(tmp_path):
    (tmp_path / "a.yaml").write_text("models:\n  a:\n    cmd: echo ${PORT}\n")
    (tmp_path / "b.yaml").write_text("selectors:\n  a:\n    strategy: pin\n    targets: [a]\n")
    with pytest.raises(ConfigError) as info:
        load_config_sources(None, str(tmp_path), {})
    assert str(info.value) == (
        f"{tmp_path / 'b.yaml'}: key 'selectors.a': 'a' is already a model id; a selector needs a name of its own"
    )


def test_a_selector_collision_stops_swapd_with_the_file_selector_and_key(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "models:\n  m:\n    cmd: echo ${PORT}\n    aliases: [fast]\n"
        "selectors:\n  fast:\n    strategy: pin\n    targets: [m]\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [PY, "-m", "swapd", "--config", str(config), "--listen", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=30, env=env, cwd=ROOT,
    )
    assert proc.returncode != 0
    assert f"{config}: key 'selectors.fast': 'fast' is already an alias of model 'm'" in proc.stdout + proc.stderr


FIXTURE = ROOT.parent / "shared" / "fixtures" / "llama-swap" / "config.example.yaml"
FIXTURE_ENV = {"HOME": "/home/tester", "API_KEY_1": "sk-one", "API_KEY_2": "sk-two", "OPENROUTER_API_KEY": "sk-or"}


@pytest.mark.skipif(not FIXTURE.exists(), reason="shared fixture not present")
def test_llama_swaps_example_profiles_and_selectors(tmp_path):
    """The example's profiles and selectors load; the only warnings about them name its illustrative models."""
    cfg = load_config(str(FIXTURE), environ=FIXTURE_ENV)
    about = [w for w in cfg.warnings if "profile" in w or "selector" in w]
    assert about == [
        "key 'selectors.coding-model.targets[1]': 'qwen-unlisted' is not a defined model; ignored",
        "key 'selectors.llama.targets[1]': 'modelA' is not a defined model; ignored",
        "key 'selectors.llama.targets[2]': 'modelB' is not a defined model; ignored",
        "key 'profiles.coding.pins.llm-plan': 'qwen-unlisted' is not a defined model or selector; ignored",
    ]
    assert dict(cfg.profiles["coding"].pins) == {"llm-code": "gpt-oss-120b", "image-gen": ""}
    assert cfg.selectors["llm-plan"].targets == ("gpt-oss-120b", "z-ai/glm-4.7")
    assert (cfg.selectors["llama"].strategy, cfg.selectors["llama"].spillover) == ("spillover", 4)

    # with the names llama-swap itself would accept, nothing about profiles or selectors is said at all
    text = FIXTURE.read_text()
    text = text.replace('      - "qwen-unlisted"\n', '      - "unlisted-model"\n')
    text = text.replace('"llm-plan": "qwen-unlisted"', '"llm-plan": "unlisted-model"')
    text = text.replace('      - "modelA"\n      - "modelB"\n    settings:',
                        '      - "llama-swap-peer/model_a"\n      - "llama-swap-peer/model_b"\n    settings:')
    text = text.replace("    unlisted: true\n    cmd: some-upstream-server\n",
                        "    unlisted: true\n    cmd: some-upstream-server\n    proxy: http://127.0.0.1:9000\n")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    cfg = load_config(str(path), environ=FIXTURE_ENV)
    assert not [w for w in cfg.warnings if "profile" in w or "selector" in w], cfg.warnings
    assert cfg.selectors["llama"].targets == ("docker-llama", "llama-swap-peer/model_a", "llama-swap-peer/model_b")


# -- the strategies (pure) ------------------------------------------------------------------


def test_strategy_warm():
    """Ports TestServer_SelectorStrategyWarm: ready first, then starting, else the first target."""
    def pick(states: dict[str, State]) -> str:
        return warm([Candidate(t, states.get(t, State.STOPPED)) for t in ("a", "b", "c")])

    assert pick({"a": State.STARTING, "c": State.READY}) == "c"
    assert pick({"a": State.STARTING, "b": State.READY, "c": State.READY}) == "b"
    assert pick({"a": State.STARTING, "b": State.STARTING}) == "a"
    assert pick({}) == "a"


def test_strategy_spillover():
    """Ports TestServer_SelectorStrategySpillover; a target's load is what the scheduler has admitted for it."""
    load = {"a": 0, "b": 0, "c": 0}
    states = {"a": State.STOPPED, "b": State.STOPPED, "c": State.STOPPED}
    turn = 0

    def pick(limit: int = 2) -> str:
        nonlocal turn
        chosen, turned = spillover([Candidate(t, states[t], load[t]) for t in load], limit, turn)
        turn += turned
        load[chosen] += 1  # admitted by the scheduler right after the pick
        return chosen

    assert [pick(), pick(), pick()] == ["a", "a", "b"]
    load["a"] -= 1  # one request to a finished
    states.update(a=State.READY, b=State.READY, c=State.READY)
    assert pick() == "c"  # every target is in use now: the least busy one

    stopping = [Candidate(t, State.STOPPING) for t in "abc"]
    with pytest.raises(NoTarget):
        spillover(stopping, 2, 0)


def test_strategy_spillover_remote_models():
    """Ports TestServer_SelectorStrategySpillover_RemoteModels: peer targets count their requests in flight."""
    load = {"remote/a": 0, "remote/b": 0}

    def pick() -> str:
        chosen, _ = spillover([Candidate(t, None, load[t]) for t in load], 1, 0)
        load[chosen] += 1
        return chosen

    first, second = pick(), pick()
    assert (first, second) == ("remote/a", "remote/b")
    load[first] -= 1
    load[second] -= 1
    assert pick() == "remote/a"


def test_strategy_spillover_takes_turns_among_equally_busy_targets():
    candidates = [Candidate(t, State.READY, 1) for t in "abc"]
    assert [spillover(candidates, 1, turn)[0] for turn in range(4)] == ["a", "b", "c", "a"]


# -- a real swapd ---------------------------------------------------------------------------


def _selector_models(*opts: str) -> dict:
    """llama-swap's selectorTestConfig models, with fake backends."""
    return {
        "a": model(*opts, "--model-id", "a", aliases=["alias-a"],
                   filters={"setParamsByID": {"variant": {"thinking": True}}}),
        "b": model(*opts, "--model-id", "b"),
        "c": model(*opts, "--model-id", "c"),
    }


SELECTORS = {
    "public": {
        "strategy": "pin",
        "targets": ["variant", "remote/remote-model"],
        "name": "Public Model",
        "description": "Public selector",
        "metadata": {"purpose": "testing"},
    },
    "warm": {"strategy": "warm", "targets": ["a", "b", "c"]},
    "balanced": {"strategy": "spillover", "targets": ["a", "b", "c"], "settings": {"spillover": 1}},
    "hidden-selector": {"strategy": "pin", "targets": ["a"], "unlisted": True},
}
TOP = {
    "groups": {"balanced": {"swap": False, "members": ["a", "b", "c"]}},
    "peers": {"remote": {"proxy": "http://127.0.0.1:9", "models": ["remote-model"]}},
    "selectors": SELECTORS,
    "profiles": {"coding": {"pins": {"llm-code": "public"}}},
}


def _last_body(s, model_id: str) -> dict:
    proxy = s.running()[model_id]["proxy"]
    port = int(proxy.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/x/last")
        return json.loads(conn.getresponse().read())["body"]
    finally:
        conn.close()


def _rows(s, n: int) -> list[dict]:
    return wait_until(lambda: len(rows := s.get("/api/metrics/activity").json()["data"]) >= n and rows,
                      message=f"{n} activity rows")


def test_selector_rewrites_before_filters_and_records_activity(swapd):
    """Ports TestServer_SelectorMiddleware_RewritesBeforeFiltersAndRecordsActivity."""
    s = swapd(_selector_models(), **TOP)
    r = s.chat("public")
    assert r.status == 200, r.body
    assert r.json()["model"] == "variant"
    body = _last_body(s, "a")
    assert body["model"] == "variant" and body["thinking"] is True  # setParamsByID of the target's name
    (row,) = _rows(s, 1)
    assert row["model"] == "a" and row["metadata"] == {"selector": "public"}


def test_profile_pins_run_before_selectors(swapd):
    """Ports TestServer_SelectorMiddleware_ProfileRunsFirst: a pin whose target is a selector."""
    s = swapd(_selector_models(), **TOP)
    assert s.chat("llm-code").status == 404  # no profile active: the name means nothing
    assert s.request("PUT", "/api/profiles/active", body={"name": "coding"}).status == 200
    r = s.chat("llm-code")
    assert r.status == 200 and list(s.running()) == ["a"]
    (row,) = _rows(s, 1)
    assert row["model"] == "a" and row["metadata"] == {"selector": "public"}


def _hold(s, name: str, seconds: float, results: list) -> threading.Thread:
    """Send a chat request that the backend holds for ``seconds`` (x_sleep); its answer goes to ``results``."""
    def run() -> None:
        results.append(s.chat(name, x_sleep=seconds))
    t = threading.Thread(target=run)
    t.start()
    return t


def _in_flight(s) -> dict[str, int]:
    return {m: e.get("in_flight", 0) for m, e in s.running().items()}


def test_spillover_fills_one_target_then_moves_to_the_next(swapd):
    """Ports TestServer_SelectorMiddleware_SpilloverReservations, with settings.spillover 2 and real backends."""
    top = dict(TOP, selectors={"pool": {"strategy": "spillover", "targets": ["a", "b", "c"],
                                        "settings": {"spillover": 2}}})
    s = swapd(_selector_models(), **top)
    results: list = []
    threads = [_hold(s, "pool", 3, results)]
    wait_until(lambda: _in_flight(s).get("a") == 1, message="the first request on a")
    threads.append(_hold(s, "pool", 3, results))
    wait_until(lambda: _in_flight(s).get("a") == 2, message="the second request on a too")
    threads.append(_hold(s, "pool", 3, results))
    wait_until(lambda: _in_flight(s).get("b") == 1, message="the third request spilling to b")
    assert "c" not in s.running()
    for t in threads:
        t.join()
    assert sorted(r.json()["model"] for r in results) == ["a", "a", "b"]
    assert s.chat("pool").json()["model"] in ("a", "b")  # both idle and ready: the least busy, in turn


def test_spillover_counts_a_request_from_its_admission(swapd):
    """Two requests at once to a cold pool go to two targets: the first counts while its model starts."""
    s = swapd(_selector_models("--load-delay", "1"), **TOP)
    results: list = []
    threads = [_hold(s, "balanced", 0, results) for _ in range(2)]
    for t in threads:
        t.join()
    assert sorted(r.json()["model"] for r in results) == ["a", "b"]


def test_spillover_over_peer_models(swapd, tmp_path):
    """Spillover targets may be peer models; each counts its requests while they are relayed."""
    ports = [free_port(), free_port()]
    peers = [
        subprocess.Popen([PY, "-m", "swapd.fake_backend", "--port", str(p), "--quiet", "--model-id", f"peer{i}"],
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        for i, p in enumerate(ports)
    ]
    try:
        s = swapd({"local": model()},
                  peers={"p0": {"proxy": f"http://127.0.0.1:{ports[0]}", "models": ["m"]},
                         "p1": {"proxy": f"http://127.0.0.1:{ports[1]}", "models": ["m"]}},
                  selectors={"pool": {"strategy": "spillover", "targets": ["p0/m", "p1/m"]}})
        for p in ports:
            wait_until(lambda p=p: _peer_stats(p) is not None, message="peer backend")
        results: list = []
        first = _hold(s, "pool", 2, results)
        wait_until(lambda: _peer_stats(ports[0])["in_flight"] == 1, message="the first request on p0")
        second = _hold(s, "pool", 2, results)
        wait_until(lambda: _peer_stats(ports[1])["in_flight"] == 1, message="the second request on p1")
        first.join()
        second.join()
        assert [r.status for r in results] == [200, 200]
        assert s.running() == {}  # peers only: nothing local started
    finally:
        for proc in peers:
            proc.terminate()
            proc.wait(10)


def _peer_stats(port: int) -> dict | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/x/stats")
        return json.loads(conn.getresponse().read())
    except OSError:
        return None


def test_all_spillover_targets_stopping_answers_503(swapd):
    """Ports TestServer_SelectorMiddleware_AllSpilloverTargetsStopping with backends that ignore SIGTERM."""
    top = dict(TOP, unloadTimeout=4, selectors={"pool": {"strategy": "spillover", "targets": ["a", "b"]}},
               groups={"balanced": {"swap": False, "members": ["a", "b", "c"]}})
    s = swapd(_selector_models("--ignore-sigterm"), **top)
    assert s.chat("a").status == 200 and s.chat("b").status == 200
    unload = threading.Thread(target=lambda: s.get("/unload", timeout=30))
    unload.start()
    try:
        wait_until(lambda: {e["state"] for e in s.running().values()} == {"stopping"}, message="both stopping")
        r = s.chat("pool")
        assert r.status == 503
        assert "has no available spillover targets" in r.json()["error"]["message"]
    finally:
        unload.join()


def test_warm_takes_the_ready_model(swapd):
    """The warm strategy: a ready target first, then one starting; with none, the first target starts."""
    s = swapd({"a": model("--model-id", "a"), "b": model("--model-id", "b")},
              selectors={"coding": {"strategy": "warm", "targets": ["a", "b"]}})
    assert s.chat("b").status == 200
    assert s.chat("coding").json()["model"] == "b" and list(s.running()) == ["b"]
    s.get("/unload")
    assert s.chat("coding").json()["model"] == "a" and list(s.running()) == ["a"]


def test_selectors_do_not_apply_to_upstream_paths(swapd):
    """Ports TestServer_SelectorMiddleware_UpstreamUnsupported: 404, and nothing starts."""
    s = swapd(_selector_models(), **TOP)
    r = s.post("/upstream/public/v1/chat/completions", {"model": "public"})
    assert r.status == 404
    assert s.running() == {}
    # a near miss of a selector's name is suggested, as for models
    assert "did you mean 'balanced'?" in s.chat("balancd").json()["error"]["message"]


def test_selector_model_listings(swapd):
    """Ports TestServer_Selector_ModelListings: selectors in /v1/models, as llama-swap renders them."""
    s = swapd(_selector_models("--load-delay", "3"), **TOP)
    starting: list = []
    t = _hold(s, "a", 0, starting)  # a is starting for 3 s
    try:
        wait_until(lambda: s.running().get("a", {}).get("state") == "starting", message="a starting")
        records = {r["id"]: r for r in s.get("/v1/models").json()["data"]}
    finally:
        t.join()
    public = records["public"]
    assert (public["name"], public["description"]) == ("Public Model", "Public selector")
    assert public["status"] == {"value": "loaded"}  # its first target, a, is starting
    assert public["meta"]["llamaswap"] == {
        "purpose": "testing",
        "type": "selector",
        "strategy": "pin",
        "targets": ["variant", "remote/remote-model"],
    }
    assert records["balanced"]["meta"]["llamaswap"] == {
        "type": "selector", "strategy": "spillover", "targets": ["a", "b", "c"], "spillover": 1,
    }
    assert records["warm"]["status"] == {"value": "loaded"}
    assert "hidden-selector" not in records
    assert records["public"]["object"] == "model" and "name" not in records["balanced"]


def test_selector_listing_pin_uses_first_target(swapd):
    """Ports TestServer_Selector_ModelListingPinUsesFirstTarget: only a pin's first target counts."""
    top = dict(TOP, selectors={"public": {"strategy": "pin", "targets": ["a", "b"]}})
    s = swapd(_selector_models(), **top)
    assert s.chat("b").status == 200
    records = {r["id"]: r for r in s.get("/v1/models").json()["data"]}
    assert records["public"]["status"] == {"value": "unloaded"}


def test_selector_on_the_query_route_and_ollamas_api(swapd):
    """A selector picks wherever the model is named: ``?model=`` and Ollama's /api/chat too."""
    s = swapd({"a": model("--model-id", "a")}, selectors={"s": {"strategy": "pin", "targets": ["a"]}})
    s.get("/props?model=s")
    assert list(s.running()) == ["a"]
    r = s.post("/api/chat", {"model": "s", "messages": [{"role": "user", "content": "hi"}], "stream": False})
    assert r.status == 200, r.body
    assert r.json()["model"] == "s"  # Ollama's answer names what the client asked for
    assert _last_body(s, "a")["model"] == "a"  # the backend got the target


def test_a_large_body_is_routed_by_its_selector(swapd):
    """A body that arrives in pieces (past 64 KiB) is picked for once it is whole."""
    s = swapd(_selector_models(), **dict(TOP, selectors={"s": {"strategy": "pin", "targets": ["variant"]}}))
    body = json.dumps({"model": "s", "messages": [{"role": "user", "content": "x" * 200_000}]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        for i in range(0, len(body), 50_000):
            conn.send(body[i:i + 50_000])
            time.sleep(0.02)
        resp = conn.getresponse()
        answer = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200 and answer["model"] == "variant"
    assert _last_body(s, "a")["thinking"] is True


@pytest.mark.skipif(not FIXTURE.exists(), reason="shared fixture not present")
def test_the_example_config_lists_its_selectors(tmp_path):
    """llama-swap's config.example.yaml, as shipped: its selectors and its pins' profile are served."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), **FIXTURE_ENV)
    proc = subprocess.Popen([PY, "-m", "swapd", "-config", str(FIXTURE), "-listen", f"127.0.0.1:{port}"],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def get(path: str, method: str = "GET", body: bytes | None = None):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request(method, path, body=body, headers={"Authorization": "Bearer sk-one",
                                                               "Content-Type": "application/json"})
                resp = conn.getresponse()
                return resp.status, json.loads(resp.read())
            except OSError:
                return None

        status, doc = wait_until(lambda: get("/v1/models"), timeout=20, message="fixture swapd")
        ids = {m["id"] for m in doc["data"]}
        assert {"coding-model", "llm-plan", "llama"} <= ids
        assert get("/api/profiles/active", "PUT", b'{"name": "coding"}') == (200, {"active": "coding"})
        status, doc = get("/v1/models")
        assert "llm-code" in {m["id"] for m in doc["data"]}
    finally:
        proc.terminate()
        proc.wait(20)


def test_empty_selectors_and_profiles_blocks_load_quietly():
    cfg = load("models:\n  m:\n    cmd: echo ${PORT}\nselectors: {}\nprofiles: {}\n")
    assert cfg.warnings == () and dict(cfg.selectors) == {} and dict(cfg.profiles) == {}
