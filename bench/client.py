"""The load generator: raw sockets, run as its own process so its CPU stays out of swapd's.

``python -m bench.client MODE JSON`` runs one measurement and prints one JSON
object. Every socket has TCP_NODELAY and every request goes out in a single
``send`` (no delayed-ACK stalls); keep-alive connections are reused where the
mode measures per-request latency.

Modes:
  latency   c=1: requests interleaved over several targets in shuffled order
  latency_c c=N: N keep-alive connections per target, one non-blocking loop,
            each target driven alone for short alternating phases
  stream    one streaming request read as fast as possible
  fanout    N concurrent streams; per event, arrival time minus the backend's x_sent_at
  hold      open N streams, report once each has its first event, hold until stdin closes
  poll      GET a path until it answers 200 (tight loop), report how long that took
"""

from __future__ import annotations

import json
import random
import re
import selectors
import socket
import sys
import time

_SENT_AT = re.compile(rb'"x_sent_at":([0-9.eE+-]+)')


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def build_request(method: str, path: str, port: int, body: bytes = b"", close: bool = False) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if body or method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode() + body


class ResponseParser:
    """Incremental HTTP/1.1 response parser (Content-Length or chunked bodies)."""

    __slots__ = ("buf", "status", "need", "chunked", "body_len", "head_done", "close")

    def __init__(self) -> None:
        self.buf = b""
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.need = -1
        self.chunked = False
        self.body_len = 0
        self.head_done = False
        self.close = False  # the server said "Connection: close": reconnect before the next request

    def feed(self, data: bytes) -> bool:
        """Add bytes; True once a whole response is in (the rest stays buffered)."""
        self.buf += data
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = self.buf[:end].decode("latin-1").split("\r\n")
            self.status = int(head[0].split(" ", 2)[1])
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    self.need = int(value)
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    self.chunked = True
                elif name == "connection" and "close" in value.lower():
                    self.close = True
            self.buf = self.buf[end + 4:]
            self.head_done = True
        if self.chunked:
            while True:
                line_end = self.buf.find(b"\r\n")
                if line_end < 0:
                    return False
                size = int(self.buf[:line_end].split(b";")[0], 16)
                if len(self.buf) < line_end + 2 + size + 2:
                    return False
                self.body_len += size
                self.buf = self.buf[line_end + 2 + size + 2:]
                if size == 0:
                    return True
        if self.need < 0:
            raise ValueError("response without Content-Length or chunked encoding")
        if len(self.buf) >= self.need:
            self.body_len = self.need
            self.buf = self.buf[self.need:]
            return True
        return False


class Dechunker:
    """Strip HTTP/1.1 chunked framing from a byte stream (after the headers)."""

    __slots__ = ("buf", "left", "done")

    def __init__(self) -> None:
        self.buf = b""
        self.left = 0  # payload bytes still due in the current chunk (+2 for its CRLF)
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return b""
        out = []
        buf = self.buf + data if self.buf else data
        pos = 0
        n = len(buf)
        while pos < n:
            if self.left < 0:
                skip = min(-self.left, n - pos)
                pos += skip
                self.left += skip
                continue
            if self.left:
                take = min(self.left, n - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self.left -= take
                if self.left == 0:
                    self.left = -2  # the CRLF after the payload
                continue
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            size = int(buf[pos:end].split(b";")[0], 16)
            pos = end + 2
            if size == 0:
                self.done = True
                pos = n
                break
            self.left = size
        self.buf = buf[pos:] if pos < n else b""
        # payload bytes are handed out; only an incomplete size line is kept
        return b"".join(out)


class BodyReader:
    """The body of one streamed response: headers skipped, chunking undone if used."""

    __slots__ = ("head", "dechunk", "status")

    def __init__(self) -> None:
        self.head = b""
        self.dechunk: Dechunker | None = None
        self.status = 0

    def feed(self, data: bytes) -> bytes:
        if self.head is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return b""
            head, data = self.head[:end], self.head[end + 4:]
            self.head = None
            self.status = int(head.split(b" ", 2)[1])
            if b"chunked" in head.lower():
                self.dechunk = Dechunker()
        if self.dechunk is not None:
            return self.dechunk.feed(data)
        return data


def roundtrip(sock: socket.socket, request: bytes, parser: ResponseParser) -> tuple[int, bool]:
    """One request on a keep-alive connection: (status, whether the server is closing it)."""
    sock.sendall(request)
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        if parser.feed(data):
            status, close = parser.status, parser.close
            parser.reset()
            return status, close


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float]) -> dict:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": sum(values) / len(values) if values else float("nan"),
    }


# -- modes ---------------------------------------------------------------------


