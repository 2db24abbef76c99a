"""Profiles (llama-swap's ``profiles``): the loader, ``/api/profiles``, and pins on a real swapd.

The cases are ported from llama-swap's ``internal/config/profile_test.go`` and
``internal/server/profiles_test.go`` (each test names the one it ports); the
server cases run against a real swapd with fake backends instead of a stub
router. swapd's own additions (reload keeps the active profile, the
``profileChanged`` event, error shapes) are tested alongside.
"""

from __future__ import annotations

import http.client
import json
import signal
import threading

import pytest
import yaml
from helpers import model, wait_until

from swapd.config import ConfigError, load_config_text

# -- the loader ------------------------------------------------------------------------------


def load(text: str, path: str = "c.yaml"):
    return load_config_text(text, path, {})


def test_profiles_load_and_resolve():
    """Ports TestConfig_Profiles_LoadAndResolve: every kind of pin target, null and "" switch a name off."""
    cfg = load(
        """
models:
  local:
    cmd: echo ${PORT}
    aliases: [local-fast]
    filters:
      setParamsByID:
        local-thinking:
          thinking: true
peers:
  remote:
    proxy: http://example.com
    models: [peer-model]
profiles:
  coding:
    description: Coding profile
    pins:
      direct: local
      alias: local-fast
      variant: local-thinking
      peer: peer-model
      peer-qualified: remote/peer-model
      disabled-empty: ""
      disabled-null: ~
      local: peer-model
"""
    )
    assert cfg.warnings == ()
    profile = cfg.profiles["coding"]
    assert profile.description == "Coding profile"
    cases = {
        "direct": ("local", "local"),
        "alias": ("local-fast", "local"),
        "variant": ("local-thinking", "local"),
        "peer": ("peer-model", "remote/peer-model"),
        "peer-qualified": ("remote/peer-model", "remote/peer-model"),
        "local": ("peer-model", "remote/peer-model"),
        "disabled-empty": ("", None),
        "disabled-null": ("", None),
    }
    for requested, (target, model_id) in cases.items():
        assert profile.pins[requested] == target, requested
        if model_id is None:
            continue
        local = cfg.resolve(target)
        if local is not None:
            assert local.id == model_id
        else:
            peer, name = cfg.resolve_peer(target)
            assert f"{peer.id}/{name}" == model_id
    assert cfg.resolve("local-fast").id == "local"


@pytest.mark.parametrize(
    ("profile", "key", "message"),
    [
        ("profiles:\n  old: [model]\n", "profiles.old", "the list form of older llama-swap versions"),
        ("profiles:\n  empty:\n    pins: {}\n", "profiles.empty.pins", "must pin at least one name"),
        ("profiles:\n  nopins:\n    description: x\n", "profiles.nopins.pins", "must pin at least one name"),
        ("profiles:\n  ' ':\n    pins: {a: model}\n", "profiles", "profile names cannot be empty"),
        ("profiles:\n  p:\n    pins: {a: [model]}\n", "profiles.p.pins.a", "expected a model name"),
        ("profiles: [p]\n", "profiles", "expected a mapping of profile ids to profiles"),
    ],
)
def test_profiles_validation(profile, key, message):
    """Ports TestConfig_Profiles_Validation ("legacy list", "empty pins"); errors name the file and the key."""
    with pytest.raises(ConfigError) as info:
        load("models:\n  model:\n    cmd: echo ${PORT}\n" + profile)
    err = info.value
    assert err.file == "c.yaml" and err.key == key and message in err.message, str(err)
    assert str(err).startswith(f"c.yaml: key '{key}': ")


def test_profile_pin_to_an_unknown_model_is_dropped_with_a_warning():
    """Ports TestConfig_Profiles_Validation "unknown target": llama-swap refuses the file; swapd warns, drops the pin.

    As for group members naming no model (docs/compatibility.md): one inconsistent
    entry does not stop the whole config.
    """
    cfg = load("models:\n  model:\n    cmd: echo ${PORT}\nprofiles:\n  bad:\n    pins:\n      public: missing\n")
    assert cfg.warnings == ("key 'profiles.bad.pins.public': 'missing' is not a defined model or selector; ignored",)
    assert dict(cfg.profiles["bad"].pins) == {}


