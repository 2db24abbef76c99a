"""``profiles`` and ``selectors``: names that stand for another model at request time.

A selector is a name of its own that picks one of its targets for each
request; a profile, while active, pins requested names to targets (a selector
among them). Both are checked against the models, aliases and peers here.
As with group members, a target that names nothing is dropped with a warning
(llama-swap refuses the whole file); everything else llama-swap refuses, this
refuses too, naming the file, the key (which holds the profile or selector id)
and the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._format import go_str
from ._model import SELECTOR_STRATEGIES, GroupConfig, ModelConfig, PeerConfig, ProfileConfig, SelectorConfig
from ._reader import _Context, _describe, _Reader, _unknown_key_message, open_block

KNOWN_PROFILE_KEYS = ("description", "pins")
KNOWN_SELECTOR_KEYS = ("strategy", "targets", "settings", "name", "description", "unlisted", "metadata")
KNOWN_SELECTOR_SETTINGS = ("spillover",)


class _Names:
    """What a target may name: a model id or alias, or a peer model (qualified, or offered by one peer only)."""

    def __init__(
        self, models: Mapping[str, ModelConfig], aliases: Mapping[str, str], peers: Mapping[str, PeerConfig]
    ) -> None:
        self.models = models
        self.aliases = aliases
        self.peers = peers
        self.qualified = {f"{peer_id}/{name}" for peer_id, peer in peers.items() for name in peer.models}

    def local(self, name: str) -> str | None:
        if name in self.models:
            return name
        return self.aliases.get(name)

    def peer(self, name: str) -> str | None:
        """``peer/model`` for a peer model name, else None (Config.resolve_peer's rule)."""
        peer_id, sep, model = name.partition("/")
        if sep and peer_id in self.peers and model in self.peers[peer_id].models:
            return name
        owners = [peer_id for peer_id, peer in self.peers.items() if name in peer.models]
        return f"{owners[0]}/{name}" if len(owners) == 1 else None

    def taken(self, name: str) -> str | None:
        """What ``name`` already is, when a selector may not take it."""
        if name in self.models:
            return "a model id"
        if name in self.aliases:
            return f"an alias of model '{self.aliases[name]}'"
        if name in self.qualified:
            return "a peer model's full name"
        return None


def _entries(ctx: _Context, document: Mapping[str, Any], key: str, what: str) -> dict[str, Any]:
    node = document.get(key)
    if node is None:
        return {}
    if not isinstance(node, dict):
        ctx.fail(f"expected a mapping of {what} ids to {what}s, got {_describe(node)}", None, key)
    return node


def build_selectors(
    ctx: _Context,
    document: Mapping[str, Any],
    models: Mapping[str, ModelConfig],
    aliases: Mapping[str, str],
    peers: Mapping[str, PeerConfig],
    groups: Mapping[str, GroupConfig],
    router: str,
    matrix: Any,
) -> dict[str, SelectorConfig]:
    names = _Names(models, aliases, peers)
    raw = _entries(ctx, document, "selectors", "selector")
    selectors: dict[str, SelectorConfig] = {}
    for raw_id, node in raw.items():
        selector_id = raw_id if isinstance(raw_id, str) else go_str(raw_id)
        key = f"selectors.{selector_id}"
        if not selector_id.strip():
            ctx.fail("selector names cannot be empty", None, "selectors")
        taken = names.taken(selector_id)
        if taken is not None:
            ctx.fail(f"'{selector_id}' is already {taken}; a selector needs a name of its own", None, key)
        if not isinstance(node, dict):
            ctx.fail(f"expected a mapping with strategy and targets, got {_describe(node)}", None, key)
        for name in node:
            if name not in KNOWN_SELECTOR_KEYS:
                ctx.warn(f"selector '{selector_id}': {_unknown_key_message(name, KNOWN_SELECTOR_KEYS)}")
        reader = _Reader(ctx, node, prefix=key + ".")
        strategy = reader.str("strategy", "").strip()
        if not strategy:
            reader.fail("strategy", f"is required ({', '.join(SELECTOR_STRATEGIES)})")
        if strategy not in SELECTOR_STRATEGIES:
            reader.fail(
                "strategy", f"unknown strategy {strategy!r} (expected one of: {', '.join(SELECTOR_STRATEGIES)})"
            )
        listed = reader.str_list("targets")
        if not listed:
            reader.fail("targets", "must list at least one target")
        settings = open_block(ctx, node.get("settings"), key + ".settings", KNOWN_SELECTOR_SETTINGS)
        spillover = settings.int("spillover", 1)

        targets: list[str] = []
        resolved: dict[str, str] = {}  # real model id or peer/model -> the target that named it
        local: list[str] = []
        for index, target in enumerate(listed):
            target_key = f"{key}.targets[{index}]"
            if target in raw:
                ctx.fail(f"'{target}' is a selector; selectors cannot target selectors", None, target_key)
            real = names.local(target)
            model = real if real is not None else names.peer(target)
            if model is None:
                ctx.warn(f"key '{target_key}': '{target}' is not a defined model; ignored")
                continue
            if strategy == "warm" and real is None:
                ctx.fail(
                    f"'{target}' is a peer model; strategy 'warm' needs local models (it asks which are ready)",
                    None,
                    target_key,
                )
            if strategy == "spillover":
                if model in resolved:
                    ctx.fail(
                        f"'{target}' is model '{model}' again (as '{resolved[model]}'); "
                        "spillover targets must be different models",
                        None,
                        target_key,
                    )
                resolved[model] = target
                if real is not None and not models[real].remote:
                    local.append(real)
            targets.append(target)
        if not targets:
            ctx.warn(f"key '{key}.targets': none of them is a defined model; the selector is ignored")
            continue
        if strategy == "spillover":
            if spillover < 1:
                ctx.fail(f"must be >= 1, got {spillover}", None, f"{key}.settings.spillover")
            _check_coexistence(ctx, key, local, groups, router, matrix)
        selectors[selector_id] = SelectorConfig(
            id=selector_id,
            strategy=strategy,
            targets=tuple(targets),
            spillover=spillover,
            name=reader.str("name", ""),
            description=reader.str("description", ""),
            unlisted=reader.bool("unlisted", False),
            metadata=reader.mapping_of("metadata"),
        )
    return selectors


def _check_coexistence(
    ctx: _Context, key: str, local: list[str], groups: Mapping[str, GroupConfig], router: str, matrix: Any
) -> None:
    """Spillover runs its local targets side by side: the router must allow that (llama-swap's rule).

    The vram router allows any models together while they fit, so nothing is checked for it.
    """
    if len(local) <= 1 or router == "vram":
        return
    if router == "matrix":
        if matrix is None or not matrix.can_contain_all(local):
            ctx.fail(
                f"spillover targets {', '.join(local)} must all appear together in one matrix set",
                None,
                f"{key}.targets",
            )
        return
    group_of = {member: group for group in groups.values() for member in group.members}
    first = group_of.get(local[0])
    if first is None:
        ctx.fail(f"spillover target '{local[0]}' is in no routing group", None, f"{key}.targets")
    if first.swap:
        ctx.fail(
            f"spillover targets must share a group with swap: false; '{local[0]}' is in group '{first.id}', "
            "which swaps its members",
            None,
            f"{key}.targets",
        )
    for model_id in local[1:]:
        group = group_of.get(model_id)
        if group is None or group.id != first.id:
            where = f"group '{group.id}'" if group is not None else "no group"
            ctx.fail(
                f"spillover targets must share one routing group; '{local[0]}' is in group '{first.id}' "
                f"and '{model_id}' in {where}",
                None,
                f"{key}.targets",
            )


def build_profiles(
    ctx: _Context,
    document: Mapping[str, Any],
    models: Mapping[str, ModelConfig],
    aliases: Mapping[str, str],
    peers: Mapping[str, PeerConfig],
    selectors: Mapping[str, SelectorConfig],
) -> dict[str, ProfileConfig]:
    names = _Names(models, aliases, peers)
    profiles: dict[str, ProfileConfig] = {}
    for raw_id, node in _entries(ctx, document, "profiles", "profile").items():
        profile_id = raw_id if isinstance(raw_id, str) else go_str(raw_id)
        key = f"profiles.{profile_id}"
        if not profile_id.strip():
            ctx.fail("profile names cannot be empty", None, "profiles")
        if not isinstance(node, dict):
            ctx.fail(
                f"expected a mapping with description and pins, got {_describe(node)} "
                "(the list form of older llama-swap versions is no longer read)",
                None,
                key,
            )
        for name in node:
            if name not in KNOWN_PROFILE_KEYS:
                ctx.warn(f"profile '{profile_id}': {_unknown_key_message(name, KNOWN_PROFILE_KEYS)}")
        reader = _Reader(ctx, node, prefix=key + ".")
        raw_pins = reader.mapping_of("pins")
        if not raw_pins:
            reader.fail("pins", "must pin at least one name")
        pins: dict[str, str] = {}
        for raw_name, target in raw_pins.items():
            name = raw_name if isinstance(raw_name, str) else go_str(raw_name)
            pin_key = f"{key}.pins.{name}"
            if not name.strip():
                ctx.fail("pin names cannot be empty", None, f"{key}.pins")
            if name in names.qualified:
                ctx.fail(f"'{name}' is a peer model's full name; it cannot be pinned", None, pin_key)
            if isinstance(target, (dict, list)):
                ctx.fail(
                    f"expected a model name, or null to switch the name off; got {_describe(target)}", None, pin_key
                )
            target = "" if target is None else target if isinstance(target, str) else go_str(target)
            if target and names.local(target) is None and names.peer(target) is None and target not in selectors:
                ctx.warn(f"key '{pin_key}': '{target}' is not a defined model or selector; ignored")
                continue
            pins[name] = target  # "" switches the name off while the profile is active
        profiles[profile_id] = ProfileConfig(id=profile_id, description=reader.str("description", ""), pins=pins)
    return profiles
