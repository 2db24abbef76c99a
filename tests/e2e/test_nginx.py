"""swapd behind nginx, run with packaging/nginx/swapd.conf itself.

The file is a conf.d snippet (an ``upstream {}`` and a ``server {}``). The test
writes a minimal main nginx.conf that includes it; the only lines changed are
the two marked ``# EDIT:``, which get this test's ports.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import time

import pytest

from e2e_util import http_wait, stop_process
from helpers import ROOT, backend_stats, free_port, model, stream_then_hang_up, wait_until

SNIPPET = ROOT / "packaging" / "nginx" / "swapd.conf"


def render_snippet(nginx_port: int, swapd_port: int) -> str:
    """The packaged file with only its two EDIT lines pointed at this test's ports."""
    out = []
    edits = {"listen": 0, "server": 0}
    for line in SNIPPET.read_text().splitlines(keepends=True):
        if "# EDIT:" not in line:
            out.append(line)
            continue
        code, comment = line.split("#", 1)
        indent = code[: len(code) - len(code.lstrip())]
        directive = code.split()[0]
        assert directive in edits, f"unexpected EDIT line: {line!r}"
        edits[directive] += 1
        address = f"127.0.0.1:{nginx_port}" if directive == "listen" else f"127.0.0.1:{swapd_port}"
        out.append(f"{indent}{directive} {address};  #{comment}")
    assert edits == {"listen": 1, "server": 1}, edits
    return "".join(out)


