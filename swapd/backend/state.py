"""A backend's states, the transitions allowed between them, and what a start or stop reports."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


# Not enum.StrEnum (ruff UP042): StrEnum changes str()/format() of a member from "State.READY" to "ready",
# and callers use ``.value`` where they mean the text; keep the existing behaviour.
class State(str, enum.Enum):  # noqa: UP042
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


# Every state change a backend may make; anything else is a bug and raises
# InvalidTransition instead of silently overwriting the state (after
# llama-swap's Process). STARTING -> STOPPED is a start that failed or was
# cancelled; READY -> STOPPING covers both a requested stop and a crash.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING}),
    State.STARTING: frozenset({State.READY, State.STOPPING, State.STOPPED}),
    State.READY: frozenset({State.STOPPING}),
    State.STOPPING: frozenset({State.STOPPED}),
}


class InvalidTransition(RuntimeError):
    """A backend was asked to move between two states the table does not allow."""

    def __init__(self, model_id: str, old: State, new: State) -> None:
        self.model_id = model_id
        self.old = old
        self.new = new
        super().__init__(f"model {model_id}: invalid state transition {old.value} -> {new.value}")


def check_transition(model_id: str, old: State, new: State) -> None:
    """Raise InvalidTransition unless ``old -> new`` is in TRANSITIONS."""
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(model_id, old, new)


class StartError(Exception):
    """The backend could not be made ready. The message is meant for a person."""

    def __init__(self, model_id: str, message: str, *, exit_code: int | None = None, tail: list[str] | None = None):
        self.model_id = model_id
        self.exit_code = exit_code
        self.tail = tail or []
        super().__init__(message)

    def detail(self) -> str:
        text = str(self)
        if self.tail:
            text += "\nlast output:\n" + "\n".join(self.tail)
        return text


@dataclass
class StopReport:
    model_id: str
    reason: str
    root_pid: int | None
    pids: list[int]
    forced: list[int] = field(default_factory=list)  # pids that needed SIGKILL
    survivors: list[int] = field(default_factory=list)  # pids still alive at the end
    seconds: float = 0.0
    exit_code: int | None = None
    vram_freed_mib: float | None = None  # set by swapd.gpu's stop guard when it verified the stop
