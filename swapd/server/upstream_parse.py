"""Reading one HTTP/1.x response from a backend: llhttp (through httptools) does the bytes.

swapd used to parse responses by hand. A hostile or broken backend found the
gaps: a Content-Length that ``str.isdigit`` accepts and ``int`` does not,
bare-LF line endings, a CR or NUL inside a header value, thousands of
``100 Continue`` heads in one read. llhttp is the parser Node.js and uvicorn
use; it refuses all of those. This module adds only what llhttp leaves to its
caller:

- interim (1xx) heads are skipped, at most ``MAX_INTERIM`` of them;
- 101 Switching Protocols is refused, except by a parser made with
  ``upgrade=True`` (the websocket hop, swapd.server.websocket): there the
  101's head is the end of HTTP, ``switched`` is set and ``upgrade_tail``
  holds the bytes that came after it (the backend's first frames);
- header values must be valid UTF-8, because aiohttp writes header strings as
  UTF-8: anything else could not reach the client byte for byte, and swapd
  refuses a reply rather than alter it;
- a Transfer-Encoding other than plain ``chunked`` (on any of its lines) is
  refused, since the client would get the other coding undecoded, and an
  HTTP/1.0 reply that carries Transfer-Encoding closes its connection
  (RFC 9112 §6.1);
- the answer to a HEAD request has no body, whatever it declares;
- a body framed by the end of the connection ends at ``eof()``.

The parser calls its handler's ``head_received``, ``body_received`` and
``message_done``; it raises ``UpstreamProtocolError`` from ``feed``.
"""

from __future__ import annotations

from typing import Protocol

import httptools
from multidict import CIMultiDict

MAX_INTERIM = 32  # 1xx heads before the real one
MAX_HEAD_BYTES = 64 * 1024  # status line plus headers


class UpstreamFault(Exception):
    """Base of the errors the upstream client raises."""


class UpstreamProtocolError(UpstreamFault):
    """The backend's answer is not valid HTTP/1.x, or could not be relayed unchanged."""


class ResponseHandler(Protocol):
    def head_received(self, status: int, reason: str, headers: CIMultiDict[str], keep_alive: bool) -> None: ...

    def body_received(self, data: bytes) -> None: ...

    def message_done(self) -> None: ...

    def bytes_after_response(self) -> None: ...


_NO_BODY_STATUS = frozenset((204, 304))


