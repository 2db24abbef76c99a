"""Bounded in-memory history of log lines, with live subscribers.

Backends can print without limit (a model load floods stdout); swapd keeps the
last ``max_lines`` lines (all sources together) and never blocks on a slow reader: a
subscriber whose queue is full loses lines, not the backend.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LogLine:
    ts: float
    source: str  # model id, or "swapd"
    stream: str  # "stdout" | "stderr" | "proxy"
    text: str


class LogRing:
    def __init__(self, max_lines: int = 2000, subscriber_queue: int = 1000) -> None:
        self._lines: collections.deque[LogLine] = collections.deque(maxlen=max_lines)
        self._subscribers: set[asyncio.Queue[LogLine]] = set()
        self._subscriber_queue = subscriber_queue

    def append(self, source: str, stream: str, text: str) -> LogLine:
        line = LogLine(time.time(), source, stream, text)
        self._lines.append(line)
        for queue in self._subscribers:
            if queue.full():
                # Drop the oldest line for that reader rather than stall the writer.
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:  # pragma: no cover
                    pass
            queue.put_nowait(line)
        return line

    def lines(self, source: str | None = None) -> list[LogLine]:
        if source is None:
            return list(self._lines)
        return [line for line in self._lines if line.source == source]

    def tail(self, source: str, n: int) -> list[str]:
        out: list[str] = []
        for line in reversed(self._lines):
            if line.source == source:
                out.append(line.text)
                if len(out) == n:
                    break
        out.reverse()
        return out

    def subscribe(self) -> asyncio.Queue[LogLine]:
        queue: asyncio.Queue[LogLine] = asyncio.Queue(self._subscriber_queue)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[LogLine]) -> None:
        self._subscribers.discard(queue)
