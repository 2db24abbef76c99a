"""A model's backend process, and swapd's registry of its own children.

* :mod:`swapd.backend.state`: the states, the allowed transitions, StartError, StopReport.
* :mod:`swapd.backend.children`: the child registry (orphan reaping, the guardian), kill_leftovers.
* :mod:`swapd.backend.probe`: the health probe's raw-socket fast path.
* :mod:`swapd.backend.process`: :class:`Backend`.

Everything is re-exported here; import from ``swapd.backend``.
"""

from swapd.backend.children import CHILDREN, ChildRegistry, kill_leftovers
from swapd.backend.probe import _RawProbeTarget
from swapd.backend.process import START_FAILED_TAIL, TAIL_LINES, Backend
from swapd.backend.state import TRANSITIONS, InvalidTransition, StartError, State, StopReport, check_transition

__all__ = [
    "CHILDREN",
    "START_FAILED_TAIL",
    "TAIL_LINES",
    "TRANSITIONS",
    "Backend",
    "ChildRegistry",
    "InvalidTransition",
    "StartError",
    "State",
    "StopReport",
    "_RawProbeTarget",
    "check_transition",
    "kill_leftovers",
]
