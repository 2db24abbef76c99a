"""Selectors: a model name that picks one of its targets for each request (llama-swap's ``selectors``).

``choose`` is the first step of routing a request's model name: the active
profile's pin (swapd.server.profiles), then a selector's pick; routing then
resolves the result as a model id or alias, or a peer model.

The strategies read state others own and keep no copy of it: backend states
from the Runtime's backends, the requests admitted per model from the
scheduler (``admitted``: waiting, loading or in flight). The scheduler never
sees requests to peer models and remote models, so :class:`SelectorState`
counts those while they are relayed, and keeps spillover's turn per selector.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

from swapd.backend import State
from swapd.config import SelectorConfig
from swapd.server import profiles
from swapd.server.errors import ClientError


class Choice(NamedTuple):
    name: str  # the model name to route: after the active profile's pin and a selector's pick
    selector: str = ""  # the selector that picked it ("" when none did)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One target as a strategy sees it."""

    target: str  # as configured (a model id, alias or peer model)
    state: State | None  # a started-on-demand model's backend state; None for a peer or remote model
    load: int = 0  # requests admitted and not finished (scheduler.admitted, or SelectorState for the others)


class NoTarget(Exception):
    pass


def warm(candidates: Sequence[Candidate]) -> str:
    """The first ready target, else the first one starting, else the first (which then starts)."""
    for wanted in (State.READY, State.STARTING):
        for candidate in candidates:
            if candidate.state is wanted:
                return candidate.target
    return candidates[0].target


def spillover(candidates: Sequence[Candidate], limit: int, turn: int) -> tuple[str, bool]:
    """Fill the targets in use up to ``limit`` requests each, then bring in the next one.

    A target is in use when its model is ready or starting, or has requests
    (queued behind a swap, or a peer's); one stopping is skipped. Among those
    in use, the least busy gets the request (ties take turns: ``turn``). Only
    when each has ``limit`` or more does the first target not in use get it;
    with none left, the least busy again. Returns the target and whether the
    turn was used (the caller then advances it).
    """
    active: list[Candidate] = []
    cold: list[Candidate] = []
    for candidate in candidates:
        if candidate.state is State.STOPPING:
            continue
        if candidate.state in (State.READY, State.STARTING) or candidate.load > 0:
            active.append(candidate)
        else:
            cold.append(candidate)
    if not active:
        if not cold:
            raise NoTarget
        return cold[0].target, False
    least = min(c.load for c in active)
    if least >= limit and cold:
        return cold[0].target, False
    tied = [c for c in active if c.load == least]
    return tied[turn % len(tied)].target, True


class SelectorState:
    """Requests in flight to models the scheduler does not lease (peer and remote models), and spillover's turns.

    Only routing's relay of a peer or remote model request counts (``relaying``);
    only :func:`pick` reads the counts and moves the turns.
    """

    def __init__(self) -> None:
        self._in_flight: dict[str, int] = {}  # "peer/model" or a remote model's id -> requests being relayed
        self._turns: dict[str, int] = {}  # selector id -> spillover's next turn among tied targets

    def in_flight(self, key: str) -> int:
        return self._in_flight.get(key, 0)

    @contextmanager
    def relaying(self, key: str) -> Iterator[None]:
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            yield
        finally:
            left = self._in_flight[key] - 1
            if left:
                self._in_flight[key] = left
            else:
                del self._in_flight[key]

    def turn(self, selector_id: str) -> int:
        return self._turns.get(selector_id, 0)

    def advance(self, selector_id: str) -> None:
        self._turns[selector_id] = self._turns.get(selector_id, 0) + 1


def _candidates(rt, selector: SelectorConfig, with_load: bool) -> list[Candidate]:
    config = rt.config
    admitted = rt.scheduler.admitted() if with_load else {}
    out = []
    for target in selector.targets:
        model = config.resolve(target)
        if model is not None and not model.remote:
            backend = rt.backends.get(model.id)
            state = backend.state if backend is not None else State.STOPPED
            out.append(Candidate(target, state, admitted.get(model.id, 0)))
            continue
        if model is not None:  # remote: always ready, never leased
            key = model.id
        else:
            found = config.resolve_peer(target)
            if found is None:  # the config checked every target; a name gone since is skipped
                continue
            key = f"{found[0].id}/{found[1]}"
        state = State.READY if model is not None and selector.strategy == "warm" else None
        out.append(Candidate(target, state, rt.selector_state.in_flight(key) if with_load else 0))
    return out


def pick(rt, selector: SelectorConfig) -> str:
    """The target ``selector`` picks for one request now (503 when a spillover has none available)."""
    if selector.strategy == "pin":
        return selector.targets[0]
    candidates = _candidates(rt, selector, with_load=selector.strategy == "spillover")
    if selector.strategy == "warm":
        if not candidates:
            raise ClientError(503, f"selector {selector.id!r} has no available targets", "no_available_target")
        return warm(candidates)
    state: SelectorState = rt.selector_state
    try:
        target, turned = spillover(candidates, selector.spillover, state.turn(selector.id))
    except NoTarget:
        raise ClientError(
            503,
            f"selector {selector.id!r} has no available spillover targets (all are stopping)",
            "no_available_target",
            headers={"Retry-After": "1"},
        ) from None
    if turned:
        state.advance(selector.id)
    return target


def choose(rt, name: str) -> Choice:
    """What a request's model name routes to now: the active profile's pin, then a selector's pick."""
    name = profiles.pin(rt, name)
    selector = rt.config.selectors.get(name)
    if selector is None:
        return Choice(name)
    return Choice(pick(rt, selector), selector.id)


def listing(rt) -> list[tuple[str, str, str, dict[str, Any], str]]:
    """``/v1/models`` entries for the listed selectors and the active profile's pins, as llama-swap renders them.

    Each is (id, name, description, llamaswap metadata, status). A selector is
    "loaded" when one of its local targets is ready or starting (for ``pin``,
    only its first target counts).
    """
    config = rt.config
    out: list[tuple[str, str, str, dict[str, Any], str]] = []
    for selector in config.selectors.values():
        if selector.unlisted:
            continue
        status = "unloaded"
        for target in selector.targets:
            model = config.resolve(target)
            backend = rt.backends.get(model.id) if model is not None else None
            if backend is not None and backend.state in (State.READY, State.STARTING):
                status = "loaded"
            if selector.strategy == "pin" or status == "loaded":
                break
        meta: dict[str, Any] = {
            **selector.metadata,
            "type": "selector",
            "strategy": selector.strategy,
            "targets": list(selector.targets),
        }
        if selector.strategy == "spillover":
            meta["spillover"] = selector.spillover
        out.append((selector.id, selector.name, selector.description, meta, status))
    taken = set(config.models) | set(config.aliases) | set(config.selectors)
    for peer in config.peers.values():
        for peer_model in peer.models:
            taken.add(f"{peer.id}/{peer_model}")
            if config.resolve_peer(peer_model) == (peer, peer_model):
                taken.add(peer_model)
    for pin_name, meta in profiles.listing(rt, taken):
        out.append((pin_name, "", "", meta, "unloaded"))
    return out
