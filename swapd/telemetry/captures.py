"""Request/response captures for ``GET /api/captures/{id}`` (llama-swap's ``captureBuffer``).

The relay fills ``RequestRecord.capture`` while a request runs (only when
``captureBuffer`` is above zero); the activity store hands it here under the
row's id once the row has one. Captures are kept in memory, oldest evicted
first, while their bytes fit the buffer; one larger than the whole buffer is
skipped, as llama-swap does.

What is kept mirrors llama-swap's ``ReqRespCapture``: the request path, the
request headers (one value each, Go's canonical names, secrets redacted), the
request body, and for a 200 answer the response headers (without
``Content-Encoding``: the body is kept decoded) and body. A failed answer keeps
the request only; its error text is in the activity row. Routes that carry
large binary payloads (audio, images) keep less, per llama-swap's table.

Deviation: llama-swap stores each capture zstd-compressed and counts the
compressed bytes against the buffer; swapd keeps them as they are and counts
the raw bytes, so no compression runs on the event loop. The same buffer
therefore holds fewer captures.
"""

from __future__ import annotations

import base64
import collections
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from swapd.logging import get_logger
from swapd.telemetry.record import Capture

log = get_logger("swapd.captures")

REDACTED = "[REDACTED]"
SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})

REQ_HEADERS = 1
REQ_BODY = 2
RESP_HEADERS = 4
RESP_BODY = 8
CAPTURE_ALL = REQ_HEADERS | REQ_BODY | RESP_HEADERS | RESP_BODY

# llama-swap's per-route masks for large binary payloads; other routes keep everything.
FIELDS_BY_PATH = {
    "/v1/audio/speech": REQ_HEADERS | REQ_BODY | RESP_HEADERS,
    "/v1/audio/voices": REQ_HEADERS | RESP_HEADERS | RESP_BODY,
    "/v1/audio/transcriptions": REQ_HEADERS | RESP_HEADERS | RESP_BODY,
    "/v1/images/generations": REQ_HEADERS | REQ_BODY | RESP_HEADERS,
    "/v1/images/edits": REQ_HEADERS | RESP_HEADERS,
    "/sdapi/v1/txt2img": REQ_HEADERS | REQ_BODY | RESP_HEADERS,
    "/sdapi/v1/img2img": REQ_HEADERS | RESP_HEADERS,
}


def fields_for(path: str) -> int:
    return FIELDS_BY_PATH.get(path, CAPTURE_ALL)


