"""The core loop end to end: swapd as a real process, fake backends as real processes."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import subprocess
import threading
import time

import psutil
import pytest

from helpers import PY, ROOT, backend_stats, model, stream_then_hang_up, tagged_processes, wait_until


def _events(s, name):
    return [e for e in s.log_events() if e.get("event") == name]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- routing -----------------------------------------------------------------


def test_chat_starts_backend_on_demand_and_answers(swapd):
    s = swapd({"m1": model(aliases=["first"])})
    assert s.running() == {}
    r = s.chat("m1")
    assert r.status == 200, r.body
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"].startswith("tok0")
    assert s.running()["m1"]["state"] == "ready"
    # an alias reaches the same, already running backend
    pid = s.running()["m1"]["pid"]
    assert s.chat("first").status == 200
    assert s.running()["m1"]["pid"] == pid
    for path in ("/v1/completions", "/v1/embeddings"):
        r = s.post(path, {"model": "m1", "prompt": "x", "input": "x"})
        assert r.status == 200, (path, r.body)
    assert s.post("/v1/embeddings", {"model": "m1", "input": ["a", "b"]}).json()["data"][1]["index"] == 1


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"model": "nope", "messages": []}, 404, "model_not_found"),
        ({"messages": []}, 404, "model_not_found"),
        ({"model": 7}, 404, "model_not_found"),
        ({"model": ""}, 404, "model_not_found"),
        ([1, 2], 400, "invalid_body"),
        (b"{not json", 400, "invalid_json"),
    ],
)
def test_bad_model_gets_openai_error(swapd, body, status, code):
    s = swapd({"m1": model()})
    r = s.post("/v1/chat/completions", body)
    assert r.status == status
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error" and err["message"]
    assert s.running() == {}, "a bad request must not start anything"
    assert s.get("/health").status == 200


def test_text_plain_error_variant(swapd):
    s = swapd({"m1": model()})
    r = s.post("/v1/chat/completions", {"model": "nope"}, headers={"Accept": "text/plain"})
    assert r.status == 404
    assert r.headers["content-type"].startswith("text/plain")
    assert r.body.startswith(b"swapd: ")


def test_hundred_megabyte_body_passes_intact(swapd):
    s = swapd({"m1": model()})
    filler = "A" * (100 * 1024 * 1024)
    raw = json.dumps({"model": "m1", "x_echo": True, "messages": [{"role": "user", "content": filler}]}).encode()
    r = s.post("/v1/chat/completions", raw, headers={"Content-Type": "application/json"}, timeout=120)
    assert r.status == 200, r.body[:300]
    out = r.json()
    assert out["x_body_bytes"] == len(raw)
    assert out["x_body_sha256"] == hashlib.sha256(raw).hexdigest()


def test_use_model_name_rewrites_the_body(swapd):
    s = swapd({"m1": model(useModelName="served-name")})
    r = s.chat("m1")
    assert r.json()["model"] == "served-name"


def test_readiness_is_noticed_quickly(swapd):
    s = swapd({"slow": model("--load-delay", "1.0")})
    t0 = time.monotonic()
    r = s.chat("slow")
    elapsed = time.monotonic() - t0
    assert r.status == 200
    assert elapsed >= 1.0
    # Process start (~0.3 s for Python) plus the 1 s load; llama-swap's 1 s
    # poll would add up to another second. Generous bound for shared machines.
    assert elapsed < 2.5, elapsed
    ready = _events(s, "backend.ready")[0]
    assert ready["model"] == "slow" and ready["seconds"] >= 1.0


# -- streaming ---------------------------------------------------------------


def test_stream_chunks_arrive_as_emitted(swapd):
    s = swapd({"m1": model("--chunks", "6", "--interval", "0.25")})
    status, headers, events = s.stream("m1")
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["x-accel-buffering"] == "no"
    assert events[-1][1] == "[DONE]"
    tokens = [t for t, data in events if data != "[DONE]" and json.loads(data)["choices"][0]["delta"].get("content")]
    assert len(tokens) == 6
    gaps = [b - a for a, b in zip(tokens, tokens[1:])]
    # Unbuffered: each token arrives about one interval after the previous one.
    assert all(g > 0.1 for g in gaps), gaps
    assert tokens[-1] - tokens[0] > 1.0


def test_client_disconnect_closes_upstream_at_once(swapd):
    s = swapd({"m1": model("--chunks", "400", "--interval", "0.05")})
    s.chat("m1")  # warm
    t_closed = stream_then_hang_up(s.port, "m1")
    backend_port = int(s.running()["m1"]["proxy"].rsplit(":", 1)[1])

    def cancelled():
        stats = backend_stats(backend_port)
        return stats["streams_cancelled"] == 1 and stats["in_flight"] == 0

    wait_until(cancelled, timeout=5, message="the backend to see the stream cancelled")
    # 400 chunks at 50 ms would run 20 s; the cancel must arrive within a few chunks.
    assert time.monotonic() - t_closed < 2.0
    # The lease was returned: a swap to nothing else is possible and TTL logic sees it idle.
    assert wait_until(lambda: s.running()["m1"]["in_flight"] == 0, timeout=5)


# -- swapping and lifecycle -------------------------------------------------


def test_default_group_swaps_one_model_at_a_time(swapd):
    s = swapd({"a": model(), "b": model()})
    assert s.chat("a").status == 200
    pid_a = s.running()["a"]["pid"]
    assert s.chat("b").status == 200
    running = s.running()
    assert list(running) == ["b"]
    assert wait_until(lambda: _gone(pid_a), timeout=5)
    stop = _events(s, "backend.stop")[0]
    assert stop["model"] == "a" and stop["reason"] == "swap"


def test_swap_waits_for_in_flight_request(swapd):
    s = swapd({"a": model(), "b": model()})
    s.chat("a")
    results = {}

    def slow_a():
        results["a"] = (s.chat("a", x_sleep=1.5), time.monotonic())

    t = threading.Thread(target=slow_a)
    t.start()
    wait_until(lambda: s.running()["a"]["in_flight"] == 1, message="a in flight")
    rb = s.chat("b")
    t_b = time.monotonic()
    t.join()
    ra, t_a = results["a"]
    assert ra.status == 200 and rb.status == 200
    assert t_a <= t_b, "b must not be served before a's in-flight request finished"


def test_concurrent_cold_requests_cause_one_start(swapd):
    s = swapd({"m1": model("--load-delay", "0.5")})
    out = []
    threads = [threading.Thread(target=lambda: out.append(s.chat("m1").status)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [200] * 8
    assert len(_events(s, "backend.start")) == 1


def test_exit_at_start_fails_fast_with_code_and_output(swapd):
    s = swapd({"bad": model("--exit-at-start", "7", healthCheckTimeout=60)})
    t0 = time.monotonic()
    r = s.chat("bad")
    assert time.monotonic() - t0 < 3.0, "must not wait for healthCheckTimeout"
    assert r.status == 502
    msg = r.json()["error"]["message"]
    assert "code 7" in msg and "exiting at startup with code 7" in msg
    assert s.running() == {}


def test_health_timeout_reports_and_cleans_up(swapd):
    s = swapd({"never": model("--load-delay", "600")}, healthCheckTimeout=15)
    # healthCheckTimeout has a floor of 15 s (llama-swap); use a per-request check instead
    t0 = time.monotonic()
    r = s.chat("never")
    assert r.status == 502
    assert "healthCheckTimeout" in r.json()["error"]["message"]
    assert 14 < time.monotonic() - t0 < 25
    assert s.running() == {}


def test_crash_mid_stream_then_restart(swapd):
    s = swapd({"m1": model("--chunks", "10", "--interval", "0.05", "--crash-after-chunks", "3")})
    status, _, events = s.stream("m1")
    assert status == 200
    assert events, "some chunks arrived before the crash"
    assert events[-1][1] != "[DONE]"
    assert "error" in json.loads(events[-1][1]), "the stream ends with an error event"
    wait_until(lambda: "m1" not in s.running(), timeout=5, message="crashed model to be stopped")
    assert _events(s, "backend.crashed")[0]["exit_code"] == 3
    r = s.chat("m1")
    assert r.status == 200
    assert len(_events(s, "backend.start")) == 2


def test_crash_while_request_in_flight_gets_502(swapd):
    s = swapd({"m1": model("--exit-after", "1.0")})
    r = s.chat("m1", x_sleep=5)
    assert r.status == 502
    assert r.json()["error"]["type"] == "server_error"
    wait_until(lambda: "m1" not in s.running(), timeout=5)


# -- stopping for real -------------------------------------------------------


def test_sigterm_ignored_means_sigkill_after_unload_timeout(swapd):
    s = swapd({"stubborn": model("--ignore-sigterm", unloadTimeout=1)})
    s.chat("stubborn")
    pid = s.running()["stubborn"]["pid"]
    t0 = time.monotonic()
    assert s.get("/unload").status == 200
    elapsed = time.monotonic() - t0
    assert _gone(pid)
    assert 0.9 < elapsed < 5, elapsed
    kill = _events(s, "backend.sigkill")[0]
    assert pid in kill["pids"]


def test_cmd_stop_runs_with_pid(swapd, tmp_path):
    marker = tmp_path / "stopped-pid"
    stopper = (
        f"{PY} -c \"import os,sys,signal; open(sys.argv[1],'w').write(sys.argv[2]); "
        f"os.kill(int(sys.argv[2]), signal.SIGTERM)\" {marker} ${{PID}}"
    )
    s = swapd({"m1": model(cmdStop=stopper)})
    s.chat("m1")
    pid = s.running()["m1"]["pid"]
    s.get("/unload")
    assert marker.read_text() == str(pid)
    assert _gone(pid)


@pytest.mark.parametrize("setsid", [False, True], ids=["child", "setsid-child"])
def test_stop_kills_forked_descendants(swapd, setsid):
    opts = ["--fork-child"] + (["--fork-child-setsid"] if setsid else [])
    s = swapd({"m1": model(*opts)})
    s.chat("m1")
    line = wait_until(lambda: [l for l in s.get("/logs").body.decode().splitlines() if "child pid" in l], timeout=5)
    child = int(line[0].rsplit(" ", 1)[1])
    assert psutil.pid_exists(child)
    s.get("/unload")
    assert wait_until(lambda: _gone(child), timeout=5)
    assert not tagged_processes(s.tag)


def test_orphan_is_reaped_when_wrapper_exits(swapd):
    """A wrapper that exits leaves its child re-parented to swapd (subreaper), which kills and reaps it."""
    s = swapd({"m1": model("--fork-child", "--fork-child-setsid", "--exit-after", "1.5")})
    s.chat("m1")
    swapd_proc = psutil.Process(s.proc.pid)
    wait_until(lambda: "m1" not in s.running(), timeout=6, message="wrapper exit noticed")
    # the orphan belonged to the crashed backend and was killed with it
    assert wait_until(lambda: not tagged_processes(s.tag), timeout=5)
    zombies = [c for c in swapd_proc.children() if c.status() == psutil.STATUS_ZOMBIE]
    assert wait_until(lambda: not [c for c in swapd_proc.children() if c.status() == psutil.STATUS_ZOMBIE], timeout=3), zombies


def test_backends_die_when_swapd_is_killed(swapd):
    s = swapd({"m1": model()})
    s.chat("m1")
    pid = s.running()["m1"]["pid"]
    s.proc.kill()
    s.proc.wait()
    assert wait_until(lambda: _gone(pid), timeout=5), "PR_SET_PDEATHSIG must take the backend down"


def test_sigterm_stops_every_backend(swapd):
    s = swapd({"a": model(), "b": model()}, groups={"both": {"swap": False, "members": ["a", "b"]}})
    s.chat("a")
    s.chat("b")
    pids = [e["pid"] for e in s.running().values()]
    assert len(pids) == 2
    assert s.terminate() == 0
    assert all(_gone(p) for p in pids)
    stops = {e["model"] for e in _events(s, "backend.stop")}
    assert stops == {"a", "b"}


# -- TTL ---------------------------------------------------------------------


def test_ttl_unloads_idle_model_and_status_calls_do_not_reset_it(swapd):
    s = swapd({"m1": model(ttl=1)})
    s.chat("m1")
    pid = s.running()["m1"]["pid"]
    t0 = time.monotonic()
    while "m1" in s.running():  # polling status endpoints must not keep it alive
        s.get("/v1/models")
        s.get("/health")
        s.get("/logs")
        assert time.monotonic() - t0 < 5, "TTL did not fire"
        time.sleep(0.1)
    assert 0.8 < time.monotonic() - t0 < 5
    assert wait_until(lambda: _gone(pid), timeout=3)
    assert _events(s, "backend.stop")[0]["reason"] == "ttl"


def test_ttl_counts_from_end_of_last_request(swapd):
    s = swapd({"m1": model(ttl=1)})
    r = s.chat("m1", x_sleep=2)  # longer than the TTL
    assert r.status == 200
    t_end = time.monotonic()
    assert "m1" in s.running(), "must not unload while a request is in flight"
    wait_until(lambda: "m1" not in s.running(), timeout=5)
    assert time.monotonic() - t_end > 0.8


def test_global_ttl_is_the_default(swapd):
    s = swapd({"m1": model()}, globalTTL=1)
    s.chat("m1")
    wait_until(lambda: "m1" not in s.running(), timeout=5, message="globalTTL unload")


def test_running_shows_the_ttl_countdown(swapd):
    s = swapd(
        {"a": model(ttl=30), "b": model(ttl=0)},
        groups={"both": {"swap": False, "members": ["a", "b"]}},
    )
    assert s.chat("a").status == 200
    assert s.chat("b").status == 200
    running = s.running()
    assert 25 <= running["a"]["ttl_remaining"] <= 30, running["a"]
    assert running["b"]["ttl_remaining"] is None  # ttl 0: no timer, the model stays
    first = running["a"]["ttl_remaining"]
    time.sleep(0.3)
    assert s.running()["a"]["ttl_remaining"] < first, "the countdown runs"
    # while a request is in flight no timer is armed
    done = threading.Event()
    t = threading.Thread(target=lambda: (s.chat("a", x_sleep=1.5), done.set()))
    t.start()
    wait_until(lambda: s.running()["a"]["in_flight"] == 1, message="a in flight")
    assert s.running()["a"]["ttl_remaining"] is None
    t.join()
    assert done.is_set()
    again = s.running()["a"]["ttl_remaining"]
    assert again is not None and 29 <= again <= 30, "the clock starts again from the end of the request"


# -- endpoints -----------------------------------------------------------------


def test_models_list_is_built_from_config(swapd):
    s = swapd({"zeta": model(), "alpha": model(name="Alpha", description="first"), "hidden": model(unlisted=True)})
    r = s.get("/v1/models")
    assert r.status == 200
    doc = r.json()
    assert doc["object"] == "list"
    assert [m["id"] for m in doc["data"]] == ["alpha", "zeta"]
    alpha = doc["data"][0]
    assert alpha["object"] == "model" and alpha["owned_by"] and isinstance(alpha["created"], int)
    assert alpha["name"] == "Alpha" and alpha["description"] == "first"
    assert s.get("/models").json()["data"] == doc["data"] or [m["id"] for m in s.get("/models").json()["data"]] == ["alpha", "zeta"]
    assert s.running() == {}, "listing models must not start any"


def test_unload_stops_everything(swapd):
    s = swapd({"m1": model()})
    s.chat("m1")
    pid = s.running()["m1"]["pid"]
    r = s.get("/unload")
    assert r.status == 200
    assert s.running() == {}
    assert _gone(pid)


def test_unknown_route_is_openai_404(swapd):
    s = swapd({"m1": model()})
    r = s.get("/nope")
    assert r.status == 404
    assert r.json()["error"]["type"] == "invalid_request_error"


# -- logging -----------------------------------------------------------------


def test_logs_are_json_lines_with_lifecycle_events(swapd):
    s = swapd({"m1": model("--log-lines", "3")})
    s.chat("m1")
    s.get("/unload")
    names = [e["event"] for e in s.log_events()]
    for expected in ("swapd.listening", "backend.start", "backend.ready", "request", "backend.stop"):
        assert expected in names, (expected, names)
    req = _events(s, "request")[0]
    assert req["model"] == "m1" and req["status"] == 200 and req["total_s"] >= 0
    logs = s.get("/logs").body.decode()
    assert "[m1] fake_backend: listening on" in logs


def test_backend_output_flood_is_bounded(swapd):
    s = swapd({"m1": model("--log-lines", "20000")})
    assert s.chat("m1").status == 200
    lines = s.get("/logs").body.decode().splitlines()
    assert 100 < len(lines) <= 2000


# -- CLI -------------------------------------------------------------------------


def _run_cli(*args, timeout=20):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([PY, "-m", "swapd", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_version_flag_both_spellings():
    from swapd import __version__

    for flag in ("--version", "-version"):
        out = _run_cli(flag)
        assert out.returncode == 0
        assert __version__ in out.stdout


def test_bad_config_exits_nonzero_with_one_clear_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("models:\n  m1:\n    cmd: run ${NOPE}\n")
    out = _run_cli("-config", str(cfg))
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    line = out.stderr.strip()
    assert "\n" not in line
    assert str(cfg) in line or "bad.yaml" in line
    assert "m1" in line and "cmd" in line


def test_single_dash_flags_and_all_interfaces(tmp_path):
    from helpers import free_port, write_config

    cfg = write_config(tmp_path / "c.yaml", {"m1": model()}, "none")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [PY, "-m", "swapd", "-config", str(cfg), "-listen", f":{port}", "--log-format", "json"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, cwd=ROOT, text=True,
    )
    try:
        line = proc.stderr.readline()
        while "swapd.listening" not in line:
            line = proc.stderr.readline()
            assert line, "swapd exited"
        event = json.loads(line)
        assert event["address"] == f"*:{port}"
        assert "all interfaces" in event["hint"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_default_listen_is_loopback_and_says_how_to_open_up():
    from swapd.cli import build_parser, parse_listen

    args = build_parser().parse_args([])
    assert args.listen == ("127.0.0.1", 8080)
    assert parse_listen(":9000") == (None, 9000)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    with pytest.raises(Exception):
        parse_listen("nonsense")


# -- reload ----------------------------------------------------------------------


def _rewrite(s, models, **top):
    from helpers import write_config
    import yaml

    old = yaml.safe_load(s.config_path.read_text())
    top = {"startPort": old["startPort"], "healthCheckTimeout": old["healthCheckTimeout"], **top}
    write_config(s.config_path, models, s.tag, **top)


def test_sighup_reload_restarts_only_changed_models(swapd):
    group = {"all": {"swap": False, "members": ["a", "b"]}}
    s = swapd({"a": model(), "b": model()}, groups=group)
    s.chat("a")
    s.chat("b")
    pid_a = s.running()["a"]["pid"]
    pid_b = s.running()["b"]["pid"]
    _rewrite(s, {"a": model(), "b": model("--chunks", "3"), "c": model()},
             groups={"all": {"swap": False, "members": ["a", "b", "c"]}})
    s.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: _events(s, "config.reloaded"), timeout=10, message="reload")
    changes = _events(s, "config.reloaded")[0]
    assert changes["changed"] == ["b"] and changes["added"] == ["c"] and changes["removed"] == []
    running = s.running()
    assert running["a"]["pid"] == pid_a, "an unchanged model keeps running"
    assert "b" not in running and _gone(pid_b)
    assert "c" in [m["id"] for m in s.get("/v1/models").json()["data"]]
    # b restarts with its new command
    assert s.chat("b").json()["choices"][0]["message"]["content"].count("tok") == 3


def test_bad_reload_keeps_old_config(swapd):
    s = swapd({"a": model()})
    s.config_path.write_text("models: [this is not a mapping")
    s.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: _events(s, "config.reload_failed"), timeout=10, message="reload failure")
    assert s.chat("a").status == 200


def test_watch_config_reloads_on_change(swapd):
    s = swapd({"a": model()}, extra_args=("--watch-config",))
    _rewrite(s, {"a": model(), "fresh": model()})
    wait_until(lambda: _events(s, "config.reloaded"), timeout=10, message="watch reload")
    assert s.chat("fresh").status == 200
