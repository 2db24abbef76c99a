"""A backend's state machine: the table of allowed transitions, and a real
backend process (the fake backend) moving only along it."""

from __future__ import annotations

import asyncio
import itertools
import socket

import pytest

from helpers import fake_cmd
from swapd.backend import TRANSITIONS, Backend, InvalidTransition, StartError, State, check_transition
from swapd.config import load_config_text
from swapd.logring import LogRing

ALLOWED = {
    (State.STOPPED, State.STARTING),
    (State.STARTING, State.READY),
    (State.STARTING, State.STOPPING),
    (State.STARTING, State.STOPPED),
    (State.READY, State.STOPPING),
    (State.STOPPING, State.STOPPED),
}


def test_the_table_is_exactly_the_allowed_transitions():
    table = {(old, new) for old, targets in TRANSITIONS.items() for new in targets}
    assert table == ALLOWED
    assert set(TRANSITIONS) == set(State)


@pytest.mark.parametrize("old, new", sorted(itertools.product(State, State)))
def test_every_other_transition_raises(old, new):
    if (old, new) in ALLOWED:
        check_transition("m", old, new)
        return
    with pytest.raises(InvalidTransition) as info:
        check_transition("m", old, new)
    assert (info.value.old, info.value.new, info.value.model_id) == (old, new, "m")
    assert f"{old.value} -> {new.value}" in str(info.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(*opts: str):
    port = _free_port()
    text = f"models:\n  m:\n    cmd: {fake_cmd(*opts, port=str(port))}\n    proxy: http://127.0.0.1:{port}\n"
    return load_config_text(text).models["m"]


def _backend(*opts: str) -> tuple[Backend, list[tuple[State, State]]]:
    seen: list[tuple[State, State]] = []
    backend = Backend(_model(*opts), logs=LogRing(), session=None, on_state=lambda b, old, new: seen.append((old, new)))
    return backend, seen


def test_state_is_read_only_and_a_wrong_move_raises_without_changing_it():
    backend, seen = _backend()
    with pytest.raises(AttributeError):
        backend.state = State.READY  # type: ignore[misc]
    with pytest.raises(InvalidTransition):
        backend._set_state(State.READY)
    assert backend.state is State.STOPPED and seen == []


def test_a_real_backend_moves_only_along_the_table():
    async def main():
        backend, seen = _backend()
        await backend.start()
        assert backend.state is State.READY
        await backend.stop("test")
        await backend.close()
        failing, failed_seen = _backend("--exit-at-start", "3")
        with pytest.raises(StartError):
            await failing.start()
        await failing.close()
        # stop() while the start is still waiting for health
        slow, slow_seen = _backend("--load-delay", "30")
        starting = asyncio.ensure_future(slow.start())
        while slow.pid is None:
            await asyncio.sleep(0.01)
        await slow.stop("unload")
        with pytest.raises(StartError):
            await starting
        await slow.close()
        return seen, failed_seen, slow_seen, slow.state

    seen, failed_seen, slow_seen, slow_state = asyncio.run(main())
    assert seen == [
        (State.STOPPED, State.STARTING),
        (State.STARTING, State.READY),
        (State.READY, State.STOPPING),
        (State.STOPPING, State.STOPPED),
    ]
    assert failed_seen == [(State.STOPPED, State.STARTING), (State.STARTING, State.STOPPED)]
    assert slow_seen == [(State.STOPPED, State.STARTING), (State.STARTING, State.STOPPING), (State.STOPPING, State.STOPPED)]
    assert slow_state is State.STOPPED


def test_reconfigure_applies_now_or_at_the_next_start():
    backend, _ = _backend()
    first = backend.model
    other = _model("--chunks", "2")
    backend.reconfigure(other, restart=True)
    assert backend.model is first and backend.next_model is other
    backend.reconfigure(other, restart=False)
    assert backend.model is other