class ResponseParser:
    """One response on one connection. Not reused: each request gets a new parser."""

    __slots__ = (
        "_handler",
        "_parser",
        "_no_body",
        "_reason",
        "_names",
        "_values",
        "_head_done",
        "_interim",
        "_parts",
        "_head_bytes",
        "_fed",
        "_start",
        "close_delimited",
        "done",
        "_upgrade",
        "switched",
        "upgrade_tail",
    )

    def __init__(self, handler: ResponseHandler, no_body: bool, *, upgrade: bool = False) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._upgrade = upgrade  # a 101 ends the HTTP part (a websocket handshake's answer) instead of failing
        self.reset(handler, no_body)

    def can_continue(self) -> bool:
        """After a complete response read to its end, llhttp is ready for the next one on the connection."""
        return self.done and not self._no_body  # a HEAD answer was ended early: llhttp still expects a body

    def reset(self, handler: ResponseHandler, no_body: bool) -> ResponseParser:
        """Ready for the next response, for ``handler`` (see ``can_continue``)."""
        self._handler = handler
        self._no_body = no_body
        self._reason = b""
        self._names: list[bytes] = []
        self._values: list[bytes] = []
        self._head_done = False
        self._interim = 0
        self._parts: list[bytes] = []
        self._head_bytes = 0  # status and header bytes seen (llhttp sets no limit of its own)
        self._fed = 0  # bytes fed while the head was incomplete: a header line that never ends
        self._start = b""  # the answer's first bytes, to name in an error
        self.close_delimited = False
        self.done = False
        self.switched = False  # a 101 was accepted (``upgrade=True``): what follows is not HTTP
        self.upgrade_tail = b""  # the bytes after that 101's head, in the read that carried it
        return self

    def feed(self, data: bytes) -> None:
        """Parse bytes as they came; the handler hears of a head, body bytes, the end."""
        if not self._head_done:
            self._fed += len(data)
            if len(self._start) < 60:
                self._start += data[: 60 - len(self._start)]
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:  # refused in on_headers_complete unless ``upgrade``
            if self.switched:
                self.upgrade_tail = data[exc.args[0] :]
                return
            self._handler.bytes_after_response()
        except httptools.HttpParserCallbackError as exc:
            self._flush_good()
            # one of our callbacks raised (a refused head, or the handler's own error): that error, unwrapped
            if exc.__context__ is not None:
                raise exc.__context__ from None
            raise UpstreamProtocolError("response parser callback failed") from None
        except httptools.HttpParserError as exc:
            self._flush_good()
            if self.done:  # garbage after a complete response: the connection is spoilt, the response is not
                self._handler.bytes_after_response()
                return
            message = str(exc) or type(exc).__name__
            if not self._head_done:
                message += f" (the answer began {self._start!r})"
            raise UpstreamProtocolError(message) from None
        if not self._head_done and self._fed > MAX_HEAD_BYTES:
            raise UpstreamProtocolError(f"response headers exceed {MAX_HEAD_BYTES} bytes")
        if self._parts:
            self._flush()

    def eof(self) -> bool:
        """The connection closed: True if that completed the response (a body framed by close)."""
        if self.done:
            return True
        if self._head_done and self.close_delimited:
            self._finish()
            return True
        return False

    def _flush_good(self) -> None:
        """Before an error surfaces, hand on the body bytes that were valid."""
        if self._parts and not self.done:
            self._flush()

    def _flush(self) -> None:
        parts = self._parts
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        self._handler.body_received(data)

    def _finish(self) -> None:
        if self._parts:
            self._flush()
        self.done = True
        self._handler.message_done()

    # -- httptools callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            self._handler.bytes_after_response()

    def on_status(self, status: bytes) -> None:
        if not self._head_done:
            self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_done:  # after the head these are trailers: dropped, as a proxy may
            self._head_bytes += len(name) + len(value)
            if self._head_bytes > MAX_HEAD_BYTES:
                raise UpstreamProtocolError(f"response headers exceed {MAX_HEAD_BYTES} bytes")
            self._names.append(name)
            self._values.append(value)

    def on_headers_complete(self) -> None:
        if self.done or self._head_done:
            return
        parser = self._parser
        status = parser.get_status_code()
        if status == 101 and not self._upgrade:
            raise UpstreamProtocolError("backend switched protocols (101) to a request that asked for no upgrade")
        if 100 <= status < 200 and status != 101:
            self._interim += 1
            if self._interim > MAX_INTERIM:
                raise UpstreamProtocolError(f"more than {MAX_INTERIM} interim (1xx) responses")
            self._reason = b""
            self._head_bytes = 0
            self._fed = 0
            self._names.clear()
            self._values.clear()
            return
        headers: CIMultiDict[str] = CIMultiDict()
        transfer_codings: list[str] = []
        for raw_name, raw_value in zip(self._names, self._values, strict=True):
            name = raw_name.decode("ascii")  # llhttp allows only token characters in names
            try:
                value = raw_value.decode("utf-8")
            except UnicodeDecodeError:
                raise UpstreamProtocolError(
                    f"header {name!r} has bytes that are not UTF-8 and cannot be relayed unchanged"
                ) from None
            if name.lower() == "transfer-encoding":
                transfer_codings += [c.strip().lower() for c in value.split(",") if c.strip()]
            headers.add(name, value)
        self._names.clear()
        self._values.clear()
        if status == 101:
            self._switch(headers)
            return
        keep_alive = parser.should_keep_alive()
        if transfer_codings:
            # only chunked is decoded here: any other coding would reach the client undecoded and unlabelled
            if transfer_codings != ["chunked"]:
                raise UpstreamProtocolError(f"unsupported Transfer-Encoding: {', '.join(transfer_codings)[:100]}")
            if parser.get_http_version() == "1.0":
                keep_alive = False
        self._head_done = True
        no_body = self._no_body or status in _NO_BODY_STATUS
        self.close_delimited = not no_body and not transfer_codings and "Content-Length" not in headers
        if self.close_delimited:
            keep_alive = False
        try:
            reason = self._reason.decode("utf-8")
        except UnicodeDecodeError:
            reason = ""
        self._handler.head_received(status, reason, headers, keep_alive)
        if self._no_body:  # HEAD: llhttp would wait for the declared body, which never comes
            self._finish()

    def _switch(self, headers: CIMultiDict[str]) -> None:
        """An accepted 101: the head goes to the handler; llhttp stops at its end (HttpParserUpgrade)."""
        tokens = {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}
        if "upgrade" not in tokens:  # llhttp would not say where the new protocol begins
            raise UpstreamProtocolError("backend answered 101 without 'Connection: Upgrade'")
        self._head_done = True
        self.switched = True
        self.done = True
        try:
            reason = self._reason.decode("utf-8")
        except UnicodeDecodeError:
            reason = ""
        self._handler.head_received(101, reason, headers, False)

    def on_body(self, body: bytes) -> None:
        if self.done:
            self._handler.bytes_after_response()
            return
        self._parts.append(body)

    def on_message_complete(self) -> None:
        if not self.done and self._head_done:
            self._finish()