def test_profiles_do_not_chain():
    """Ports TestConfig_Profiles_DoNotChain: a pin's target is never another pin."""
    cfg = load(
        "models:\n  base:\n    cmd: echo ${PORT}\n"
        "profiles:\n  test:\n    pins:\n      first: base\n      second: first\n"
    )
    assert cfg.warnings == ("key 'profiles.test.pins.second': 'first' is not a defined model or selector; ignored",)
    assert dict(cfg.profiles["test"].pins) == {"first": "base"}


def test_a_pin_may_not_take_a_peer_models_full_name():
    """Ports llama-swap's ValidatePeerNamespace rule for profile pins (internal/config/peer.go)."""
    with pytest.raises(ConfigError) as info:
        load(
            "models:\n  m:\n    cmd: echo ${PORT}\n"
            "peers:\n  remote:\n    proxy: http://example.com\n    models: [pm]\n"
            "profiles:\n  p:\n    pins:\n      remote/pm: m\n"
        )
    assert info.value.key == "profiles.p.pins.remote/pm" and "peer model's full name" in info.value.message


def test_profiles_are_no_longer_an_ignored_key():
    cfg = load("models:\n  m:\n    cmd: echo ${PORT}\nprofiles:\n  p:\n    pins: {a: m}\n")
    assert cfg.warnings == ()


# -- a real swapd ---------------------------------------------------------------------------


def _profile_models() -> dict:
    """llama-swap's profileTestConfig, with fake backends."""
    return {
        "real": model(
            "--model-id", "real", name="Real Model", filters={"setParamsByID": {"variant": {"thinking": True}}}
        ),
        "hidden": model("--model-id", "hidden", name="Hidden Model", unlisted=True),
    }


PROFILES = {
    "coding": {
        "description": "Coding profile",
        "pins": {
            "public": "variant",
            "disabled": None,
            "real": "hidden",
            "expose": "hidden",
            "remote-model": "hidden",
        },
    }
}
PEERS = {"remote": {"proxy": "http://127.0.0.1:9", "models": ["remote-model"]}}


def put_active(s, name) -> object:
    return s.request("PUT", "/api/profiles/active", body={"name": name})


