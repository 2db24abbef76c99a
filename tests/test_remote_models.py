"""Remote models: a model with ``proxy`` and no ``cmd`` is a server swapd did not start (issue 18).

The "remote" endpoint in these tests is the fake backend started by the test
itself (a real HTTP server process swapd knows only by its address), with
``--api-key`` so that the credential swap is checked by the server that
enforces it.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers import PY, ROOT, free_port, model, start_fake_server, start_swapd, wait_until, write_config

from swapd.config import ConfigError, load_config_text

REMOTE_KEY = "sk-remote-secret-123"
SWAPD_KEY = "sk-swapd-key-456"


@pytest.fixture
def remote():
    """A running OpenAI-compatible server that swapd does not start, which wants REMOTE_KEY."""
    proc, port = start_fake_server("--chunks", "5", "--interval", "0.05", "--api-key", REMOTE_KEY)
    yield port
    proc.kill()
    proc.wait()


# -- config ----------------------------------------------------------------------------


def test_a_model_with_proxy_and_no_cmd_loads_as_remote():
    for cmd in (None, "", "# only a comment\n# and another\n"):
        entry = {"proxy": "https://openrouter.ai/api/v1", "headers": {"Authorization": "Bearer x"}}
        if cmd is not None:
            entry["cmd"] = cmd
        text = json.dumps({"models": {"local": {"cmd": "llama-server --port ${PORT} -m /m.gguf"}, "router": entry}})
        config = load_config_text(text, "config.yaml")
        assert config.models["router"].remote and config.models["router"].cmd == ()
        assert not config.models["local"].remote
        assert config.models["router"].headers == (("Authorization", "Bearer x"),)


def test_neither_cmd_nor_proxy_is_an_error_naming_the_model():
    for entry in ({}, {"cmd": ""}, {"cmd": "# nothing\n"}, {"name": "x"}):
        with pytest.raises(ConfigError) as err:
            load_config_text(json.dumps({"models": {"empty": entry}}), "config.yaml")
        message = str(err.value)
        assert "config.yaml" in message and "'empty'" in message and "'cmd'" in message and "proxy" in message


def test_bad_headers_are_config_errors():
    for headers, fragment in (({"Bad Name": "x"}, "not a valid HTTP header name"),
                              ({"Host": "x"}, "sets Host itself"),
                              ({"X-A": "a\nb"}, "line breaks"),
                              ({"X-A": ["a"]}, "expected a string")):
        doc = {"models": {"r": {"proxy": "http://127.0.0.1:1", "headers": headers}}}
        with pytest.raises(ConfigError) as err:
            load_config_text(json.dumps(doc), "config.yaml")
        assert "'r'" in str(err.value) and "headers." in str(err.value) and fragment in str(err.value)


def test_groups_and_preload_ignore_remote_models_with_a_warning():
    doc = {
        "models": {"local": {"cmd": "srv --port ${PORT}"}, "r": {"proxy": "http://127.0.0.1:1"}},
        "groups": {"g": {"members": ["local", "r"]}},
        "hooks": {"on_startup": {"preload": ["r"]}},
    }
    config = load_config_text(json.dumps(doc), "config.yaml")
    assert config.groups["g"].members == ("local",)
    assert config.preload == ()
    assert any("remote model" in w and "groups ignore it" in w for w in config.warnings)
    assert any("remote model" in w and "preload" in w for w in config.warnings)


def test_swapd_exits_with_the_config_error(tmp_path):
    path = write_config(tmp_path / "config.yaml", {"broken": {"name": "no cmd, no proxy"}}, "tag")
    out = subprocess.run([PY, "-m", "swapd", "--config", str(path)], capture_output=True, text=True, timeout=30,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 2
    assert str(path) in out.stderr and "model 'broken'" in out.stderr and "key 'cmd'" in out.stderr


# -- serving ---------------------------------------------------------------------------


def test_remote_model_streams_with_its_headers_and_own_key(swapd, remote, monkeypatch):
    monkeypatch.setenv("SWAPD_TEST_TITLE", "swapd-tests")
    s = swapd(
        {
            "local": model(),
            "cloud": {"proxy": f"http://127.0.0.1:{remote}/v1", "apiKey": REMOTE_KEY,
                      "headers": {"X-Title": "${env.SWAPD_TEST_TITLE}", "HTTP-Referer": "${site}/cloud"}},
        },
        apiKeys=[SWAPD_KEY],
        macros={"site": "https://swapd.test"},
    )
    auth = {"Authorization": f"Bearer {SWAPD_KEY}"}
    r = s.post("/v1/chat/completions", {"model": "cloud", "x_echo": True, "messages": []}, headers=auth)
    assert r.status == 200, r.body
    out = r.json()
    assert out["x_path"] == "/v1/chat/completions"  # proxy ends in /v1: not doubled
    seen = out["x_headers"]
    assert seen["Authorization"] == f"Bearer {REMOTE_KEY}"  # the model's key replaced the client's
    assert seen["X-Title"] == "swapd-tests" and seen["HTTP-Referer"] == "https://swapd.test/cloud"
    assert SWAPD_KEY not in json.dumps(seen)

    conn = s.connection()
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"model": "cloud", "stream": True, "messages": []}),
                 headers={**auth, "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/event-stream")
    body = resp.read().decode()
    conn.close()
    assert body.count("tok") == 5 and body.rstrip().endswith("data: [DONE]")

    # /upstream reaches the remote's own paths; never started, never in /running
    assert s.get("/upstream/cloud/v1/models", headers=auth).status == 200
    running = json.loads(s.get("/running", headers=auth).body)["running"]
    assert [r["model"] for r in running] == []
    listed = {m["id"]: m for m in json.loads(s.get("/v1/models", headers=auth).body)["data"]}
    assert listed["cloud"]["status"] == {"value": "remote"}
    assert listed["cloud"]["meta"]["llamaswap"]["remote"] == f"http://127.0.0.1:{remote}/v1"
    assert listed["local"]["status"] == {"value": "unloaded"}

    # the remote's key never reaches swapd's log
    assert REMOTE_KEY not in s.log_text()
    # counted like any other model
    rows = lambda: [r for r in json.loads(s.get("/api/metrics/activity", headers=auth).body)["data"]  # noqa: E731
                    if r["model"] == "cloud"]
    wait_until(lambda: len(rows()) == 2, timeout=10, message="two activity rows for the remote model")
    assert {r["tokens"]["output_tokens"] for r in rows()} >= {5}


def test_client_key_passes_through_without_a_model_key(swapd, remote):
    """No apiKey on the model: the client's own credential goes to the remote, as to any backend."""
    s = swapd({"cloud": {"proxy": f"http://127.0.0.1:{remote}"}})
    ok = s.post("/v1/chat/completions", {"model": "cloud", "messages": []},
                headers={"Authorization": f"Bearer {REMOTE_KEY}"})
    assert ok.status == 200, ok.body
    refused = s.post("/v1/chat/completions", {"model": "cloud", "messages": []},
                     headers={"Authorization": "Bearer wrong"})
    assert refused.status == 401
    err = refused.json()["error"]
    assert "cloud" in err["message"] and "refused" in err["message"] and err["code"] == "remote_auth_failed"
    assert "wrong" not in s.log_text() and REMOTE_KEY not in s.log_text()


