"""Soak test: mixed traffic with swaps and TTL expiries, watching for leaks.

    python bench/soak.py --minutes 30 [--json bench/results/soak.json]

Starts swapd with three fake-backend models in one swap group (short TTLs so
models expire and restart), drives streaming and non-streaming requests from
several client threads, some of which hang up mid-stream, sends SIGHUP
reloads, and samples swapd's file descriptors, asyncio tasks, child processes
and RSS every minute from ``/api/status``. At the end it prints the samples
and whether each series stayed flat (last value within a small margin of the
first steady one), and exits non-zero if one grew.

Traffic goes only to 127.0.0.1; every loop is bounded by the duration.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body=None, timeout=120, stream=False, hang_up_after=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        if not stream:
            return resp.status, resp.read()
        lines = 0
        while True:
            line = resp.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                lines += 1
                if hang_up_after is not None and lines >= hang_up_after:
                    return resp.status, b"hung up"
        return resp.status, b""
    finally:
        conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "soak.json"))
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="swapd-soak-"))
    fake = f"{PY} -m swapd.fake_backend --port ${{PORT}} --quiet"
    config = {
        "healthCheckTimeout": 30,
        "startPort": free_port(),
        "models": {
            "a": {"cmd": f"{fake} --chunks 20 --interval 0.01", "ttl": 3},
            "b": {"cmd": f"{fake} --chunks 20 --interval 0.01 --load-delay 0.3", "ttl": 3},
            "c": {"cmd": f"{fake} --chunks 10 --interval 0.02 --fork-child", "ttl": 5},
        },
    }
    import yaml

    cfg_path = workdir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(workdir / "swapd.log", "wb")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([PY, "-m", "swapd", "--config", str(cfg_path), "--listen", f"127.0.0.1:{port}",
                             "--log-format", "json"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + 30
    while True:
        try:
            if request(port, "GET", "/health", timeout=2)[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            print("swapd did not start", file=sys.stderr)
            return 2
        time.sleep(0.1)

    end = time.monotonic() + args.minutes * 60
    counts = {"ok": 0, "error": 0, "hung_up": 0, "status": {}}
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < end:
            model = rng.choice("aabbc")
            kind = rng.random()
            try:
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                if kind < 0.45:
                    status, _ = request(port, "POST", "/v1/chat/completions", {**body, "stream": True}, stream=True)
                elif kind < 0.55:
                    status, _ = request(port, "POST", "/v1/chat/completions", {**body, "stream": True},
                                        stream=True, hang_up_after=3)
                    with lock:
                        counts["hung_up"] += 1
                else:
                    status, _ = request(port, "POST", "/v1/chat/completions", body)
                with lock:
                    counts["ok" if status == 200 else "error"] += 1
                    counts["status"][str(status)] = counts["status"].get(str(status), 0) + 1
            except OSError as exc:
                with lock:
                    counts["error"] += 1
                    counts["status"][type(exc).__name__] = counts["status"].get(type(exc).__name__, 0) + 1
            # idle gaps long enough for TTLs to expire now and then
            time.sleep(rng.choice((0, 0, 0.05, 0.2, 4.0)))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()

    samples = []
    next_sample = time.monotonic()
    reloads = 0
    while time.monotonic() < end:
        if time.monotonic() >= next_sample:
            status = json.loads(request(port, "GET", "/api/status")[1])
            status["t_min"] = round((time.monotonic() - (end - args.minutes * 60)) / 60, 2)
            samples.append(status)
            print(f"[{status['t_min']:6.2f} min] fds={status['fds']} tasks={status['tasks']} "
                  f"children={len(status['children'])} rss={status['rss_bytes'] / 2**20:.1f} MiB "
                  f"swaps={status['swaps']} ok={counts['ok']} errors={counts['error']}", flush=True)
            next_sample += 60
            if len(samples) % 5 == 0:
                proc.send_signal(signal.SIGHUP)
                reloads += 1
        time.sleep(1)
    for t in threads:
        t.join(180)
    time.sleep(8)  # let TTLs expire so the final sample is idle like the first
    final = json.loads(request(port, "GET", "/api/status")[1])
    final["t_min"] = "end (idle)"
    samples.append(final)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)

    def flat(key, margin):
        values = [s[key] if not isinstance(s[key], list) else len(s[key]) for s in samples]
        return values, values[-1] <= values[0] + margin

    verdict = {}
    for key, margin in (("fds", 4), ("tasks", 3), ("children", 1), ("rss_bytes", 16 * 2**20)):
        values, ok = flat(key, margin)
        verdict[key] = {"first": values[0], "last": values[-1], "max": max(values), "flat": ok}
    report = {
        "minutes": args.minutes,
        "clients": args.clients,
        "requests": counts,
        "reloads": reloads,
        "swapd_exit_code": code,
        "samples": samples,
        "verdict": verdict,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps({"requests": counts, "verdict": verdict, "exit_code": code}, indent=2))
    return 0 if all(v["flat"] for v in verdict.values()) and code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
