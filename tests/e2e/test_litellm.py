"""LiteLLM's proxy in front of swapd, with the configs in packaging/litellm/ as they are.

The configs read swapd's address from environment variables
(``os.environ/SWAPD_API_BASE`` and so on), so the files run unchanged; the
tests only set those variables. LiteLLM runs from its own virtualenv
(``.venv-litellm``, or ``$SWAPD_LITELLM_VENV``). Both LiteLLM processes start
once for the module and at the same time, because each takes 10 to 30 s.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import time

import pytest

from e2e_util import http_wait, stop_process, stop_swapd
from helpers import ROOT, free_port, model

PACKAGING = ROOT / "packaging" / "litellm"


def _start_litellm(exe, config, env_extra, tmp):
    port = free_port()
    env = dict(os.environ)
    env.update(env_extra)
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no network fetch at start
    env.pop("DATABASE_URL", None)
    env.pop("LITELLM_MASTER_KEY", None)
    log = tmp / f"litellm-{config.stem}.log"
    proc = subprocess.Popen(
        [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=tmp,
    )
    return proc, port, log


@pytest.fixture(scope="module")
def stack(module_swapd, litellm_bin, tmp_path_factory):
    one = module_swapd({"smollm2": model("--chunks", "6", "--interval", "0.2"), "fast": model()})
    a = module_swapd({"smollm2": model()})
    b = module_swapd({"smollm2": model()})
    tmp = tmp_path_factory.mktemp("litellm")
    single = _start_litellm(litellm_bin, PACKAGING / "config.yaml", {"SWAPD_API_BASE": f"{one.base}/v1"}, tmp)
    pair = _start_litellm(
        litellm_bin, PACKAGING / "two-swapd.yaml",
        {"SWAPD_A_API_BASE": f"{a.base}/v1", "SWAPD_B_API_BASE": f"{b.base}/v1"}, tmp,
    )
    try:
        for proc, port, log in (single, pair):
            http_wait(f"http://127.0.0.1:{port}/health/readiness", timeout=180, proc=proc, log=log)
        yield {"one": one, "a": a, "b": b, "single": single[1], "pair": pair[1], "logs": (single[2], pair[2])}
    finally:
        stop_process(single[0])
        stop_process(pair[0])


def _post(port, body, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if not body.get("stream"):
            return resp.status, resp.read()
        events = []
        while True:
            line = resp.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                events.append((time.monotonic(), line[6:].strip().decode()))
        return resp.status, events
    finally:
        conn.close()


def _chat(model_id, **extra):
    return {"model": model_id, "messages": [{"role": "user", "content": "hi"}], **extra}


def test_non_streaming_through_litellm(stack):
    status, body = _post(stack["single"], _chat("fast"))
    assert status == 200, body[:500]
    doc = json.loads(body)
    assert doc["choices"][0]["message"]["content"].startswith("tok0")
    assert "fast" in stack["one"].running(), "swapd started the model LiteLLM asked for"


def test_streaming_through_litellm_arrives_chunk_by_chunk(stack):
    status, events = _post(stack["single"], _chat("smollm2", stream=True))
    assert status == 200, events
    assert events[-1][1] == "[DONE]"
    tokens = [t for t, data in events[:-1] if (json.loads(data)["choices"] or [{}])[0].get("delta", {}).get("content")]
    assert len(tokens) == 6
    gaps = [b - a for a, b in zip(tokens, tokens[1:])]
    # LiteLLM holds back the first few chunks of a stream (seen: the first 3
    # arrive together); after that each chunk must come as the model emits it.
    assert sum(g > 0.1 for g in gaps) >= 2, f"LiteLLM delivered the stream bunched up: {gaps}"
    assert tokens[-1] - tokens[0] > 0.4, gaps


def test_litellm_does_not_health_check_models(stack):
    """Background health checks are off: nothing but real requests starts a model."""
    time.sleep(3)
    for name in ("a", "b"):
        # a and b get their first traffic in the load-balancing test below
        assert stack[name].running() == {}, f"LiteLLM started a model on swapd {name} by itself"


def _backend_requests(s) -> int:
    """Chat requests the instance's backend has served (its /x/stats counts itself once per call)."""
    r = s.get("/upstream/smollm2/x/stats")
    assert r.status == 200, r.body
    return r.json()["requests"]


def test_two_swapd_load_balance_and_fall_back(stack):
    a, b, port = stack["a"], stack["b"], stack["pair"]
    base_a, base_b = _backend_requests(a), _backend_requests(b)
    n = 16
    for i in range(n):
        status, body = _post(port, _chat("smollm2", stream=i % 2 == 1))
        assert status == 200, body
    served_a = _backend_requests(a) - base_a - 1
    served_b = _backend_requests(b) - base_b - 1
    assert served_a + served_b == n, (served_a, served_b)
    assert served_a > 0 and served_b > 0, f"one instance got all the traffic: a={served_a} b={served_b}"

    # Take instance b away: every request must still succeed, on a.
    assert not stop_swapd(b)
    before = _backend_requests(a)
    for i in range(6):
        status, body = _post(port, _chat("smollm2", stream=i % 2 == 1))
        assert status == 200, body
    assert _backend_requests(a) - before - 1 == 6
