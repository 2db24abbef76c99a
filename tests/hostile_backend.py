"""A backend that misbehaves on purpose, one way per path: a real process on a real socket.

``python hostile_backend.py PORT``. ``GET /health`` answers 200. Any other
request is read whole (Content-Length or chunked) and answered with
``ANSWERS[path]``: bytes no well-behaved server would send. ``GET /x/seen``
returns how many requests and connections arrived, per path, and every
request line exactly as it came, as JSON.
"""

from __future__ import annotations

import json
import socket
import sys
import threading

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

ANSWERS = {
    "/bare-cr": b"HTTP/1.1 200 OK\r\nX-A: one\rX-Injected: yes\r\nContent-Length: 2\r\n\r\n{}",
    "/lf-in-value": b"HTTP/1.1 200 OK\r\nX-A: one\nX-Injected: yes\r\nContent-Length: 2\r\n\r\n{}",
    "/nul": b"HTTP/1.1 200 OK\r\nX-A: one\x00two\r\nContent-Length: 2\r\n\r\n{}",
    "/length-superscript": "HTTP/1.1 200 OK\r\nContent-Length: \u00b2\r\n\r\n{}".encode(),
    "/length-huge": b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n{}",
    "/bare-lf": b"HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Length: 2\n\n{}",
    "/latin1": b'HTTP/1.1 200 OK\r\nContent-Disposition: attachment; filename="caf\xe9.txt"\r\nContent-Length: 2\r\n\r\n{}',
    "/utf8": 'HTTP/1.1 200 OK\r\nContent-Disposition: attachment; filename="café.txt"\r\nContent-Length: 2\r\n\r\n{}'.encode(),
    "/two-te": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "/http10-te": b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "/continues": b"HTTP/1.1 100 Continue\r\n\r\n" * 3000 + OK,
}

seen: dict[str, int] = {}
lines: list[str] = []  # every request line, as received
connections: dict[str, int] = {}
lock = threading.Lock()


def read_request(f) -> tuple[str, str] | None:
    line = f.readline()
    if not line:
        return None
    text = line.decode("latin-1").rstrip("\r\n")
    lines.append(text)
    method, _, rest = text.partition(" ")
    path = rest.rpartition(" ")[0].split("?", 1)[0]
    length = 0
    chunked = False
    while (h := f.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = h.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
        if name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if chunked:
        while (size := int(f.readline().split(b";")[0], 16)) != 0:
            f.read(size + 2)
        f.readline()
    elif length:
        f.read(length)
    return method, path


def serve(conn: socket.socket) -> None:
    f = conn.makefile("rb")
    first = True
    try:
        while (request := read_request(f)) is not None:
            method, path = request
            with lock:
                seen[path] = seen.get(path, 0) + 1
                if first:
                    connections[path] = connections.get(path, 0) + 1
            first = False
            if path == "/health":
                conn.sendall(OK)
            elif path == "/x/seen":
                body = json.dumps({"requests": seen, "connections": connections, "lines": lines}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            elif path in ("/hang-up-after-ok", "/v1/chat/completions"):
                conn.sendall(OK)  # then takes the next request on this connection and hangs up unanswered
                request = read_request(f)
                if request is not None:
                    with lock:
                        seen[request[1]] = seen.get(request[1], 0) + 1
                return
            else:
                conn.sendall(ANSWERS.get(path, OK))
    except (OSError, ValueError):
        pass
    finally:
        conn.close()


def main() -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", int(sys.argv[1])))
    srv.listen(64)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
