"""The Host allowlist behind the shipped nginx config: nginx passes the client's Host through.

So a keyless swapd behind nginx refuses a DNS-rebound name just as it does
direct, and a name listed in ``allowedHosts`` passes.
"""

from __future__ import annotations

import http.client
import subprocess

import pytest

from e2e_util import http_wait, stop_process
from helpers import free_port, model
from test_nginx import main_conf, render_snippet


@pytest.fixture(scope="module")
def proxied(module_swapd, nginx_bin, tmp_path_factory):
    s = module_swapd({"echo": model()}, allowedHosts=["swapd.example.org"])
    tmp = tmp_path_factory.mktemp("nginx-hosts")
    port = free_port()
    snippet = tmp / "conf.d" / "swapd.conf"
    snippet.parent.mkdir()
    snippet.write_text(render_snippet(port, s.port))
    conf = tmp / "nginx.conf"
    conf.write_text(main_conf(tmp, snippet))
    proc = subprocess.Popen([nginx_bin, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        http_wait(f"http://127.0.0.1:{port}/health", timeout=20, proc=proc, log=tmp / "error.log")
        yield port
    finally:
        stop_process(proc)


def _get(port: int, path: str, host: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_nginx_passes_the_host_and_swapd_checks_it(proxied):
    assert _get(proxied, "/running", f"127.0.0.1:{proxied}") == 200
    assert _get(proxied, "/running", "localhost") == 200
    assert _get(proxied, "/running", "swapd.example.org") == 200
    assert _get(proxied, "/running", "attacker.example") == 403
    assert _get(proxied, "/unload", "attacker.example") == 403
