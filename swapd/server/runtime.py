"""The runtime: the one owner of the config, the ``backends`` table and the active profile.

The scheduler and the GPU verifier read both through the
:class:`swapd.scheduler.RuntimeView` protocol and never keep their own copy;
only :meth:`Runtime.reload` (which cli.py's SIGHUP and file-watch paths call)
replaces the config or adds and removes backends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiohttp

from swapd.backend import Backend
from swapd.config import Config, ModelConfig
from swapd.logging import get_logger
from swapd.scheduler import Scheduler
from swapd.server import observe
from swapd.server.selectors import SelectorState
from swapd.server.upstream import UpstreamPool
from swapd.telemetry.hub import Telemetry

if TYPE_CHECKING:
    from swapd.gpu import VramVerifier

config_log = get_logger("swapd.config")


class Runtime:
    """Everything the handlers share, in one place a reload can swap safely.

    The aiohttp app's own mapping is frozen once it starts, so state that a
    config reload replaces lives here instead.
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self.logs = observe.ObservedLogRing()
        self.events = observe.EventHub(lambda: observe.model_status(self))
        self.upstream_echo = observe.UpstreamEcho()  # logToStdout: upstream|both
        self.logs.listeners += [self.events.on_log_line, self.upstream_echo]
        self.log_sink: Any = None  # swapd.logging's sink, set by cli.py; log settings are re-applied on reload
        self.listen_host: str | None = None  # the name given to --listen: an allowed Host (webguard), set by cli.py
        self._session: aiohttp.ClientSession | None = None  # https backends and peers, https health checks
        self.pool = UpstreamPool()  # plain-http backends and peers: the hot path
        self.telemetry = Telemetry()  # request records and their sinks (metrics, activity, traces)
        self._backends: dict[str, Backend] = {}
        self._scheduler: Scheduler | None = None
        self.gpu: VramVerifier | None = None  # swapd.gpu's verifier, set by gpu_api.install when the app starts
        self._reload_lock = asyncio.Lock()
        self._active_profile: str | None = None  # none at start; see set_active_profile
        self.selector_state = SelectorState()  # peer and remote requests in flight, spillover's turns

    # -- what others read (swapd.scheduler.RuntimeView) -------------------------
    @property
    def config(self) -> Config:
        return self._config

    @property
    def active_profile(self) -> str | None:
        """The active profile's id (``profiles``), or None: none is active at start."""
        return self._active_profile

    def set_active_profile(self, name: str | None) -> bool:
        """Make profile ``name`` the active one (None: none); True if that changed it.

        Raises KeyError for a name the config has no profile for. Event-stream
        clients get a ``profileChanged`` record.
        """
        if name is not None and name not in self._config.profiles:
            raise KeyError(name)
        if name == self._active_profile:
            return False
        self._active_profile = name
        config_log.info("profile.active", profile=name)
        self.events.profile_changed(name)
        return True

    @property
    def backends(self) -> Mapping[str, Backend]:
        """The backends by model id; read-only for everyone but this class."""
        return self._backends

    # -- set once the app starts (:meth:`start`) --------------------------------------
    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError("Runtime.scheduler used before Runtime.start() (the app has not started)")
        return self._scheduler

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Runtime.session used before Runtime.start() (the app has not started)")
        return self._session

    # -- lifecycle -----------------------------------------------------------------
    def new_backend(self, mc: ModelConfig) -> Backend:
        return Backend(
            mc,
            logs=self.logs,
            session=self.session,
            on_exit=self._on_backend_exit,
            on_state=self._on_backend_state,
        )

    def _on_backend_state(self, backend: Backend, old, new) -> None:
        self.telemetry.on_backend_state(backend, old, new)
        self.events.on_backend_state(backend, old, new)

    def _on_backend_exit(self, backend: Backend, code: int | None) -> None:
        self.telemetry.on_crash(backend.id)
        self.scheduler.on_backend_exit(backend, code)

    def start(self, session: aiohttp.ClientSession) -> Scheduler:
        """Create the scheduler and one backend per configured model (app start-up)."""
        self._session = session
        scheduler = self._scheduler = Scheduler(self)
        scheduler.on_stop.append(self.telemetry.on_stop)
        for mc in self._config.models.values():
            if not mc.remote:  # a remote model runs elsewhere: nothing to start, stop or schedule
                self._backends[mc.id] = self.new_backend(mc)
        return scheduler

    async def reload(self, new: Config, why: str = "reload") -> dict[str, list[str]]:
        """Apply a new, already loaded config: the one place a reload happens.

        Only changed or removed models are stopped; models whose effective
        config is identical keep running and keep their in-flight requests.
        Log settings are re-applied and event-stream clients told. One reload
        runs at a time.
        """
        async with self._reload_lock:
            for warning in new.warnings:
                config_log.warning("config.warning", file=new.path, message=warning)
            changes = await self._apply_models(new)
            if self._active_profile is not None and self._active_profile not in new.profiles:
                config_log.warning("profile.dropped", profile=self._active_profile, reason="not in the new config")
                self._active_profile = None  # the profile kept its place only while the config still has it
                self.events.profile_changed(None)
            if self.gpu is not None:
                self.gpu.prepare_footprints()  # a changed cmd is measured (or estimated) again
            for warning in observe.apply_log_settings(new, self.log_sink, self.upstream_echo):
                config_log.warning("config.warning", file=new.path, message=warning)
            self.events.models_changed()
            config_log.info("config.reloaded", reason=why, **changes)
            return changes

    async def _apply_models(self, new: Config) -> dict[str, list[str]]:
        old = self._config
        removed = [m for m in old.models if m not in new.models]
        changed = [m for m in old.models if m in new.models and old.models[m].fingerprint != new.models[m].fingerprint]
        added = [m for m in new.models if m not in old.models]
        # Only local models have a backend; one that became remote loses its backend like a removed one.
        gone = [m for m in self._backends if m not in new.models or new.models[m].remote]
        for model_id, mc in new.models.items():
            if mc.remote:
                continue
            if model_id in self._backends:
                self._backends[model_id].reconfigure(mc, restart=model_id in changed)
            else:
                self._backends[model_id] = self.new_backend(mc)
        self._config = new
        stop = gone + [m for m in changed if m in self._backends and m not in gone]
        if stop:
            await self.scheduler.unload(stop, reason="reload")
        for model_id in gone:
            await self._backends.pop(model_id).close()
        return {"added": added, "changed": changed, "removed": removed}
