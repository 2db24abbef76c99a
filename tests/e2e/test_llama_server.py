"""swapd in front of a real llama.cpp llama-server running SmolLM2-135M-Instruct.

llama-server and the GGUF come from `swapd setup`'s own code (the ``llama``
fixture): built and downloaded on a fresh machine, cached afterwards. Two
model entries run the same GGUF with different settings, so swapping between
them starts and stops real llama-server processes.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time

import psutil
import pytest
import yaml

from helpers import ROOT, wait_until

LOAD_TIMEOUT = 120  # seconds; SmolLM2 loads in about one, but CI machines are shared
THREADS = "1"  # one thread: robust when the 2 cores are shared with other work


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def llama_entry(llama, *, ctx: int = 1024, parallel: int = 2, **keys) -> dict:
    words = [shlex.quote(str(llama.server)), "--host 127.0.0.1 --port ${PORT}",
             "-m", shlex.quote(str(llama.model)), f"-c {ctx} -np {parallel} -t {THREADS}"]
    if llama.has("--no-webui"):
        words.append("--no-webui")
    if llama.has("--no-slots"):
        pass  # /slots is on by default
    elif llama.has("--slots"):
        words.append("--slots")
    entry = {"cmd": " ".join(words), "proxy": "http://127.0.0.1:${PORT}"}
    entry.update(keys)
    return entry


@pytest.fixture
def two(swapd, llama):
    """swapd with two entries on the same GGUF: ``smol`` (2 slots) and ``smol-small`` (1 slot, smaller context)."""
    return swapd({"smol": llama_entry(llama), "smol-small": llama_entry(llama, ctx=512, parallel=1)},
                 healthCheckTimeout=LOAD_TIMEOUT)


def _content(events):
    """(arrival time, text) of each streamed content delta, and the last chunk's llama.cpp timings."""
    tokens, timings = [], None
    for t, data in events:
        if data == "[DONE]":
            continue
        doc = json.loads(data)
        timings = doc.get("timings") or timings
        for choice in doc.get("choices") or []:
            text = (choice.get("delta") or {}).get("content")
            if text:
                tokens.append((t, text))
    return tokens, timings


def test_non_streaming_chat(two):
    r = two.chat("smol", max_tokens=24, temperature=0)
    assert r.status == 200, r.body[:500]
    doc = r.json()
    assert doc["object"] == "chat.completion"
    assert doc["choices"][0]["message"]["content"].strip()
    assert doc["usage"]["completion_tokens"] > 0
    assert two.running()["smol"]["state"] == "ready"


