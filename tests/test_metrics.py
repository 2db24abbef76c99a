"""``GET /metrics`` end to end: a real swapd, real fake backends, parsed with prometheus_client's own parser."""

from __future__ import annotations

import time

import pytest
from helpers import model, wait_until
from nvml_stub import stub_dir_for, stub_env
from prometheus_client.parser import text_string_to_metric_families

MIB = 1024 * 1024


def scrape(s, headers=None) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    r = s.get("/metrics", headers=headers)
    assert r.status == 200, r.body
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(r.body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples, metric, **labels) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


def test_request_and_token_counts_are_exact_for_plain_and_streamed_answers(swapd):
    s = swapd({"m": model(), "alias-target": model(aliases=["nick"])})
    plain = s.chat("m", max_tokens=3)
    assert plain.status == 200
    prompt_plain = plain.json()["usage"]["prompt_tokens"]
    # a stream with OpenAI's include_usage (vLLM's way), and one with llama-server's timings
    status, _, events = s.stream("m", max_tokens=4, stream_options={"include_usage": True})
    assert status == 200 and '"usage"' in events[-2][1]
    status, _, events = s.stream("m", max_tokens=5, x_timings=True)
    assert status == 200 and '"timings"' in events[-2][1]
    # a stream that carries no usage at all: counted as a request, tokens untouched
    status, _, _ = s.stream("m", path="/v1/completions", max_tokens=6)
    assert status == 200
    # an alias counts under the real model id
    assert s.chat("nick", max_tokens=2).status == 200

    m = scrape(s)
    assert value(m, "swapd_requests_total", model="m", status="200") == 4
    assert value(m, "swapd_requests_total", model="alias-target", status="200") == 1
    assert value(m, "swapd_completion_tokens_total", model="m") == 3 + 4 + 5
    timings_prompt = None
    for _, data in events:
        if '"timings"' in data:
            import json

            timings_prompt = json.loads(data)["timings"]["prompt_n"]
    assert value(m, "swapd_prompt_tokens_total", model="m") == prompt_plain + 1 + timings_prompt
    assert value(m, "swapd_completion_tokens_total", model="alias-target") == 2
    # time to first token: once per stream (three streams), never for the plain answers
    assert value(m, "swapd_time_to_first_token_seconds_count", model="m") == 3
    assert value(m, "swapd_time_to_first_token_seconds_count", model="alias-target") == 0
    assert value(m, "swapd_request_duration_seconds_count", model="m") == 4
    # tokens/s: llama-server's own 25 tok/s for the timings stream; the include_usage stream is timed by swapd
    assert value(m, "swapd_generation_tokens_per_second_count", model="m") == 2
    assert (
        value(m, "swapd_generation_tokens_per_second_bucket", model="m", le="30.0")
        - value(m, "swapd_generation_tokens_per_second_bucket", model="m", le="20.0")
        >= 1
    )
    assert value(m, "swapd_model_starts_total", model="m") == 1
    assert value(m, "swapd_model_start_seconds_count", model="m") == 1
    # the default group swaps: asking for the alias's model stopped m
    assert value(m, "swapd_model_state", model="alias-target", state="ready") == 1
    assert value(m, "swapd_model_state", model="m", state="stopped") == 1
    assert value(m, "swapd_model_state", model="m", state="ready") == 0
    assert value(m, "swapd_model_stops_total", model="m", reason="swap") == 1
    assert value(m, "swapd_in_flight_requests", model="m") == 0


def test_failures_are_counted_with_their_status(swapd):
    s = swapd({"m": model(), "bad": {"cmd": "false", "proxy": "http://127.0.0.1:9"}})
    assert s.chat("bad").status == 502  # the start fails
    assert s.chat("nope").status == 404  # no model: nothing to count it under
    m = scrape(s)
    assert value(m, "swapd_requests_total", model="bad", status="502") == 1
    assert value(m, "swapd_model_start_failures_total", model="bad") == 1
    assert not [k for k in m if k[0] == "swapd_requests_total" and ("model", "nope") in k[1]]
    assert value(m, "swapd_model_state", model="bad", state="stopped") == 1


def test_stops_are_counted_with_their_reasons(swapd):
    s = swapd(
        {"a": model(ttl=1), "b": model(), "c": model(), "d": model("--crash-after-chunks", "1")},
        groups={"one": {"swap": True, "exclusive": True, "members": ["b", "c"]}},
    )
    assert s.chat("a").status == 200
    wait_until(
        lambda: value(scrape(s), "swapd_model_stops_total", model="a", reason="ttl") == 1,
        timeout=20,
        message="the ttl stop counted",
    )
    assert s.chat("b").status == 200
    assert s.chat("c").status == 200  # b is swapped out
    assert s.post("/api/models/unload/c", {}).status == 200
    s.stream("d", max_tokens=3)  # the backend dies after its first chunk
    wait_until(
        lambda: value(scrape(s), "swapd_model_stops_total", model="d", reason="crash") == 1,
        timeout=20,
        message="the crash counted",
    )
    m = scrape(s)
    assert value(m, "swapd_model_stops_total", model="b", reason="swap") == 1
    assert value(m, "swapd_model_stops_total", model="c", reason="unload") == 1
    assert value(m, "swapd_model_starts_total", model="b") == 1
    # a stop of a model that was not running is not a stop
    assert s.post("/api/models/unload/c", {}).status == 200
    assert value(scrape(s), "swapd_model_stops_total", model="c", reason="unload") == 1


