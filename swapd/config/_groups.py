"""llama-swap's groups and the FIFO scheduler's settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._keys import KNOWN_GROUP_KEYS
from ._model import DEFAULT_GROUP_ID, GroupConfig
from ._reader import _Context, _describe, _Reader, _unknown_key_message


def _build_groups(
    ctx: _Context, expanded: dict[str, Any], model_ids: list[str], aliases: Mapping[str, str]
) -> dict[str, GroupConfig]:
    top = _Reader(ctx, expanded)
    routing = top.mapping_of("routing")
    routing_reader = _Reader(ctx, routing, prefix="routing.")
    router = routing_reader.mapping_of("router")
    router_reader = _Reader(ctx, router, prefix="routing.router.")
    use = router_reader.str("use", "")
    settings = router_reader.mapping_of("settings")

    top_groups = expanded.get("groups")
    top_matrix = expanded.get("matrix")
    has_legacy = top_matrix is not None or bool(top_groups)
    has_routing = use != "" or settings.get("matrix") is not None or bool(settings.get("groups"))
    if has_legacy and has_routing:
        ctx.fail(
            "the top-level 'groups'/'matrix' keys cannot be combined with 'routing.router'; "
            "move them under routing.router.settings",
            None,
            "routing.router",
        )

    matrix = None
    if has_legacy:
        groups_in, groups_key, matrix = top_groups, "groups", top_matrix
    elif use == "matrix":
        if settings.get("matrix") is None:
            ctx.fail("is 'matrix' but routing.router.settings.matrix is not set", None, "routing.router.use")
        groups_in, groups_key, matrix = None, "routing.router.settings.groups", settings["matrix"]
        ctx.warn(
            "key 'routing.router.use: matrix' is accepted but not implemented by swapd yet; "
            "it is ignored and every model is placed in the default group"
        )
    elif use == "vram":
        if settings.get("groups"):
            ctx.fail(
                "is not used by the vram router, which runs models side by side while they fit and stops "
                "the least recently used idle one to make room; remove it (keep a model loaded with "
                "routing.router.settings.vram.pinned, or use 'use: group' to keep your groups)",
                None,
                "routing.router.settings.groups",
            )
        groups_in, groups_key = None, "routing.router.settings.groups"
    elif use in ("group", ""):
        groups_in, groups_key = settings.get("groups"), "routing.router.settings.groups"
    else:
        ctx.fail(f"unknown router {use!r} (expected 'group', 'matrix' or 'vram')", None, "routing.router.use")

    if matrix is not None and groups_in:
        ctx.fail("'groups' and 'matrix' cannot both be used", None, "matrix")
    if matrix is not None:
        groups_in = None  # matrix routing not implemented: fall back to the default group
    if groups_in is None:
        groups_in = {}
    if not isinstance(groups_in, dict):
        ctx.fail(f"expected a mapping of group ids to groups, got {_describe(groups_in)}", None, groups_key)

    groups: dict[str, GroupConfig] = {}
    for group_id, group in groups_in.items():
        key = f"{groups_key}.{group_id}"
        if group_id == DEFAULT_GROUP_ID:
            ctx.fail(f"group id '{DEFAULT_GROUP_ID}' is reserved for models that are not in any group", None, key)
        if not isinstance(group, dict):
            ctx.fail(
                f"expected a mapping with swap, exclusive, persistent and members, got {_describe(group)}", None, key
            )
        for group_key in group:
            if group_key not in KNOWN_GROUP_KEYS:
                ctx.warn(f"group '{group_id}': {_unknown_key_message(group_key, KNOWN_GROUP_KEYS)}")
        reader = _Reader(ctx, group, prefix=key + ".")
        groups[group_id] = GroupConfig(
            id=group_id,
            swap=reader.bool("swap", True),
            exclusive=reader.bool("exclusive", True),
            persistent=reader.bool("persistent", False),
            members=tuple(reader.str_list("members")),
        )

    grouped = {member for group in groups.values() for member in group.members}
    groups[DEFAULT_GROUP_ID] = GroupConfig(
        id=DEFAULT_GROUP_ID,
        swap=True,
        exclusive=True,
        persistent=False,
        members=tuple(sorted(mid for mid in model_ids if mid not in grouped)),
    )

    owner: dict[str, str] = {}
    for group_id, group in groups.items():
        key = f"{groups_key}.{group_id}.members"
        seen: set[str] = set()
        for member in group.members:
            if member in seen:
                ctx.fail(f"model '{member}' is listed more than once in group '{group_id}'", None, key)
            seen.add(member)
            if member in owner:
                ctx.fail(f"model '{member}' is in more than one group: '{owner[member]}' and '{group_id}'", None, key)
            owner[member] = group_id
    known = set(model_ids)
    for group_id, group in groups.items():
        key = f"{groups_key}.{group_id}.members"
        for member in group.members:
            if member in known:
                continue
            if member in aliases:
                ctx.fail(f"'{member}' is an alias of model '{aliases[member]}'; groups must list model ids", None, key)
            ctx.warn(f"key '{key}': '{member}' is not a defined model; ignored")
    return groups


def _check_scheduler(
    ctx: _Context, expanded: dict[str, Any], models: Mapping[str, Any], aliases: Mapping[str, str]
) -> None:
    routing = _Reader(ctx, expanded).mapping_of("routing")
    scheduler = _Reader(ctx, routing, prefix="routing.").mapping_of("scheduler")
    reader = _Reader(ctx, scheduler, prefix="routing.scheduler.")
    use = reader.str("use", "")
    if use not in ("", "fifo"):
        ctx.fail(f"unknown scheduler {use!r} (only 'fifo' is supported)", None, "routing.scheduler.use")
    settings = reader.mapping_of("settings")
    fifo = _Reader(ctx, settings, prefix="routing.scheduler.settings.").mapping_of("fifo")
    fifo_reader = _Reader(ctx, fifo, prefix="routing.scheduler.settings.fifo.")
    priority = fifo_reader.mapping_of("priority")
    prio_reader = _Reader(ctx, priority, prefix="routing.scheduler.settings.fifo.priority.")
    for name in priority:
        if name not in models and name not in aliases:
            ctx.warn(f"key 'routing.scheduler.settings.fifo.priority': unknown model '{name}'; ignored")
        prio_reader.int(name, 0)


def _fifo_priority(
    expanded: Mapping[str, Any], aliases: Mapping[str, str], models: Mapping[str, Any]
) -> dict[str, int]:
    """routing.scheduler.settings.fifo.priority keyed by real model id (validated earlier)."""
    node: Any = expanded
    for key in ("routing", "scheduler", "settings", "fifo", "priority"):
        node = node.get(key) if isinstance(node, dict) else None
    out: dict[str, int] = {}
    for name, value in (node or {}).items():
        real = name if name in models else aliases.get(name)
        if real is not None and isinstance(value, int):
            out[real] = value
    return out