def canonical_header(name: str) -> str:
    """Go's ``http.CanonicalHeaderKey``: ``x-api-key`` -> ``X-Api-Key``."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def header_map(headers: Mapping[str, str]) -> dict[str, str]:
    """One value per canonical name (the first, as Go's ``headerMap``), secrets redacted."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        key = canonical_header(name)
        if key in out:
            continue
        out[key] = REDACTED if key.lower() in SENSITIVE_HEADERS else value
    return out


def _inflate(body: bytes, wbits: int, limit: int) -> bytes | None:
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(body, limit + 1)
    return None if len(out) > limit else out


def _decode(body: bytes, encoding: str, limit: int) -> bytes | None:
    """The body without its gzip or deflate encoding; None when it is broken or decodes to over ``limit`` bytes."""
    enc = encoding.strip().lower()
    try:
        if enc == "gzip":
            return _inflate(body, 16 + zlib.MAX_WBITS, limit)
        if enc == "deflate":
            try:
                return _inflate(body, zlib.MAX_WBITS, limit)
            except zlib.error:
                return _inflate(body, -zlib.MAX_WBITS, limit)
    except zlib.error:
        return None
    return body


@dataclass(slots=True)
class StoredCapture:
    id: int
    req_path: str
    req_headers: dict[str, str] | None
    req_body: bytes | None
    resp_headers: dict[str, str] | None
    resp_body: bytes | None
    size: int

    def to_json(self) -> dict[str, Any]:
        """llama-swap's JSON: bodies are Go ``[]byte``, so base64 text, ``null`` when not kept."""

        def b64(data: bytes | None) -> str | None:
            return None if data is None else base64.b64encode(data).decode("ascii")

        return {
            "id": self.id,
            "req_path": self.req_path,
            "req_headers": self.req_headers,
            "req_body": b64(self.req_body),
            "resp_headers": self.resp_headers,
            "resp_body": b64(self.resp_body),
        }


def build(record_id: int, path: str, status: int, capture: Capture, limit: int = 1 << 62) -> StoredCapture | None:
    """The capture llama-swap would keep for this request; None when there is none or it is over ``limit`` bytes."""
    if capture.truncated:
        return None  # larger than the buffer while it was copied: llama-swap skips it too
    mask = fields_for(path)
    ok = status == 200
    if not ok:
        mask &= ~RESP_BODY  # a failure keeps the request; its error is in the row
    req_headers = header_map(capture.request_headers) if mask & REQ_HEADERS else None
    req_body = bytes(capture.request_body) if mask & REQ_BODY else None
    resp_headers = None
    resp_body = None
    if mask & RESP_HEADERS:
        resp_headers = header_map(capture.response_headers)
        encoding = resp_headers.pop("Content-Encoding", "")
    else:
        encoding = next((v for k, v in capture.response_headers.items() if k.lower() == "content-encoding"), "")
    if mask & RESP_BODY:
        size = len(req_body or b"") + sum(map(len, capture.response_body))
        if size > limit:  # checked before anything is copied: this runs on the event loop
            log.warning("capture.too_large", id=record_id, bytes=size, buffer=limit)
            return None
        raw = b"".join(capture.response_body)
        resp_body = _decode(raw, encoding, limit) if encoding else raw
        if resp_body is None:
            return None
    size = len(req_body or b"") + len(resp_body or b"")
    for headers in (req_headers, resp_headers):
        if headers:
            size += sum(len(k) + len(v) for k, v in headers.items())
    size += len(path)
    return StoredCapture(record_id, path, req_headers, req_body, resp_headers, resp_body, size)


HEADER_BYTES = 32


@dataclass(slots=True)
class _Pending:
    """A capture as the relay left it, not yet in llama-swap's shape."""

    id: int
    path: str
    status: int
    capture: Capture
    size: int


class CaptureStore:
    """Captures by activity id under a byte cap, oldest evicted first (thread safe)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[int, StoredCapture | _Pending] = collections.OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: StoredCapture | _Pending) -> bool:
        if not self.enabled:
            return False
        if item.size > self.max_bytes:
            log.warning("capture.too_large", id=item.id, bytes=item.size, buffer=self.max_bytes)
            return False
        with self._lock:
            old = self._items.pop(item.id, None)
            if old is not None:
                self._size -= old.size
            while self._items and self._size + item.size > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._size -= evicted.size
            self._items[item.id] = item
            self._size += item.size
        return True

    def add_record(self, record_id: int, path: str, status: int, capture: Capture) -> bool:
        """Keep a request's capture as it is; llama-swap's shape is built when it is asked for.

        This runs on the event loop for every request, so it only measures: the
        headers are canonicalised, the bodies joined and decoded in ``get``.
        """
        if not self.enabled or capture.truncated:
            return False
        # headers are counted at HEADER_BYTES each until the capture is built (exactly, then)
        size = len(path) + len(capture.request_body) + capture.response_size
        size += HEADER_BYTES * (len(capture.request_headers) + len(capture.response_headers))
        if size > self.max_bytes:
            log.warning("capture.too_large", id=record_id, bytes=size, buffer=self.max_bytes)
            return False
        return self.add(_Pending(record_id, path, status, capture, size))

    def get(self, capture_id: int) -> StoredCapture | None:
        with self._lock:
            item = self._items.get(capture_id)
        if isinstance(item, _Pending):
            built = build(item.id, item.path, item.status, item.capture, self.max_bytes)
            with self._lock:
                if self._items.get(capture_id) is item:
                    if built is None:
                        del self._items[capture_id]
                        self._size -= item.size
                    else:
                        self._items[capture_id] = built
                        self._size += built.size - item.size
            return built
        return item

    def has(self, capture_id: int) -> bool:
        with self._lock:
            return capture_id in self._items