def test_polling_metrics_never_keeps_a_model_alive(swapd):
    s = swapd({"m": model(ttl=1)})
    assert s.chat("m").status == 200
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        m = scrape(s)
        if value(m, "swapd_model_state", model="m", state="stopped") == 1:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the model was kept alive by /metrics polling")
    assert value(m, "swapd_model_stops_total", model="m", reason="ttl") == 1
    assert value(m, "swapd_model_starts_total", model="m") == 1  # polling started nothing


def test_metrics_need_the_api_key(swapd):
    s = swapd({"m": model()}, apiKeys=["sk-metrics"])
    assert s.get("/metrics").status == 401
    m = scrape(s, headers={"Authorization": "Bearer sk-metrics"})
    assert value(m, "swapd_model_state", model="m", state="stopped") == 1


@pytest.fixture(scope="module")
def nvml_lib(request, tmp_path_factory):
    return stub_dir_for(request, tmp_path_factory)


def test_vram_per_model_and_gpu_gauges_from_the_stub_nvml(swapd, nvml_lib, tmp_path):
    state = tmp_path / "nvml-state"
    state.mkdir()
    (state / "sensors").write_text("57 83 41")
    (state / "power").write_text("212 300")
    s = swapd({"a": model("--vram-mib", "1500")}, env=stub_env(nvml_lib, state))
    assert s.chat("a").status == 200
    m = wait_until(
        lambda: (lambda m: m if value(m, "swapd_vram_used_bytes", model="a", gpu="0") else None)(scrape(s)),
        timeout=15,
        message="VRAM of model a in /metrics",
    )
    assert value(m, "swapd_vram_used_bytes", model="a", gpu="0") == 1500 * MIB
    gpu = {k[1]: v for k, v in m.items() if k[0] == "llamaswap_gpu_temperature_celsius"}
    assert list(gpu.values()) == [57.0]
    labels = dict(next(iter(gpu)))
    assert labels["id"] == "0" and labels["name"] and "uuid" in labels
    assert value(m, "llamaswap_gpu_util_percent", **labels) == 83
    assert value(m, "llamaswap_gpu_memory_util_percent", **labels) == 41
    assert value(m, "llamaswap_gpu_power_draw_watts", **labels) == 212
    # the performance gauges are the latest sample (every performance.every, 5 s here), as in llama-swap
    m = wait_until(
        lambda: (lambda m: m if value(m, "llamaswap_gpu_memory_used_bytes", **labels) >= 1500 * MIB else None)(
            scrape(s)
        ),
        timeout=15,
        message="a performance sample taken with model a loaded",
    )
    assert value(m, "llamaswap_memory_total_bytes") > 0
    assert any(k[0] == "llamaswap_load_average" for k in m)
    assert s.post("/api/models/unload/a", {}).status == 200
    m = scrape(s)
    assert value(m, "swapd_vram_verifications_total", outcome="freed") == 1
    assert value(m, "swapd_vram_used_bytes", model="a", gpu="0") == 0


def test_performance_disabled_drops_llama_swaps_gauges(swapd):
    s = swapd({"m": model()}, performance={"disabled": True})
    m = scrape(s)
    assert not [k for k in m if k[0].startswith("llamaswap_")]
    assert value(m, "swapd_model_state", model="m", state="stopped") == 1


def test_a_peer_request_is_counted_under_the_peer_model(swapd, tmp_path):
    import subprocess
    import sys

    from helpers import free_port, healthy

    port = free_port()
    backend = subprocess.Popen([sys.executable, "-m", "swapd.fake_backend", "--port", str(port), "--quiet"])
    try:
        wait_until(lambda: healthy(port), message="the peer's backend")
        s = swapd({"m": model()}, peers={"lan": {"proxy": f"http://127.0.0.1:{port}", "models": ["remote-x"]}})
        assert s.chat("lan/remote-x", max_tokens=4).status == 200
        m = scrape(s)
        assert value(m, "swapd_requests_total", model="lan/remote-x", status="200") == 1
        assert value(m, "swapd_completion_tokens_total", model="lan/remote-x") == 4
    finally:
        backend.terminate()
        backend.wait(10)


def test_a_reload_that_changes_a_model_counts_a_reload_stop(swapd):
    import signal

    import yaml
    from helpers import write_config

    s = swapd({"a": model(), "b": model()})
    assert s.chat("a").status == 200
    old = yaml.safe_load(s.config_path.read_text())
    write_config(
        s.config_path,
        {"a": model("--chunks", "3"), "b": model()},
        s.tag,
        startPort=old["startPort"],
        healthCheckTimeout=old["healthCheckTimeout"],
    )
    s.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: value(scrape(s), "swapd_model_stops_total", model="a", reason="reload") == 1,
        timeout=15,
        message="the reload stop counted",
    )
    m = scrape(s)
    assert value(m, "swapd_model_state", model="a", state="stopped") == 1
    assert value(m, "swapd_requests_total", model="a", status="200") == 1  # counts survive a reload
