"""llama-swap's groups, the matrix block (compiled by swapd.matrix) and the FIFO scheduler's settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from ._keys import KNOWN_GROUP_KEYS, KNOWN_MATRIX_KEYS
from ._model import DEFAULT_GROUP_ID, GroupConfig
from ._reader import _Context, _describe, _Reader, _unknown_key_message


class _Routing(NamedTuple):
    groups: dict[str, GroupConfig]
    router: str  # "group", "matrix" or "vram"
    matrix: Any  # swapd.matrix.MatrixProgram, or None


def _build_matrix(ctx: _Context, node: Any, key: str, model_ids: list[str]) -> Any:
    """Read and compile one ``matrix`` block (at config key ``key``) into a MatrixProgram."""
    # imported here: swapd.matrix imports swapd.router, which imports this package
    from swapd.matrix import MatrixError, compile_matrix

    if not isinstance(node, dict):
        ctx.fail(f"expected a mapping with vars, evict_costs and sets, got {_describe(node)}", None, key)
    for name in node:
        if name not in KNOWN_MATRIX_KEYS:
            ctx.warn(f"key '{key}': {_unknown_key_message(name, KNOWN_MATRIX_KEYS)}")
    reader = _Reader(ctx, node, prefix=key + ".")
    raw_vars = reader.mapping_of("vars")
    vars_reader = _Reader(ctx, raw_vars, prefix=f"{key}.vars.")
    variables = {name: vars_reader.str(name, "") for name in raw_vars}
    raw_costs = reader.mapping_of("evict_costs")
    costs: dict[str, int] = {}
    for name, value in raw_costs.items():
        if isinstance(value, bool) or not isinstance(value, int):
            ctx.fail(f"expected a positive integer, got {_describe(value)}", None, f"{key}.evict_costs.{name}")
        costs[name] = value
    raw_sets = reader.mapping_of("sets")
    sets_reader = _Reader(ctx, raw_sets, prefix=f"{key}.sets.")
    sets = [(name, sets_reader.str(name, "")) for name in raw_sets]
    try:
        return compile_matrix(sets, model_ids, variables, costs, key_prefix=key)
    except MatrixError as err:
        ctx.fail(err.message, None, err.key)


def _build_groups(
    ctx: _Context,
    expanded: dict[str, Any],
    model_ids: list[str],
    aliases: Mapping[str, str],
    remote: frozenset[str] = frozenset(),
) -> _Routing:
    """Groups and routers over the models swapd starts; ``remote`` models (proxy, no cmd) take no part."""
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

    matrix, matrix_key = None, "matrix"
    if has_legacy:
        groups_in, groups_key, matrix = top_groups, "groups", top_matrix
    elif use == "matrix":
        if settings.get("matrix") is None:
            ctx.fail("is 'matrix' but routing.router.settings.matrix is not set", None, "routing.router.use")
        groups_in, groups_key = None, "routing.router.settings.groups"
        matrix, matrix_key = settings["matrix"], "routing.router.settings.matrix"
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
    program = None
    if matrix is not None:
        # a matrix under routing.router.settings with use: group is inactive and, as
        # in llama-swap, not validated; an active one is compiled here
        program = _build_matrix(ctx, matrix, matrix_key, model_ids)
        groups_in = None  # config.groups keeps the default group, holding every model
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
        members = reader.str_list("members")
        for member in members:
            if member in remote:
                ctx.warn(
                    f"key '{key}.members': '{member}' is a remote model (proxy, no cmd): it is never started "
                    "or stopped, so groups ignore it"
                )
        groups[group_id] = GroupConfig(
            id=group_id,
            swap=reader.bool("swap", True),
            exclusive=reader.bool("exclusive", True),
            persistent=reader.bool("persistent", False),
            members=tuple(m for m in members if m not in remote),
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
    router_name = "matrix" if program is not None else "vram" if use == "vram" else "group"
    return _Routing(groups, router_name, program)


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
