"""The memory-aware router (``routing.router.use: vram``).

Models run side by side while their footprints fit on their GPUs; when a cold
model does not fit, idle models on its GPUs stop, least recently used first,
until it does. The decision is :func:`plan`, pure and synchronous: the target,
the running set, the config, the footprints (:class:`swapd.gpu.FootprintBook`)
and a :class:`MemoryView` (what NVML said last) in, a :class:`Decision` out.

The free budget of a GPU = its total - ``reserve`` - memory held by processes
swapd does not manage - what every model running or starting there is charged.
A model is charged the larger of its footprint and what NVML sees it hold now;
a model still starting with an unknown footprint is charged its whole GPU, so
nothing starts beside it until it has been measured.

``modelsMax`` caps the count the same way (least recently used first) and
needs no GPU. Pinned models are never chosen. Busy models may be chosen (idle
ones always first); the scheduler then waits until they finish, so a model is
never stopped mid-stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from swapd.config import Config, ModelConfig, VramSettings
from swapd.footprints import Footprint, FootprintBook
from swapd.router import Decision, Eviction, RunningModel

LOADING_STATES = ("starting", "swapping")


@dataclass(frozen=True)
class DeviceMemory:
    index: int
    total_mib: float
    unmanaged_mib: float  # used (and driver-reserved) memory that no running model's processes hold


@dataclass(frozen=True)
class MemoryView:
    """One NVML reading, attributed: per device, and what each running model holds."""

    devices: Mapping[int, DeviceMemory]
    usage: Mapping[str, Mapping[int, float]] = field(default_factory=dict)  # model -> device -> MiB
    at: float = field(default_factory=time.monotonic)


def _order(candidates: list[RunningModel]) -> list[RunningModel]:
    """Idle models first, then busy ones; each least recently used first (never used = oldest)."""
    return sorted(candidates, key=lambda m: (m.in_flight > 0, m.last_used if m.last_used is not None else -1.0, m.id))


def _idle(model: RunningModel, now: float) -> float | None:
    return None if model.last_used is None else round(max(0.0, now - model.last_used), 3)


def _fmt(mib: float) -> str:
    return f"{mib:.0f} MiB"


def plan(
    target: ModelConfig,
    running: Mapping[str, RunningModel],
    config: Config,
    footprints: Callable[[ModelConfig], Footprint],
    view: MemoryView | None,
    *,
    loaded: bool = False,
    now: float | None = None,
) -> Decision:
    """Which of ``running`` must stop so that ``target`` fits (see the module doc).

    ``loaded``: the target already runs or is starting, so it needs no room.
    ``view`` None: no NVML, so only ``modelsMax`` applies.
    """
    settings = config.vram_router or VramSettings()
    now = time.monotonic() if now is None else now
    pinned = set(settings.pinned)
    evict: list[str] = []
    why: dict[str, Eviction] = {}
    kept: dict[str, RunningModel] = {}
    for model_id, rm in running.items():
        if model_id == target.id:
            continue
        if model_id not in config.models:
            evict.append(model_id)
            why[model_id] = Eviction("removed", _idle(rm, now))
        else:
            kept[model_id] = rm

    def take(rm: RunningModel, reason: str, mib: float | None = None) -> None:
        del kept[rm.id]
        evict.append(rm.id)
        why[rm.id] = Eviction(reason, _idle(rm, now), None if mib is None else round(mib, 1))

    if loaded:
        return Decision(tuple(evict), None, why)

    # -- the count cap (llama.cpp's --models-max) ---------------------------------
    if settings.models_max > 0:
        excess = len(kept) + 1 - settings.models_max
        if excess > 0:
            candidates = _order([rm for rm in kept.values() if rm.id not in pinned])
            if len(candidates) < excess:
                return Decision(
                    (),
                    f"model {target.id!r} cannot start: modelsMax is {settings.models_max} and "
                    f"the models running ({', '.join(sorted(kept))}) are pinned",
                )
            for rm in candidates[:excess]:
                take(rm, "count")

    if view is None:
        return Decision(tuple(evict), None, why)

    # -- memory ----------------------------------------------------------------
    fp = footprints(target)
    devices = [d for d in fp.devices if d in view.devices]
    charges: dict[str, dict[int, float]] = {}
    for model_id, rm in kept.items():
        charges[model_id] = _charge(config.models[model_id], rm, footprints, view)

    if not fp.known:
        # Assume the target needs its whole GPU(s): every idle or busy model there stops, pinned ones excepted.
        for rm in _order(list(kept.values())):
            held = sum(charges[rm.id].get(d, 0.0) for d in devices)
            if rm.id not in pinned and held > 0:
                take(rm, "unknown_footprint", held)
        return Decision(tuple(evict), None, why)

    need = {d: fp.mib.get(d, 0.0) for d in devices}
    capacity = {}
    for d in devices:
        dev = view.devices[d]
        cap = dev.total_mib - settings.reserve_mib - dev.unmanaged_mib
        capacity[d] = cap
        held_by_pinned = sum(charges[m].get(d, 0.0) for m in kept if m in pinned)
        if need[d] > cap - held_by_pinned:
            parts = [f"{_fmt(dev.total_mib)} total", f"{_fmt(settings.reserve_mib)} reserve"]
            if dev.unmanaged_mib >= 1:
                parts.append(f"{_fmt(dev.unmanaged_mib)} held by processes swapd does not manage")
            if held_by_pinned >= 1:
                parts.append(f"{_fmt(held_by_pinned)} held by pinned models")
            return Decision(
                (),
                f"model {target.id!r} needs {_fmt(need[d])} on GPU {d} ({fp.source} footprint) but can never "
                f"fit there: GPU {d} has a budget of {_fmt(max(0.0, cap - held_by_pinned))} "
                f"({' - '.join(parts)})",
            )

    def deficit() -> dict[int, float]:
        out = {}
        for d in devices:
            used = sum(charges[m].get(d, 0.0) for m in kept)
            short = need[d] - (capacity[d] - used)
            if short > 0:
                out[d] = short
        return out

    short = deficit()
    while short:
        candidates = _order(
            [rm for rm in kept.values() if rm.id not in pinned and any(charges[rm.id].get(d, 0.0) > 0 for d in short)]
        )
        if not candidates:  # cannot happen after the never-fits check; refuse rather than loop
            return Decision((), f"model {target.id!r} does not fit and no model can be stopped for it")
        victim = candidates[0]
        take(victim, "vram", sum(charges[victim.id].values()))
        short = deficit()
    return Decision(tuple(evict), None, why)


def _charge(
    model: ModelConfig, rm: RunningModel, footprints: Callable[[ModelConfig], Footprint], view: MemoryView
) -> dict[int, float]:
    """MiB counted against each device for one running (or starting) model."""
    fp = footprints(model)
    held = dict(view.usage.get(model.id, {}))
    if fp.known:
        out = {d: max(fp.mib.get(d, 0.0), held.get(d, 0.0)) for d in set(fp.mib) | set(held)}
    elif rm.state in LOADING_STATES:
        out = dict(held)
        for d in fp.devices:
            if d in view.devices:
                out[d] = view.devices[d].total_mib  # unmeasured and loading: assume it takes the GPU
    else:
        out = held
    return out


class VramRouter:
    """The :class:`swapd.router.Router` for ``use: vram``: gathers :func:`plan`'s inputs.

    ``view`` returns the latest :class:`MemoryView` (None without NVML);
    ``loaded`` says whether a model runs or starts already.
    """

    def __init__(
        self,
        book: FootprintBook,
        view: Callable[[], MemoryView | None],
        loaded: Callable[[str], bool],
    ) -> None:
        self.book = book
        self._view = view
        self._loaded = loaded

    def decide(self, target: str, running: Mapping[str, RunningModel], config: Config) -> Decision:
        model = config.models.get(target)
        if model is None:
            return Decision()
        return plan(model, running, config, self.book.footprint, self._view(), loaded=self._loaded(target))

    def budget(self, config: Config, running: Mapping[str, RunningModel]) -> dict[int, dict[str, float]]:
        """Per device: total, reserve, unmanaged, charged to models, and the budget left (for /running)."""
        view = self._view()
        if view is None:
            return {}
        settings = config.vram_router or VramSettings()
        out: dict[int, dict[str, float]] = {}
        for d, dev in sorted(view.devices.items()):
            charged = sum(
                _charge(config.models[m], rm, self.book.footprint, view).get(d, 0.0)
                for m, rm in running.items()
                if m in config.models
            )
            left = dev.total_mib - settings.reserve_mib - dev.unmanaged_mib - charged
            out[d] = {
                "total_mib": round(dev.total_mib, 1),
                "reserve_mib": round(settings.reserve_mib, 1),
                "unmanaged_mib": round(dev.unmanaged_mib, 1),
                "models_mib": round(charged, 1),
                "free_budget_mib": round(left, 1),
            }
        return out
