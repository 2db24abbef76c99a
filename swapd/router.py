"""Which running models must stop so that a target may run: the router.

The scheduler (swapd.scheduler) owns the queue, the leases and the effects; a
:class:`Router` owns only the eviction rule. Its decision core is synchronous
and pure: the target, the running set (with each model's in-flight count and
last use) and the config in, a :class:`Decision` out. No I/O, no clock, no
processes, so a router is tested by calling it.

:class:`GroupRouter` is llama-swap's ``groups`` rule (swap / exclusive /
persistent), swapd's default. Other rules (a memory-aware router, llama-swap's
``matrix``) implement the same protocol beside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from swapd.config import Config


class RunningModel(NamedTuple):
    """One model that runs, is starting, is stopping or is being swapped in.

    A NamedTuple: built for every model on every scheduling decision."""

    id: str
    in_flight: int = 0  # requests being served now (a swap never stops these; it waits)
    last_used: float | None = None  # time.monotonic() of its last grant or finished request
    state: str = "ready"  # the backend's state value; "swapping" while a swap brings it in


class Eviction(NamedTuple):
    """Why one model is in a decision's ``evict`` (logged as ``scheduler.evict``)."""

    reason: str  # "group", "matrix", "removed"; the vram router: "vram", "count", "unknown_footprint"
    idle_seconds: float | None = None  # since its last use; None when never used
    mib: float | None = None  # the memory the router counted it holding


@dataclass(frozen=True)
class Decision:
    """What must happen before ``target`` may run: these models stop, in this order.

    ``refuse`` is set when the target can never run here as things stand (the
    vram router: its footprint exceeds the GPU's budget); the scheduler answers
    its requests with 503 and that message. ``why`` explains evictions, when
    the router says more than the order.
    """

    evict: tuple[str, ...] = ()
    refuse: str | None = None
    why: Mapping[str, Eviction] = field(default_factory=dict)


class Router(Protocol):
    def decide(self, target: str, running: Mapping[str, RunningModel], config: Config) -> Decision:
        """Which of ``running`` (never containing ``target``) must stop for ``target``.

        Synchronous and side-effect free; the scheduler calls it again whenever
        anything changes, so it may be called many times for one request.
        """
        ...


class GroupRouter:
    """llama-swap's groups.

    * Within the target's group, every other member stops when the group has
      ``swap: true``; with ``swap: false`` they run side by side.
    * When the target's group is ``exclusive``, every model of every other
      group stops, except members of ``persistent`` groups.
    * A model that is no longer configured (removed by a reload while it
      still stops) is always evicted.
    """

    def decide(self, target: str, running: Mapping[str, RunningModel], config: Config) -> Decision:
        tg = config.group_of(target)
        out = []
        for other in sorted(running):
            if other == target:
                continue
            if other not in config.models:
                out.append(other)
                continue
            og = config.group_of(other)
            if og.id == tg.id:
                if tg.swap:
                    out.append(other)
            elif tg.exclusive and not og.persistent:
                out.append(other)
        return Decision(tuple(out))