def test_a_remote_that_is_down_is_a_named_502(swapd):
    dead = free_port()
    s = swapd({"cloud": {"proxy": f"http://127.0.0.1:{dead}/v1"}, "local": model()})
    r = s.chat("cloud")
    assert r.status == 502
    err = r.json()["error"]
    assert "cloud" in err["message"] and err["type"] == "server_error"
    assert s.chat("local").status == 200  # swapd keeps serving
    status, _, events = s.stream("cloud")
    assert status == 502


def test_remote_models_take_no_part_in_swaps_or_ttl(swapd, remote):
    s = swapd(
        {"a": model(), "b": model(), "cloud": {"proxy": f"http://127.0.0.1:{remote}", "apiKey": REMOTE_KEY, "ttl": 1}},
        groups={"solo": {"swap": True, "members": ["a", "b", "cloud"]}},
    )
    assert s.chat("a").status == 200
    assert s.chat("cloud").status == 200
    assert "a" in s.running(), "a request to a remote model swapped a local one out"
    assert s.chat("b").status == 200
    assert set(s.running()) == {"b"}
    assert s.chat("cloud").status == 200


def test_ollama_clients_reach_remote_models(swapd, remote):
    s = swapd({"cloud": {"proxy": f"http://127.0.0.1:{remote}/v1", "apiKey": REMOTE_KEY}})
    conn = s.connection()
    conn.request("POST", "/api/chat", body=json.dumps({"model": "cloud", "stream": False,
                                                       "messages": [{"role": "user", "content": "hi"}]}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = json.loads(resp.read())
    conn.close()
    assert resp.status == 200, out
    assert out["message"]["content"].split() == [f"tok{i}" for i in range(5)] and out["done"]
    tags = json.loads(s.get("/api/tags").body)["models"]
    assert [t["name"] for t in tags] == ["cloud"]
    assert json.loads(s.get("/api/ps").body)["models"] == []


def test_reload_turns_a_local_model_remote_and_back(tmp_path, remote):
    s = start_swapd(tmp_path, {"m": model()})
    try:
        assert s.chat("m").status == 200 and "m" in s.running()
        write_config(s.config_path, {"m": {"proxy": f"http://127.0.0.1:{remote}", "apiKey": REMOTE_KEY}}, s.tag)
        s.proc.send_signal(__import__("signal").SIGHUP)
        wait_until(lambda: "m" not in s.running(), timeout=15, message="the local process to stop")
        wait_until(lambda: s.chat("m").status == 200, timeout=10, message="the remote model to answer")
        write_config(s.config_path, {"m": model()}, s.tag)
        s.proc.send_signal(__import__("signal").SIGHUP)
        wait_until(lambda: json.loads(s.get("/v1/models").body)["data"][0]["status"]["value"] == "unloaded",
                   timeout=15, message="the model to be local again")
        assert s.chat("m").status == 200 and "m" in s.running()
    finally:
        assert s.terminate() == 0


def test_the_issues_config_a_header_carries_the_key(swapd, remote, monkeypatch):
    """The user's config from issue 18: no cmd, a proxy, and the key in an Authorization header from the env."""
    monkeypatch.setenv("OPENROUTER_API_KEY", REMOTE_KEY)
    s = swapd({
        "local": model(),
        "openrouter-laguna": {"proxy": f"http://127.0.0.1:{remote}/v1",
                              "headers": {"Authorization": "Bearer ${env.OPENROUTER_API_KEY}"}},
    })
    r = s.post("/v1/chat/completions", {"model": "openrouter-laguna", "x_echo": True, "messages": []},
               headers={"Authorization": "Bearer the-clients-own"})
    assert r.status == 200, r.body
    assert r.json()["x_headers"]["Authorization"] == f"Bearer {REMOTE_KEY}"
    assert REMOTE_KEY not in s.log_text()


def test_a_profile_pin_switches_a_name_to_a_remote_model(swapd, remote):
    """llama-swap's design for remote models (#299, #433): a profile switches a name to the cloud and back."""
    s = swapd(
        {"local": model(), "cloud": {"proxy": f"http://127.0.0.1:{remote}/v1", "apiKey": REMOTE_KEY}},
        profiles={"away": {"description": "laptop mode", "pins": {"local": "cloud"}}},
    )
    assert s.post("/v1/chat/completions", {"model": "local", "messages": []}).status == 200
    assert "local" in s.running()
    assert s.request("PUT", "/api/profiles/active", {"name": "away"}).json() == {"active": "away"}
    r = s.post("/v1/chat/completions", {"model": "local", "x_echo": True, "messages": []})
    assert r.status == 200, r.body
    assert r.json()["x_headers"]["Authorization"] == f"Bearer {REMOTE_KEY}"  # it went to the remote
    wait_until(lambda: [x for x in s.get("/api/metrics/activity").json()["data"] if x["model"] == "cloud"],
               timeout=10, message="the pinned request counted under the remote model")
    assert s.request("PUT", "/api/profiles/active", {"name": None}).json() == {"active": None}
    r = s.post("/v1/chat/completions", {"model": "local", "x_echo": True, "messages": []})
    assert "x_headers" in r.json() and r.json()["x_headers"].get("Authorization") != f"Bearer {REMOTE_KEY}"
