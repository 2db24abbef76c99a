"""Immutable result types produced by the loader."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

DEFAULT_GROUP_ID = "(default)"
PID_PLACEHOLDER = "${PID}"


@dataclass(frozen=True)
class ModelConfig:
    id: str
    cmd: tuple[str, ...]
    cmd_stop: tuple[str, ...]
    proxy: str
    port: int | None
    aliases: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    check_endpoint: str
    ttl: float
    unload_timeout: float
    health_check_timeout: float
    unlisted: bool
    use_model_name: str
    name: str
    description: str
    concurrency_limit: int
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)
    fingerprint: str = ""

    def stop_command(self, pid: int) -> tuple[str, ...]:
        """cmd_stop with every ``${PID}`` occurrence replaced by ``pid``."""
        text = str(pid)
        return tuple(arg.replace(PID_PLACEHOLDER, text) for arg in self.cmd_stop)


@dataclass(frozen=True)
class GroupConfig:
    id: str
    swap: bool
    exclusive: bool
    persistent: bool
    members: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Config:
    path: str
    health_check_timeout: float
    log_level: str
    start_port: int
    global_ttl: float
    unload_timeout: float
    models: Mapping[str, ModelConfig]
    groups: Mapping[str, GroupConfig]
    aliases: Mapping[str, str]
    raw: Mapping[str, Any]
    warnings: tuple[str, ...]

    def resolve(self, name: str) -> ModelConfig | None:
        """Find a model by id, or failing that by alias."""
        model = self.models.get(name)
        if model is not None:
            return model
        real = self.aliases.get(name)
        if real is None:
            return None
        return self.models.get(real)

    def group_of(self, model_id: str) -> GroupConfig:
        """The group a model belongs to (every model is in exactly one)."""
        for group in self.groups.values():
            if model_id in group.members:
                return group
        raise KeyError(model_id)
