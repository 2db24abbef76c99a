"""The health probe's fast path: a plain-http URL probed on one non-blocking socket."""

from __future__ import annotations

import asyncio
import socket

import yarl


class _RawProbeTarget:
    """A plain-http health URL, probed with one non-blocking socket (see ``Backend._probe``)."""

    __slots__ = ("host", "port", "request", "addrs")

    def __init__(self, host: str, port: int, request: bytes) -> None:
        self.host = host
        self.port = port
        self.request = request
        self.addrs: list[tuple[int, tuple]] | None = None

    @classmethod
    def parse(cls, url: str) -> _RawProbeTarget | None:
        try:
            parts = yarl.URL(url)
            if parts.scheme != "http" or not parts.raw_host or parts.raw_user or parts.raw_password:
                return None
            port = parts.port or 80
            host_header = parts.raw_host if ":" not in parts.raw_host else f"[{parts.raw_host}]"
            if not parts.is_default_port():
                host_header += f":{port}"
            request = (
                f"GET {parts.raw_path_qs or '/'} HTTP/1.1\r\nHost: {host_header}\r\n"
                "Accept: */*\r\nConnection: close\r\n\r\n"
            ).encode("ascii")
        except (ValueError, UnicodeError):
            return None
        return cls(parts.raw_host, port, request)

    async def probe(self) -> bool | None:
        """True on 200, False when not ready, None when aiohttp should decide (a redirect)."""
        loop = asyncio.get_running_loop()
        if self.addrs is None:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            self.addrs = [(family, address) for family, _, _, _, address in infos]
        for family, address in self.addrs:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, address)
                except OSError:
                    continue  # refused: not listening yet (or try the next address)
                await loop.sock_sendall(sock, self.request)
                head = b""
                while b"\r\n" not in head and len(head) < 4096:
                    chunk = await loop.sock_recv(sock, 4096)
                    if not chunk:
                        break
                    head += chunk
            finally:
                sock.close()
            fields = head.split(b" ", 2)
            if len(fields) < 2 or not fields[0].startswith(b"HTTP/"):
                return False
            if fields[1] == b"200":
                return True
            return None if fields[1][:1] == b"3" else False
        return False