def mode_latency(args: dict) -> dict:
    """c=1: each iteration sends one request to every target, in shuffled order."""
    targets = args["targets"]  # {name: {"port": p, "path": ..., "body": ...}}
    conns = {}
    for name, t in targets.items():
        sock = connect(t["port"])
        req = build_request(t.get("method", "POST"), t["path"], t["port"], t.get("body", "").encode())
        conns[name] = [sock, req, ResponseParser(), t["port"]]
    samples = {name: [] for name in targets}
    names = list(targets)
    rng = random.Random(1)
    clock = time.perf_counter_ns
    for i in range(args["warmup"] + args["n"]):
        rng.shuffle(names)
        for name in names:
            entry = conns[name]
            sock, req, parser = entry[0], entry[1], entry[2]
            t0 = clock()
            status, close = roundtrip(sock, req, parser)
            dt = clock() - t0
            if status != 200:
                raise RuntimeError(f"{name}: HTTP {status}")
            if close:  # e.g. nginx's keepalive_requests; reconnect outside the timed part
                sock.close()
                entry[0] = connect(entry[3])
            if i >= args["warmup"]:
                samples[name].append(dt / 1e6)
    for entry in conns.values():
        entry[0].close()
    return {name: summary(v) for name, v in samples.items()}


def mode_latency_c(args: dict) -> dict:
    """c=N: N connections per target; phases alternate targets so each sees N in flight alone."""
    targets = args["targets"]
    c = args["concurrency"]
    phase_s = args["phase_s"]
    rounds = args["rounds"]
    clock = time.perf_counter_ns
    sel = selectors.DefaultSelector()
    pools = {}
    for name, t in targets.items():
        req = build_request(t.get("method", "POST"), t["path"], t["port"], t.get("body", "").encode())
        pools[name] = [(connect(t["port"]), req) for _ in range(c)]
    samples = {name: [] for name in targets}
    names = list(targets)
    errors = 0

    def phase(name: str, seconds: float, record: bool) -> None:
        nonlocal errors
        state = {}
        for i, (sock, req) in enumerate(pools[name]):
            parser = ResponseParser()
            state[sock.fileno()] = [sock, req, parser, clock(), i]
            sock.setblocking(False)
            sock.send(req)
            sel.register(sock, selectors.EVENT_READ)
        end = time.monotonic() + seconds
        stopping = False
        active = len(state)
        while active:
            for key, _ in sel.select(timeout=1.0):
                entry = state[key.fd]
                sock, req, parser, t0, index = entry
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError(f"{name}: server closed a keep-alive connection")
                if not parser.feed(data):
                    continue
                now = clock()
                if parser.status != 200:
                    errors += 1
                close = parser.close
                parser.reset()
                if record:
                    samples[name].append((now - t0) / 1e6)
                if not stopping and time.monotonic() >= end:
                    stopping = True
                if close:  # the server ends this keep-alive connection: open a new one
                    sel.unregister(sock)
                    del state[key.fd]
                    sock.close()
                    sock = connect(targets[name]["port"])
                    pools[name][index] = (sock, req)
                    if stopping:
                        active -= 1
                        continue
                    sock.setblocking(False)
                    entry = state[sock.fileno()] = [sock, req, parser, clock(), index]
                    sel.register(sock, selectors.EVENT_READ)
                    sock.send(req)
                    continue
                if stopping:
                    sel.unregister(sock)
                    sock.setblocking(True)
                    active -= 1
                else:
                    entry[3] = clock()
                    sock.send(req)

    for name in names:  # warm every connection up
        phase(name, 0.3, False)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            phase(name, phase_s, True)
    for pool in pools.values():
        for sock, _ in pool:
            sock.close()
    out = {name: summary(v) for name, v in samples.items()}
    out["errors"] = errors
    return out


def _stream_body(args: dict) -> bytes:
    if args.get("ollama"):  # Ollama's /api/chat: streams by default, num_predict caps the tokens
        return json.dumps({
            "model": args.get("model", "x"),
            "options": {"num_predict": args["tokens"]},
            "messages": [{"role": "user", "content": "hi"}],
        }).encode()
    return json.dumps({
        "model": args.get("model", "x"),
        "stream": True,
        "max_tokens": args["tokens"],
        "messages": [{"role": "user", "content": "hi"}],
        **args.get("extra", {}),
    }).encode()


