"""GPU memory through NVML: attribution to models and verified stops.

After a model stops, its VRAM must really be free: llama.cpp router children,
vLLM engine workers and processes forked by wrapper scripts can outlive the
process swapd started. This module measures instead of assuming.

The package: :mod:`swapd.gpu.nvml` (the NVML binding), :mod:`swapd.gpu.verdict`
(the pure decisions) and :mod:`swapd.gpu.verifier` (the verifier); every name
is re-exported here.

* :class:`Nvml` reads every GPU through nvidia-ml-py (``pynvml``; never
  nvidia-smi). NVML is initialised once and all its calls run on one dedicated
  thread, off the event loop.
* :func:`attribute` matches NVML's per-process memory with the models' process
  trees.
* :func:`judge` decides whether a stopped model's memory came back (the rule
  is described there).
* :class:`VramVerifier` wraps every stop (a ``StopGuard``) and gates every
  start (a ``StartGate``), registered with the scheduler: baseline, stop, then poll NVML until
  the memory is back, SIGKILLing any process of the model's tree that still
  holds memory; the outcome is logged, counted and kept in a bounded history.

Without an NVIDIA driver (or without nvidia-ml-py) swapd logs one info line
and runs as before; stops are then recorded as ``unavailable`` and nothing
polls.
"""

from swapd.gpu.nvml import (
    MIB,
    THROTTLE_REASONS,
    Device,
    GpuProcess,
    Nvml,
    NvmlUnavailable,
    Snapshot,
    merge_processes,
    throttle_names,
)
from swapd.gpu.verdict import (
    RECOVERY_FRACTION,
    Attribution,
    Baseline,
    Verdict,
    attribute,
    judge,
    make_baseline,
    memory_only_estimate,
    pids_visible,
)
from swapd.gpu.verifier import HISTORY_SIZE, POLL_INTERVAL, USAGE_TTL, VramVerifier
from swapd.proctree import find_orphans, process_tree

__all__ = [
    "HISTORY_SIZE",
    "MIB",
    "POLL_INTERVAL",
    "RECOVERY_FRACTION",
    "THROTTLE_REASONS",
    "USAGE_TTL",
    "Attribution",
    "Baseline",
    "Device",
    "GpuProcess",
    "Nvml",
    "NvmlUnavailable",
    "Snapshot",
    "Verdict",
    "VramVerifier",
    "attribute",
    "find_orphans",
    "judge",
    "make_baseline",
    "memory_only_estimate",
    "merge_processes",
    "pids_visible",
    "process_tree",
    "throttle_names",
]
