"""Request bodies held in memory: a global budget, and finding ``model`` without parsing the whole body.

A JSON request must be held whole (its ``model`` decides where it goes, and
filters may rewrite it). Held naively, one 200 MiB body (base64 images)
took swapd from 51 to 651 MiB, and three at once stalled the event loop for
1.4 s in ``json.loads``. So:

- ``BodyBudget`` caps the bytes of all held bodies together
  (``clientLimits.maxBodyBytesInFlight``): a body that would pass the cap
  gets 503 with Retry-After before it is read (by its Content-Length) or as
  soon as it passes (chunked uploads).
- ``TopLevelScanner`` reads the body's top-level keys as the bytes arrive,
  jumping over nested values and strings with C-level searches, so the
  model's concurrency limit can refuse a request (429) before the rest of
  its body is read, and large bodies need no whole-document parse on the
  event loop.
"""

from __future__ import annotations

import json
import re
from typing import Any

from swapd.server.errors import ClientError

_STOPS_IN_VALUE = re.compile(rb'["\[\]{}]')  # inside a nested value only these matter
_STOPS_IN_STRING = re.compile(rb'["\\]')
_NOT_SPACE = re.compile(rb"[^ \t\r\n]")
_SCALAR_END = re.compile(rb"[,} \t\r\n]")


class BodyBudget:
    """Bytes of request bodies held right now, against a limit that the caller passes (it follows reloads)."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = 0

    def reserve(self, nbytes: int, limit: int) -> None:
        """Take ``nbytes`` or refuse with 503; a body alone larger than the limit is still let in alone."""
        if self.held and self.held + nbytes > limit:
            raise ClientError(
                503,
                f"swapd is holding {self.held} bytes of request bodies (clientLimits.maxBodyBytesInFlight "
                f"{limit}); retry shortly",
                "body_budget_exceeded",
                close=True,
                headers={"Retry-After": "1"},
            )
        self.held += nbytes

    def release(self, nbytes: int) -> None:
        self.held -= nbytes


class TopLevelScanner:
    """Finds the values of chosen top-level keys of a JSON object as its bytes arrive.

    ``feed(buf)`` is called with the whole growing buffer and resumes where
    it stopped. String values are decoded with ``json.loads`` on their own
    slice; ``true``/``false``/``null``/numbers likewise. Nested values are
    skipped, not decoded. ``broken`` is set when the bytes cannot be a JSON
    object; the caller then parses the whole body to report the error.
    """

    __slots__ = ("wanted", "found", "broken", "done", "_pos", "_state", "_key", "_depth", "_value_start")

    # states: 0 before '{', 1 before a key or '}', 2 in a key, 3 before ':', 4 before a value,
    # 5 in a string value, 6 in a nested value, 7 in a scalar, 8 before ',' or '}',
    # 9 in a string inside a nested value, 10 before a key after ','
    def __init__(self, wanted: tuple[str, ...]) -> None:
        self.wanted = wanted
        self.found: dict[str, Any] = {}
        self.broken = False
        self.done = False
        self._pos = 0
        self._state = 0
        self._key: str | None = None
        self._depth = 0
        self._value_start = 0

    def feed(self, buf: bytes | bytearray) -> None:
        if self.done or self.broken:
            return
        pos = self._pos
        n = len(buf)
        state = self._state
        while pos < n:
            if state in (0, 1, 3, 4, 8, 10):
                m = _NOT_SPACE.search(buf, pos)
                if m is None:
                    pos = n
                    break
                pos = m.start()
                c = buf[pos]
                if state == 0:
                    if c != 0x7B:  # {
                        self.broken = True
                        return
                    state, pos = 1, pos + 1
                elif state in (1, 10):
                    if c == 0x7D and state == 1:  # } (not after a comma)
                        self.done = True
                        return
                    if c != 0x22:  # "
                        self.broken = True
                        return
                    self._value_start = pos
                    state, pos = 2, pos + 1
                elif state == 3:
                    if c != 0x3A:  # :
                        self.broken = True
                        return
                    state, pos = 4, pos + 1
                elif state == 4:
                    self._value_start = pos
                    if c == 0x22:
                        state, pos = 5, pos + 1
                    elif c in (0x7B, 0x5B):  # { [
                        self._depth = 1
                        state, pos = 6, pos + 1
                    else:
                        state = 7
                else:  # 8
                    if c == 0x2C:  # ,
                        state, pos = 10, pos + 1
                    elif c == 0x7D:
                        self.done = True
                        return
                    else:
                        self.broken = True
                        return
            elif state in (2, 5):  # a key or a string value: find its closing quote
                m = _STOPS_IN_STRING.search(buf, pos)
                if m is None:
                    pos = n
                    break
                if buf[m.start()] == 0x5C:  # backslash: skip the escaped character
                    if m.start() + 1 >= n:
                        pos = m.start()  # wait for the escaped character
                        break
                    pos = m.start() + 2
                    continue
                pos = m.end()
                text = bytes(buf[self._value_start : pos])
                if state == 2:
                    try:
                        self._key = json.loads(text)
                    except ValueError:
                        self.broken = True
                        return
                    state = 3
                else:
                    self._take(text)
                    state = 8
            elif state == 6:  # nested: count brackets, jump over strings
                m = _STOPS_IN_VALUE.search(buf, pos)
                if m is None:
                    pos = n
                    break
                c = buf[m.start()]
                pos = m.end()
                if c == 0x22:
                    self._value_start = -1  # a string inside a nested value: not decoded
                    state = 9
                    continue
                self._depth += 1 if c in (0x7B, 0x5B) else -1
                if self._depth == 0:
                    state = 8
            elif state == 9:  # a string inside a nested value
                m = _STOPS_IN_STRING.search(buf, pos)
                if m is None:
                    pos = n
                    break
                if buf[m.start()] == 0x5C:
                    if m.start() + 1 >= n:
                        pos = m.start()
                        break
                    pos = m.start() + 2
                    continue
                pos = m.end()
                state = 6
            else:  # 7: a scalar runs to the next delimiter
                m = _SCALAR_END.search(buf, pos)
                if m is None:
                    pos = n
                    break
                self._take(bytes(buf[self._value_start : m.start()]))
                if self.broken:
                    return
                pos = m.start()
                state = 8
        self._pos = pos
        self._state = state

    def _take(self, text: bytes) -> None:
        key = self._key
        if key in self.wanted and key not in self.found:
            try:
                self.found[key] = json.loads(text)
            except ValueError:
                self.broken = True

    def complete(self, keys: tuple[str, ...]) -> bool:
        """Every key of ``keys`` found, or the object ended (absent keys are then known absent)."""
        return self.done or all(k in self.found for k in keys)