def mode_stream(args: dict) -> dict:
    """One stream read as fast as possible; count its events."""
    port = args["port"]
    sock = connect(port)
    t0 = time.perf_counter()
    sock.sendall(build_request("POST", args["path"], port, _stream_body(args), close=True))
    events = 0
    total = 0
    tail = b""
    first = None
    body = BodyReader()
    marker = b"\n" if args.get("ollama") else b"data: "  # NDJSON: one object a line
    while True:
        data = sock.recv(262144)
        if not data:
            break
        if first is None:
            first = time.perf_counter()
        data = body.feed(data)
        total += len(data)
        joined = tail + data
        events += joined.count(marker) - tail.count(marker)
        tail = joined[-8:]
    t1 = time.perf_counter()
    sock.close()
    return {"events": events, "bytes": total, "seconds": t1 - t0, "ttfb": (first or t1) - t0}


class _Stream:
    __slots__ = ("sock", "buf", "body", "events", "delays", "done")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.body = BodyReader()
        self.events = 0
        self.delays: list[float] = []
        self.done = False


def _open_streams(port: int, path: str, body: bytes, n: int, stagger_s: float) -> tuple[selectors.BaseSelector, dict]:
    sel = selectors.DefaultSelector()
    streams = {}
    req = build_request("POST", path, port, body, close=True)
    for i in range(n):
        sock = connect(port)
        sock.sendall(req)
        sock.setblocking(False)
        st = _Stream(sock)
        streams[sock.fileno()] = st
        sel.register(sock, selectors.EVENT_READ)
        if stagger_s:
            time.sleep(stagger_s)
    return sel, streams


def _read_events(st: _Stream, data: bytes, arrival: float, record: bool) -> None:
    """Split the SSE text into events; stamp each with its delivery delay (ms)."""
    buf = st.buf + st.body.feed(data)
    while True:
        start = buf.find(b"data: ")
        if start < 0:
            st.buf = b""
            return
        stop = buf.find(b"\n\n", start)
        if stop < 0:
            st.buf = buf[start:]
            return
        event = buf[start:stop]
        buf = buf[stop + 2:]
        st.events += 1
        if record:
            m = _SENT_AT.search(event)
            if m:
                st.delays.append((arrival - float(m.group(1))) * 1000.0)


def mode_fanout(args: dict) -> dict:
    """N concurrent streams; per event, the delay between the backend's stamp and arrival."""
    body = _stream_body(args)
    n = args["streams"]
    sel, streams = _open_streams(args["port"], args["path"], body, n, args.get("stagger_s", 0.0))
    open_ = n
    while open_:
        for key, _ in sel.select(timeout=5.0):
            st = streams[key.fd]
            data = st.sock.recv(65536)
            arrival = time.time()
            if not data:
                sel.unregister(st.sock)
                st.sock.close()
                st.done = True
                open_ -= 1
                continue
            _read_events(st, data, arrival, True)
    delays = [d for st in streams.values() for d in st.delays]
    return {"events": sum(st.events for st in streams.values()), "delay_ms": summary(delays)}


def mode_hold(args: dict) -> dict:
    """Open N streams, print once each got its first event, then hold until stdin closes."""
    body = _stream_body(args)
    n = args["streams"]
    sel, streams = _open_streams(args["port"], args["path"], body, n, 0.0)
    waiting = n
    deadline = time.monotonic() + args.get("timeout", 60)
    while waiting and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1.0):
            st = streams[key.fd]
            data = st.sock.recv(65536)
            if not data:
                raise ConnectionError("a held stream closed early")
            had = st.events
            _read_events(st, data, time.time(), False)
            if had == 0 and st.events > 0:
                waiting -= 1
    print(json.dumps({"open": n - waiting, "streams": n}), flush=True)
    sys.stdin.read()  # held until the parent closes our stdin
    for st in streams.values():
        st.sock.close()
    return {"closed": n}


def mode_poll(args: dict) -> dict:
    """GET ``path`` until 200; new connection per try while refused."""
    port, path = args["port"], args["path"]
    req = build_request("GET", path, port)
    t0 = time.monotonic()
    tries = 0
    while True:
        tries += 1
        try:
            sock = connect(port)
        except OSError:
            time.sleep(args.get("interval", 0.001))
            continue
        try:
            status, _ = roundtrip(sock, req, ResponseParser())
        except OSError:
            status = 0
        finally:
            sock.close()
        if status == 200:
            return {"seconds": time.monotonic() - t0, "tries": tries}
        time.sleep(args.get("interval", 0.001))


MODES = {
    "latency": mode_latency,
    "latency_c": mode_latency_c,
    "stream": mode_stream,
    "fanout": mode_fanout,
    "hold": mode_hold,
    "poll": mode_poll,
}


def main() -> None:
    mode, raw = sys.argv[1], sys.argv[2]
    result = MODES[mode](json.loads(raw))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