def main_conf(tmp, snippet_path) -> str:
    user = "user root root;\n" if os.geteuid() == 0 else ""  # workers must reach the 0700 tmp dir
    temps = "\n".join(f"    {kind}_temp_path {tmp / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""{user}worker_processes 1;
daemon off;
pid {tmp / 'nginx.pid'};
error_log {tmp / 'error.log'} info;
events {{ worker_connections 256; }}
http {{
    access_log {tmp / 'access.log'};
{temps}
    include {snippet_path};
}}
"""


@pytest.fixture(scope="module")
def stack(module_swapd, nginx_bin, tmp_path_factory):
    """swapd (fake backends) behind nginx; yields (swapd, nginx_port)."""
    s = module_swapd(
        {
            "paced": model("--chunks", "8", "--interval", "0.25"),
            "long": model("--chunks", "400", "--interval", "0.05"),
            "echo": model(),
        },
        groups={"all": {"swap": False, "members": ["paced", "long", "echo"]}},
    )
    tmp = tmp_path_factory.mktemp("nginx")
    port = free_port()
    snippet = tmp / "conf.d" / "swapd.conf"
    snippet.parent.mkdir()
    snippet.write_text(render_snippet(port, s.port))
    conf = tmp / "nginx.conf"
    conf.write_text(main_conf(tmp, snippet))
    check = subprocess.run([nginx_bin, "-t", "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    log = tmp / "nginx.out"
    proc = subprocess.Popen([nginx_bin, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        http_wait(f"http://127.0.0.1:{port}/health", timeout=20, proc=proc, log=tmp / "error.log")
        yield s, port
    finally:
        stop_process(proc)


def _stream(port: int, model_id: str):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"model": model_id, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    events = []
    while True:
        line = resp.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            events.append((time.monotonic(), line[6:].strip().decode()))
    conn.close()
    return resp, events


def test_the_packaged_file_is_what_nginx_runs():
    rendered = render_snippet(1, 2)
    original = SNIPPET.read_text()
    changed = [(a, b) for a, b in zip(original.splitlines(), rendered.splitlines()) if a != b]
    assert len(changed) == 2 and len(original.splitlines()) == len(rendered.splitlines())
    for needed in ("proxy_buffering off;", "proxy_cache off;", "proxy_request_buffering off;", "gzip off;",
                   "proxy_http_version 1.1;", 'proxy_set_header Connection "";', "keepalive 32;"):
        assert needed in original, needed


def test_tokens_stream_through_unbuffered(stack):
    s, port = stack
    resp, events = _stream(port, "paced")
    assert resp.status == 200
    assert resp.getheader("Content-Type", "").startswith("text/event-stream")
    assert events[-1][1] == "[DONE]"
    tokens = [t for t, data in events if data != "[DONE]" and json.loads(data)["choices"][0]["delta"].get("content")]
    assert len(tokens) == 8
    gaps = [b - a for a, b in zip(tokens, tokens[1:])]
    assert all(g > 0.1 for g in gaps), f"chunks arrived bunched up, nginx buffered them: {gaps}"
    assert tokens[-1] - tokens[0] > 1.4


def test_fifty_megabyte_body_passes(stack):
    s, port = stack
    raw = json.dumps({"model": "echo", "x_echo": True,
                      "messages": [{"role": "user", "content": "B" * (50 * 1024 * 1024)}]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/chat/completions", body=raw, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status == 200, body[:300]
    out = json.loads(body)
    assert out["x_body_bytes"] == len(raw)
    assert out["x_body_sha256"] == hashlib.sha256(raw).hexdigest()


def test_upstream_connections_are_kept_alive(stack):
    s, port = stack
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(5):
        conn.request("GET", "/v1/models")
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()
    conn.close()

    def swapd_peers():
        # connections from nginx to swapd's port, as seen from the nginx side
        out = subprocess.run(["ss", "-Htn", "state", "established", f"dport = :{s.port}"], capture_output=True, text=True)
        return out.stdout.strip().splitlines()

    if subprocess.run(["which", "ss"], capture_output=True).returncode != 0:
        pytest.skip("ss (iproute2) is not installed")
    assert swapd_peers(), "nginx closed its upstream connection instead of keeping it alive"


def test_client_disconnect_through_nginx_cancels_generation(stack):
    s, port = stack
    s.chat("long", max_tokens=1)  # warm it up
    backend_port = int(s.running()["long"]["proxy"].rsplit(":", 1)[1])

    def stats():
        return backend_stats(backend_port)

    before = stats()["streams_cancelled"]
    t_closed = stream_then_hang_up(port, "long")
    wait_until(lambda: stats()["streams_cancelled"] == before + 1 and stats()["in_flight"] == 0, timeout=5,
               message="the backend to see the stream cancelled through nginx")
    # 400 chunks at 50 ms would run 20 s; nginx must pass the hang-up on at once.
    assert time.monotonic() - t_closed < 2.0


def test_web_ui_works_at_a_sub_path(stack, open_page):
    """The packaged file's /swapd/ location: the UI loads, lists, loads a model and streams, all under /swapd/."""
    s, port = stack
    base = f"http://127.0.0.1:{port}/swapd/"
    assert s.post("/api/models/unload", {}).status == 200  # earlier tests of the module leave models running
    p = open_page(base)
    p.page.goto(base)
    assert p.page.url == base + "ui/"
    p.page.wait_for_selector("tr[data-model=echo][data-state=stopped]")
    p.page.locator("tr[data-model=echo] [data-testid=load]").click()
    p.page.wait_for_selector("tr[data-model=echo][data-state=ready]")
    assert s.running()["echo"]["state"] == "ready"
    p.page.goto(base + "ui/#/playground")
    p.page.wait_for_function("() => document.querySelector('[data-testid=pg-model]')?.options.length === 3")
    p.page.select_option("[data-testid=pg-model]", "paced")
    p.page.fill("[data-testid=pg-input]", "hi")
    p.page.click("[data-testid=pg-send]")
    p.page.wait_for_selector("[data-testid=pg-stats]", timeout=30000)
    assert p.page.locator("[data-testid=pg-assistant] .text").inner_text().split() == [f"tok{i}" for i in range(8)]
    paths = p.paths()
    assert paths and all(path.startswith("/swapd/") for path in paths), paths  # open_page checks they are public