def test_streaming_tokens_arrive_over_time(two):
    status, headers, events = two.stream("smol", max_tokens=64, ignore_eos=True, temperature=0)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert events[-1][1] == "[DONE]"
    tokens, timings = _content(events)
    assert len(tokens) >= 32, len(tokens)
    arrivals = [t for t, _ in tokens]
    span = arrivals[-1] - arrivals[0]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    # Arriving one by one as generated: most gaps are real (not a burst of
    # one buffered write), and the arrivals cover most of the generation time
    # llama-server itself measured.
    assert sorted(gaps)[len(gaps) // 2] > 0.0005, f"tokens arrived in bursts: {gaps}"
    if timings and timings.get("predicted_ms"):
        generated_s = timings["predicted_ms"] / 1000
        assert span > 0.5 * generated_s, (span, generated_s)
    assert span > 0.02, span


def test_swap_between_entries_stops_the_first_process(two):
    assert two.chat("smol", max_tokens=4).status == 200
    pid_a = two.running()["smol"]["pid"]
    assert psutil.Process(pid_a).name().startswith("llama-server")
    r = two.chat("smol-small", max_tokens=4)
    assert r.status == 200, r.body[:300]
    assert list(two.running()) == ["smol-small"]
    assert wait_until(lambda: _gone(pid_a), timeout=10, message="the first llama-server to exit")
    pid_b = two.running()["smol-small"]["pid"]
    assert pid_b != pid_a and not _gone(pid_b)


def test_ttl_unloads_the_real_process(swapd, llama):
    s = swapd({"smol": llama_entry(llama, ttl=2)}, healthCheckTimeout=LOAD_TIMEOUT)
    assert s.chat("smol", max_tokens=4).status == 200
    pid = s.running()["smol"]["pid"]
    t_done = time.monotonic()
    wait_until(lambda: "smol" not in s.running(), timeout=15, message="TTL unload")
    assert time.monotonic() - t_done > 1.5
    assert wait_until(lambda: _gone(pid), timeout=10, message="llama-server to be gone")


def test_upstream_reaches_llama_server_endpoints(two):
    r = two.get("/upstream/smol/health")  # starts the model
    assert r.status == 200, r.body[:300]
    assert r.json().get("status") == "ok"
    props = two.get("/upstream/smol/props")
    assert props.status == 200
    doc = props.json()
    assert doc["total_slots"] == 2
    assert doc["model_path"].endswith(".gguf")
    slots = two.get("/upstream/smol/slots")
    if slots.status == 501:
        pytest.skip("this llama-server has /slots disabled")
    assert slots.status == 200
    assert len(slots.json()) == 2


def test_concurrent_streams_share_the_slots(two):
    two.chat("smol", max_tokens=1)  # load first, so both streams start together
    pid = two.running()["smol"]["pid"]
    results: dict[str, list] = {}

    def run(name):
        status, _, events = two.stream("smol", max_tokens=64, ignore_eos=True, temperature=0)
        results[name] = (status, _content(events)[0])

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    (sa, ta), (sb, tb) = results["a"], results["b"]
    assert sa == 200 and sb == 200
    assert len(ta) >= 32 and len(tb) >= 32
    a0, a1, b0, b1 = ta[0][0], ta[-1][0], tb[0][0], tb[-1][0]
    # With 2 slots both generate at once: each stream's first token comes
    # before the other's last. One slot would serve them one after the other.
    assert a0 < b1 and b0 < a1, (a0, a1, b0, b1)
    overlap = min(a1, b1) - max(a0, b0)
    assert overlap > 0.3 * min(a1 - a0, b1 - b0), overlap
    assert two.running()["smol"]["pid"] == pid, "one llama-server served both"


def test_setup_is_cached_and_its_config_serves_the_model(swapd, llama, tmp_path):
    """`swapd setup` again is quick, and the config it writes (the README's) streams a reply."""
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "swapd", "setup", "--quiet"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - t0 < 30, "a second `swapd setup` must use the cache"
    config_path = out.stdout.strip().splitlines()[-1]
    quick = yaml.safe_load(open(config_path))
    from swapd.config import load_config

    load_config(config_path)
    models = quick["models"]
    assert list(models) == ["smollm2"]
    s = swapd(models, healthCheckTimeout=quick["healthCheckTimeout"])
    status, _, events = s.stream("smollm2", max_tokens=16)
    assert status == 200
    tokens, _ = _content(events)
    assert tokens and events[-1][1] == "[DONE]"
    r = s.chat("smollm2-135m", max_tokens=4)  # swapd's alias for it
    assert r.status == 200
    assert "gguf" not in r.json()["model"], "llama-server answers with the --alias name, not the file path"


def test_client_disconnect_stops_llama_server_generating(swapd, llama):
    """Closing the client connection mid-stream frees llama-server's slot at once."""
    import socket

    # One slot with room for 4000 tokens: tens of seconds of generation if nothing stops it.
    two = swapd({"smol": llama_entry(llama, ctx=4200, parallel=1)}, healthCheckTimeout=LOAD_TIMEOUT)
    two.chat("smol", max_tokens=1)

    def busy():
        return [slot["id"] for slot in two.get("/upstream/smol/slots").json() if slot["is_processing"]]

    sock = socket.create_connection(("127.0.0.1", two.port))
    body = json.dumps({"model": "smol", "stream": True, "max_tokens": 4000, "ignore_eos": True,
                       "messages": [{"role": "user", "content": "Count to ten thousand."}]}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while got.count(b"data: ") < 5:
        got += sock.recv(4096)
    assert busy(), "the slot is generating while the client reads"
    sock.close()
    t_closed = time.monotonic()
    wait_until(lambda: not busy(), timeout=10, interval=0.05, message="llama-server to stop generating")
    # 4000 tokens take far longer; the slot must be freed within a moment.
    assert time.monotonic() - t_closed < 5
    assert wait_until(lambda: two.running()["smol"]["in_flight"] == 0, timeout=5)


def test_metrics_count_the_real_servers_tokens(two):
    """/metrics token counters equal what llama-server itself reported, plain and streamed."""
    from prometheus_client.parser import text_string_to_metric_families

    r = two.chat("smol", max_tokens=12, temperature=0)
    assert r.status == 200, r.body[:500]
    usage = r.json()["usage"]
    status, _, events = two.stream("smol", max_tokens=20, ignore_eos=True, temperature=0)
    assert status == 200
    _, timings = _content(events)
    assert timings, "llama-server sent no timings in its last chunk"
    samples = {}
    for family in text_string_to_metric_families(two.get("/metrics").body.decode()):
        for s in family.samples:
            if s.labels.get("model") == "smol":
                samples[(s.name, s.labels.get("status", ""), s.labels.get("le", ""))] = s.value
    assert samples[("swapd_requests_total", "200", "")] == 2
    assert samples[("swapd_completion_tokens_total", "", "")] == usage["completion_tokens"] + timings["predicted_n"]
    assert samples[("swapd_prompt_tokens_total", "", "")] == usage["prompt_tokens"] + timings["prompt_n"]
    assert samples[("swapd_time_to_first_token_seconds_count", "", "")] == 1
    # llama-server's own predicted_per_second for the stream, and its timings for the plain answer too
    assert samples[("swapd_generation_tokens_per_second_count", "", "")] >= 1