def last_request(s, model_id: str) -> dict:
    """The last JSON request the model's backend got (its /x/last), asked directly, not through swapd."""
    proxy = s.running()[model_id]["proxy"]
    host, port = proxy.rsplit("/", 1)[-1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/x/last")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def test_profile_api(swapd):
    """Ports TestServer_ProfileAPI: listing, activating, 404 for an unknown profile, null deactivates."""
    s = swapd(_profile_models(), peers=PEERS, profiles=PROFILES)
    listed = s.get("/api/profiles").json()
    assert listed == {
        "active": None,  # none is active at start
        "profiles": [
            {
                "id": "coding",
                "description": "Coding profile",
                "pins": {"public": "variant", "disabled": "", "real": "hidden", "expose": "hidden", "remote-model": "hidden"},
            }
        ],
    }

    r = put_active(s, "coding")
    assert r.status == 200 and r.json() == {"active": "coding"}
    assert s.get("/api/profiles").json()["active"] == "coding"

    r = put_active(s, "missing")
    assert r.status == 404
    assert r.json()["error"] == {
        "message": "profile 'missing' not found",
        "type": "invalid_request_error",
        "param": None,
        "code": "profile_not_found",
    }
    assert s.get("/api/profiles").json()["active"] == "coding"

    r = put_active(s, None)
    assert r.status == 200 and r.json() == {"active": None}
    assert s.get("/api/profiles").json()["active"] is None


def test_profile_api_refuses_what_llama_swap_refuses(swapd):
    """llama-swap's handleAPIActiveProfile: bad JSON, no name, a name that is not a string: 400 each."""
    s = swapd({"m": model()}, profiles={"p": {"pins": {"a": "m"}}})
    put = lambda body: s.request("PUT", "/api/profiles/active", body=body, headers={"Content-Type": "application/json"})  # noqa: E731
    for body, message in (
        (b"{not json", "invalid profile request"),
        (b"[]", "invalid profile request"),
        (b"{}", "profile name is required"),
        (b'{"name": 3}', "profile name must be a string or null"),
    ):
        r = put(body)
        assert r.status == 400 and message in r.json()["error"]["message"], (body, r.body)
    assert put(b'{"name": "p"}').json() == {"active": "p"}
    assert put(b'{"name": ""}').json() == {"active": None}  # "" deactivates, as in llama-swap
    assert s.get("/api/profiles/active").status in (404, 405)  # PUT only


def test_pins_apply_before_aliases_and_filters(swapd):
    """Ports TestServer_ProfileMiddleware_JSONAndFilters: a pinned name resolves as its target, and 404 when off."""
    s = swapd(_profile_models(), peers=PEERS, profiles=PROFILES)
    assert put_active(s, "coding").status == 200

    r = s.chat("public")
    assert r.status == 200, r.body
    assert r.json()["model"] == "variant"  # the backend got the target's name
    assert list(s.running()) == ["real"]
    body = last_request(s, "real")["body"]
    assert body["model"] == "variant" and body["thinking"] is True  # setParamsByID keyed by the pinned target

    r = s.chat("disabled")
    assert r.status == 404
    assert r.json()["error"]["message"] == "model 'disabled' is switched off by the active profile 'coding'"

    r = s.chat("real")  # a pin wins over a model id
    assert r.status == 200 and r.json()["model"] == "hidden"
    assert "hidden" in s.running()

    # the activity rows carry the model that answered; a pin adds no selector metadata
    rows = wait_until(lambda: len(rows := s.get("/api/metrics/activity").json()["data"]) == 2 and rows)
    assert sorted(row["model"] for row in rows) == ["hidden", "real"]
    assert all("metadata" not in row for row in rows)


def test_pins_on_query_and_multipart_routes(swapd):
    """The pin applies wherever the model is named: the query string and a multipart form field."""
    s = swapd({"m1": model(), "m2": model()}, profiles={"p": {"pins": {"public": "m2"}}})
    assert put_active(s, "p").status == 200
    r = s.get("/props?model=public&x=1")
    assert "m2" in s.running() and "m1" not in s.running()
    assert r.status in (200, 404)  # whatever the fake answers: it reached m2's backend
    boundary = "XyZ"
    form = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\npublic\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\nabc\r\n--{boundary}--\r\n"
    ).encode()
    r = s.post("/v1/audio/transcriptions", form, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status == 200, r.body
    assert r.json()["model"] == "m2"  # the form's model field now names the target


def test_pins_on_upstream_paths_by_the_longest_prefix(swapd):
    """Ports TestServer_ProfileMiddleware_RewriteUpstreamPath and TestServer_Profile_UpstreamPreservesBody."""
    s = swapd(
        {"real": model("--model-id", "real"), "short": model("--model-id", "short")},
        profiles={"p": {"pins": {"public": "real", "author": "short", "author/public": "real", "disabled": ""}}},
    )
    assert put_active(s, "p").status == 200

    def answered_by(path: str) -> str:
        r = s.get(path)
        assert r.status == 200, (path, r.status, r.body)
        return r.json()["data"][0]["id"]  # the fake backend's /v1/models names its --model-id

    assert answered_by("/upstream/public/v1/models") == "real"  # pin
    assert answered_by("/upstream/author/public/v1/models") == "real"  # the longest pin wins
    assert answered_by("/upstream/author/v1/models") == "short"
    assert answered_by("/upstream/real/v1/models") == "real"  # not pinned
    r = s.get("/upstream/disabled/v1/models")
    assert r.status == 404 and "switched off" in r.json()["error"]["message"]

    # the body goes through unchanged (the model is in the path, not the body)
    r = s.post("/upstream/public/v1/chat/completions", {"model": "public", "messages": []})
    assert r.status == 200 and r.json()["model"] == "public"

    # the trailing-slash redirect keeps the pinned name, so the pin still applies to what follows
    r = s.get("/upstream/public?x=1")
    assert r.status == 301 and r.headers["location"] == "/upstream/public/?x=1"


def test_upstream_records_use_the_resolved_model(swapd):
    """Ports TestServer_Profile_UpstreamMetricsUseResolvedModel: the activity row names the real model."""
    s = swapd({"m1": model()}, profiles={"test": {"pins": {"public": "m1"}}})
    assert put_active(s, "test").status == 200
    r = s.post("/upstream/public/v1/chat/completions", {"model": "public", "messages": []})
    assert r.status == 200
    rows = wait_until(lambda: s.get("/api/metrics/activity").json()["data"], message="an activity row")
    assert len(rows) == 1 and rows[0]["model"] == "m1" and "metadata" not in rows[0]


def test_profile_model_listings(swapd):
    """Ports TestServer_Profile_ModelListings: the active profile's pins are listed; a name that is off is not."""
    s = swapd(_profile_models(), peers=PEERS, profiles=PROFILES)
    before = {r["id"] for r in s.get("/v1/models").json()["data"]}
    assert "public" not in before and "expose" not in before
    assert put_active(s, "coding").status == 200
    records = {r["id"]: r for r in s.get("/v1/models").json()["data"]}
    assert "public" in records and "name" not in records["public"]
    assert records["public"]["meta"]["llamaswap"] == {"type": "profile"}
    assert records["public"]["status"] == {"value": "unloaded"}
    assert records["real"]["name"] == "Real Model"  # a pinned model id keeps its own record
    assert records["remote/remote-model"]["name"] == "remote: remote-model"
    assert "expose" in records and "name" not in records["expose"]
    assert "disabled" not in records and "hidden" not in records
    assert list(records) == sorted(records)


def test_profile_management_uses_the_concrete_model(swapd):
    """Ports TestServer_Profile_ManagementUsesConcreteModel: unloading by id ignores pins."""
    s = swapd(_profile_models(), peers=PEERS, profiles=PROFILES)
    assert s.chat("real").status == 200  # no profile yet: the real model
    assert put_active(s, "coding").status == 200
    assert s.post("/api/models/unload/real", b"").status == 200
    assert "real" not in s.running()


def test_profile_concurrent_selection_and_listing(swapd):
    """Ports TestServer_Profile_ConcurrentSelectionAndListing: switching while listing never fails."""
    s = swapd(_profile_models(), peers=PEERS, profiles=PROFILES)
    failures: list[object] = []

    def worker(n: int) -> None:
        for _ in range(25):
            r = put_active(s, "coding" if n % 2 == 0 else None)
            listing = s.get("/v1/models")
            if r.status != 200 or listing.status != 200:
                failures.append((r.status, listing.status))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def _reload(s, doc: dict) -> None:
    s.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    s.proc.send_signal(signal.SIGHUP)


def test_reload_keeps_the_active_profile_while_it_exists(swapd):
    s = swapd({"m1": model(), "m2": model()}, profiles={"p": {"pins": {"public": "m1"}}, "q": {"pins": {"x": "m2"}}})
    assert put_active(s, "p").status == 200
    doc = yaml.safe_load(s.config_path.read_text())
    doc["profiles"]["p"]["pins"]["public"] = "m2"  # the same profile, a different pin
    _reload(s, doc)
    wait_until(lambda: s.get("/api/profiles").json()["profiles"][0]["pins"]["public"] == "m2", message="reload")
    assert s.get("/api/profiles").json()["active"] == "p"
    assert s.chat("public").json()["model"] == "m2" and list(s.running()) == ["m2"]

    del doc["profiles"]["p"]
    _reload(s, doc)
    wait_until(lambda: [p["id"] for p in s.get("/api/profiles").json()["profiles"]] == ["q"], message="reload")
    assert s.get("/api/profiles").json()["active"] is None  # gone from the config: none is active
    assert s.chat("public").status == 404
    assert any(e.get("event") == "profile.dropped" and e.get("profile") == "p" for e in s.log_events())


def test_profile_changes_reach_the_event_stream(swapd):
    """llama-swap's /api/events sends the active profile at once and a ``profileChanged`` on each change."""
    s = swapd({"m": model()}, profiles={"p": {"pins": {"a": "m"}}})
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
    try:
        conn.request("GET", "/api/events?no-history")
        resp = conn.getresponse()

        def next_record() -> dict:
            while True:
                line = resp.readline()
                assert line, "event stream ended"
                if line.startswith(b"data:"):
                    envelope = json.loads(line[5:])
                    return {"type": envelope["type"], "payload": json.loads(envelope["data"])}

        first, second = next_record(), next_record()
        assert first["type"] == "modelStatus"
        assert second == {"type": "profileChanged", "payload": {"active": None}}
        assert put_active(s, "p").status == 200
        record = next_record()
        while record["type"] != "profileChanged":
            record = next_record()
        assert record["payload"] == {"active": "p"}
    finally:
        conn.close()
