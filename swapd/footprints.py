"""Model footprints: how much GPU memory each model needs, and on which devices.

:class:`FootprintBook` is the one owner of this knowledge. A footprint comes
from the first source that exists (see :meth:`FootprintBook.footprint`):

1. ``configured``: the model's ``vram`` key;
2. ``measured``: the most its process tree held on each device while it ran
   (fed by :class:`swapd.gpu.VramVerifier` through :meth:`observe`), kept in
   ``$XDG_STATE_HOME/swapd/footprints.json`` across restarts, keyed by model id
   and a hash of its command and environment, so a changed ``cmd`` is measured
   again;
3. ``estimated``: read from the GGUF named in ``cmd`` (:mod:`swapd.gpu.estimate`),
   computed off the event loop by :meth:`prepare`;
4. ``unknown``: nothing is known; the vram router assumes the whole device.

Every method here is synchronous and cheap except :meth:`prepare` and
:meth:`flush`, which do their file I/O in a thread; the scheduler's decisions
read footprints on the event loop, up to once per model per decision.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swapd.config import Config, ModelConfig
from swapd.logging import get_logger

log = get_logger("swapd.gpu")

STORE_VERSION = 1
STORE_NAME = "footprints.json"
# A new peak is written out when it grew by more than this (MiB) since the last write.
PERSIST_STEP_MIB = 16.0
SOURCES = ("configured", "measured", "estimated", "unknown")


@dataclass(frozen=True)
class Footprint:
    """What a model needs: MiB on each device it uses (empty when ``unknown``)."""

    source: str  # one of SOURCES
    devices: tuple[int, ...]
    mib: Mapping[int, float]
    detail: str | None = None  # e.g. the estimate's parts, or why it is unknown

    @property
    def known(self) -> bool:
        return self.source != "unknown"

    @property
    def total_mib(self) -> float | None:
        return round(sum(self.mib.values()), 1) if self.known else None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mib": self.total_mib, "source": self.source, "devices": list(self.devices)}
        if len(self.devices) > 1 and self.known:
            out["by_device"] = {str(d): round(self.mib.get(d, 0.0), 1) for d in self.devices}
        if self.detail:
            out["detail"] = self.detail
        return out


def command_key(model: ModelConfig) -> str:
    """A hash of what decides a model's memory: its command and its environment.

    The port swapd assigned (``${PORT}``) changes with ``startPort`` and the
    model's place in the file, never the memory, so it is hashed as ``${PORT}``."""
    argv = list(model.cmd)
    if model.port is not None:
        port = str(model.port)
        argv = ["${PORT}" if a == port else a.replace("=" + port, "=${PORT}") for a in argv]
    text = json.dumps([argv, [list(kv) for kv in model.env]], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/swapd`` (``~/.local/state/swapd`` when unset)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "swapd"


def visible_devices(model: ModelConfig, uuids: Mapping[str, int] | None = None) -> tuple[int, ...] | None:
    """The GPU indices ``CUDA_VISIBLE_DEVICES`` in the model's ``env`` names, or None when
    it sets none (or names none swapd can place: MIG instances, unknown UUIDs)."""
    value = model.env_value("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    out: list[int] = []
    for part in value.split(","):
        part = part.strip()
        if part.isdigit():
            index = int(part)
        elif uuids and part in uuids:
            index = uuids[part]
        else:
            continue
        if index not in out:
            out.append(index)
    return tuple(out) or None


@dataclass
class _Measured:
    key: str  # command_key when measured
    mib: dict[int, float]  # device -> peak MiB
    at: float  # time.time() of the last new peak
    written: float = 0.0  # total MiB at the last write to the store


class FootprintStore:
    """The file that keeps measured footprints across restarts (atomic writes)."""

    def __init__(self, directory: Path | None) -> None:
        self.path = None if directory is None else Path(directory) / STORE_NAME

    def load(self) -> dict[str, _Measured]:
        if self.path is None:
            return {}
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("footprints.unreadable", path=str(self.path), error=str(exc))
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") != STORE_VERSION:
                raise ValueError(f"not a version {STORE_VERSION} footprint file")
            out: dict[str, _Measured] = {}
            for model_id, entry in data["models"].items():
                mib = {int(d): float(v) for d, v in entry["mib"].items() if float(v) >= 0}
                out[str(model_id)] = _Measured(str(entry["key"]), mib, float(entry.get("at", 0)), sum(mib.values()))
            return out
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning(
                "footprints.corrupt",
                path=str(self.path),
                error=str(exc) or type(exc).__name__,
                detail="ignored; footprints will be measured again",
            )
            return {}

    def save(self, entries: Mapping[str, _Measured]) -> None:
        if self.path is None:
            return
        data = {
            "version": STORE_VERSION,
            "models": {
                m: {"key": e.key, "mib": {str(d): round(v, 1) for d, v in sorted(e.mib.items())}, "at": round(e.at)}
                for m, e in sorted(entries.items())
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{STORE_NAME}.{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


Estimator = Callable[[ModelConfig], "tuple[float, str] | None"]


def _default_estimator(model: ModelConfig) -> tuple[float, str] | None:
    """MiB and a one-line account from swapd.gpu.estimate, or None."""
    from swapd.gpu import estimate

    env = dict(model.env)
    found = estimate.estimate_footprint(model.cmd, env)
    if found is None:
        return None
    parts = ", ".join(f"{k} {v:.0f}" for k, v in found.parts.items())
    return found.mib, f"{os.path.basename(found.model_path)}: {parts} MiB"


class FootprintBook:
    """The owner of every model's footprint (see the module doc)."""

    def __init__(self, store: FootprintStore | None = None, estimator: Estimator | None = None) -> None:
        self._store = store if store is not None else FootprintStore(None)
        self._estimator = estimator or _default_estimator
        self._measured: dict[str, _Measured] = self._store.load()
        self._estimates: dict[str, tuple[str, float, str] | None] = {}  # model -> (key, MiB, detail)
        self._keys: dict[str, tuple[ModelConfig, str]] = {}  # model -> (its config object, command_key)
        self._cache: dict[str, tuple[ModelConfig, Footprint]] = {}
        self._uuids: dict[str, int] = {}
        self._dirty = False
        self._flushing: asyncio.Task | None = None

    # -- reading -----------------------------------------------------------------
    def key(self, model: ModelConfig) -> str:
        cached = self._keys.get(model.id)
        if cached is not None and cached[0] is model:
            return cached[1]
        key = command_key(model)
        self._keys[model.id] = (model, key)
        return key

    def measured(self, model: ModelConfig) -> Mapping[int, float] | None:
        entry = self._measured.get(model.id)
        if entry is None or entry.key != self.key(model) or not entry.mib:
            return None
        return entry.mib

    def devices(self, model: ModelConfig) -> tuple[int, ...]:
        """Where the model runs: CUDA_VISIBLE_DEVICES, else where it held memory last time, else GPU 0."""
        found = visible_devices(model, self._uuids)
        if found is not None:
            return found
        entry = self._measured.get(model.id)
        if entry is not None and entry.mib:
            held = tuple(sorted(d for d, v in entry.mib.items() if v > 0))
            if held:
                return held
        return (0,)

    def footprint(self, model: ModelConfig) -> Footprint:
        cached = self._cache.get(model.id)
        if cached is not None and cached[0] is model:
            return cached[1]
        fp = self._compute(model)
        self._cache[model.id] = (model, fp)
        return fp

    def _compute(self, model: ModelConfig) -> Footprint:
        vram = model.vram
        if isinstance(vram, tuple):
            mib = dict(vram)
            return Footprint("configured", tuple(sorted(mib)), mib)
        if vram is not None:
            devices = self.devices(model)
            return Footprint("configured", devices, {d: float(vram) for d in devices})
        measured = self.measured(model)
        if measured is not None:
            devices = visible_devices(model, self._uuids) or tuple(sorted(measured))
            return Footprint("measured", devices, {d: measured.get(d, 0.0) for d in devices})
        est = self._estimates.get(model.id)
        if est is not None and est[0] == self.key(model):
            devices = self.devices(model)
            share = est[1] / len(devices)
            return Footprint("estimated", devices, {d: share for d in devices}, est[2])
        return Footprint("unknown", self.devices(model), {}, "never measured, and no GGUF to estimate from")

    def all(self, config: Config) -> dict[str, Footprint]:
        # a remote model (proxy, no cmd) runs elsewhere: it holds none of this machine's memory
        return {m: self.footprint(mc) for m, mc in config.models.items() if not mc.remote}

    # -- learning ------------------------------------------------------------------
    def set_device_uuids(self, uuids: Mapping[str, int]) -> None:
        """NVML's GPU UUIDs, so CUDA_VISIBLE_DEVICES=GPU-... places a model."""
        self._uuids = dict(uuids)
        self._cache.clear()

    def observe(self, model: ModelConfig, usage: Mapping[int, float]) -> None:
        """One reading of what the model's running tree holds now, per device."""
        if not usage or not any(v > 0 for v in usage.values()):
            return
        key = self.key(model)
        entry = self._measured.get(model.id)
        if entry is None or entry.key != key:
            entry = self._measured[model.id] = _Measured(key, {}, time.time())
        grew = False
        for device, mib in usage.items():
            if mib > entry.mib.get(device, 0.0):
                entry.mib[device] = float(mib)
                grew = True
        if grew:
            entry.at = time.time()
            self._cache.pop(model.id, None)
            if sum(entry.mib.values()) - entry.written > PERSIST_STEP_MIB:
                self._dirty = True

    def forget_stale(self, config: Config) -> list[str]:
        """Drop measurements whose model is gone or whose command changed (after a reload)."""
        gone = []
        for model_id, entry in list(self._measured.items()):
            mc = config.models.get(model_id)
            if mc is None or entry.key != self.key(mc):
                del self._measured[model_id]
                gone.append(model_id)
        if gone:
            self._dirty = True
        self._cache.clear()
        return gone

    # -- I/O, off the loop -------------------------------------------------------------
    async def prepare(self, models: Iterable[ModelConfig]) -> None:
        """Estimate, in a thread, every model with neither a configured nor a measured footprint."""
        todo = [
            m
            for m in models
            if m.vram is None
            and self.measured(m) is None
            and (self._estimates.get(m.id) is None or self._estimates[m.id][0] != self.key(m))  # type: ignore[index]
        ]
        if not todo:
            return
        results = await asyncio.to_thread(self._estimate_all, todo)
        for model, result in zip(todo, results, strict=True):
            key = self.key(model)
            self._estimates[model.id] = None if result is None else (key, result[0], result[1])
            self._cache.pop(model.id, None)

    def _estimate_all(self, models: list[ModelConfig]) -> list[tuple[float, str] | None]:
        out: list[tuple[float, str] | None] = []
        for model in models:
            try:
                out.append(self._estimator(model))
            except Exception as exc:  # an estimator bug must never stop scheduling
                log.warning("footprints.estimate_failed", model=model.id, error=repr(exc))
                out.append(None)
        return out

    async def flush(self, force: bool = False) -> None:
        """Write the measured footprints when a peak grew enough (or ``force``)."""
        if not (self._dirty or force) or self._store.path is None:
            return
        self._dirty = False
        snapshot = {m: _Measured(e.key, dict(e.mib), e.at) for m, e in self._measured.items()}
        try:
            await asyncio.to_thread(self._store.save, snapshot)
        except OSError as exc:
            log.warning("footprints.write_failed", path=str(self._store.path), error=str(exc))
            return
        for model_id, entry in self._measured.items():
            if model_id in snapshot:
                entry.written = sum(snapshot[model_id].mib.values())
