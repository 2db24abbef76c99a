"""Loading a llama-swap compatible configuration: the top level, peers, limits, and the whole ``Config``.

The pieces live beside it: ``_keys`` (known keys, defaults), ``_reader``
(typed reads, errors naming file/model/key), ``_expand`` (YAML and macros),
``_models`` and ``_groups``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ._choices import build_profiles, build_selectors
from ._cors import parse_cors
from ._errors import ConfigError
from ._expand import _expand, _parse_document
from ._groups import _build_groups, _check_scheduler, _fifo_priority
from ._hosts import parse_allowed_hosts
from ._keys import (
    _SIZE_RE,
    _SIZE_UNITS,
    DEFAULT_GLOBAL_TTL,
    DEFAULT_HEALTH_CHECK_TIMEOUT,
    DEFAULT_START_PORT,
    DEFAULT_UNLOAD_TIMEOUT,
    DEFAULT_VRAM_CHECK,
    DEFAULT_VRAM_CHECK_TIMEOUT,
    KNOWN_CLIENT_LIMIT_KEYS,
    KNOWN_TOP_LEVEL_KEYS,
    LOG_LEVELS,
    LOG_TO_STDOUT_VALUES,
    MIN_HEALTH_CHECK_TIMEOUT,
    NOT_IMPLEMENTED_KEYS,
    VRAM_CHECK_MODES,
)
from ._model import ClientLimits, Config, ModelConfig, ModelsDir, PeerConfig
from ._models import PEER_TIMEOUT_DEFAULTS, _build_filters, _build_model, _check_url, _collect_aliases, build_timeouts
from ._observe import observe_settings
from ._reader import _Context, _describe, _Reader, _unknown_key_message, open_block
from ._vram import vram_router


def load_config(
    path: str,
    environ: Mapping[str, str] | None = None,
    *,
    models_dir: str | None = None,
    previous: Config | None = None,
) -> Config:
    """Load and validate the configuration file at ``path``.

    ``models_dir`` is ``--models-dir`` (it sets ``modelsDir.path``);
    ``previous`` is the running config on a reload (models found in the folder
    keep their ports).
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise ConfigError(path, None, None, f"cannot read config file: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(path, None, None, f"config file is not valid UTF-8 (byte offset {err.start})") from None
    return load_config_text(text, path, environ, models_dir=models_dir, previous=previous)


def load_config_text(
    text: str,
    path: str = "<string>",
    environ: Mapping[str, str] | None = None,
    *,
    models_dir: str | None = None,
    previous: Config | None = None,
) -> Config:
    """Load and validate configuration text; ``path`` is only used in messages (see load_config)."""
    ctx = _Context(path)
    env = os.environ if environ is None else environ
    document = _parse_document(ctx, text, env)
    return _build(ctx, path, document, models_dir=models_dir, previous=previous)


def _kept_ports(previous: Config | None) -> dict[str, int]:
    """The ports the previous config gave the models it found in modelsDir."""
    if previous is None or previous.models_dir is None:
        return {}
    kept = {}
    for model_id in previous.models_dir.found:
        model = previous.models.get(model_id)
        if model is not None and model.port is not None:
            kept[model_id] = model.port
    return kept


# ------------------------------------------------------------------ parsing


def _build_peers(ctx: _Context, reader: _Reader) -> dict[str, PeerConfig]:
    peers: dict[str, PeerConfig] = {}
    for peer_id, peer in reader.mapping_of("peers").items():
        key = f"peers.{peer_id}"
        preader = _Reader(ctx, peer, prefix=key + ".")
        peers[peer_id] = PeerConfig(
            id=peer_id,
            proxy=preader.str("proxy", "").rstrip("/"),
            api_key=preader.str("apiKey", ""),
            models=tuple(preader.str_list("models")),
            filters=_build_filters(ctx, preader, None, key + "."),
            timeouts=build_timeouts(
                ctx, preader.mapping_of("timeouts"), None, key + ".timeouts.", PEER_TIMEOUT_DEFAULTS
            ),
        )
    return peers


def _check_api_keys(ctx: _Context, reader: _Reader) -> None:
    for index, api_key in enumerate(reader.str_list("apiKeys")):
        if api_key == "":
            ctx.fail("API keys must not be empty", None, f"apiKeys[{index}]")
        if " " in api_key:
            ctx.fail("API keys cannot contain spaces", None, f"apiKeys[{index}]")


def _check_peers(ctx: _Context, reader: _Reader) -> None:
    for peer_id, peer in reader.mapping_of("peers").items():
        key = f"peers.{peer_id}"
        if not isinstance(peer, dict):
            ctx.fail(f"expected a mapping with proxy and models, got {_describe(peer)}", None, key)
        peer_reader = _Reader(ctx, peer, prefix=key + ".")
        proxy = peer_reader.str("proxy", "")
        if proxy == "":
            ctx.fail("is required", None, f"{key}.proxy")
        _check_url(ctx, proxy, None, f"{key}.proxy")
        if not peer_reader.str_list("models"):
            ctx.fail("must list at least one model", None, f"{key}.models")


def _vram_check(ctx: _Context, document: Mapping[str, Any]) -> tuple[str, float]:
    """vramCheck (off|warn|strict) and vramCheckTimeout (seconds > 0)."""
    mode = document.get("vramCheck")
    if mode is None:
        mode = DEFAULT_VRAM_CHECK
    elif mode is False:  # `vramCheck: false` reads naturally as off
        mode = "off"
    elif not isinstance(mode, str) or mode.strip().lower() not in VRAM_CHECK_MODES:
        ctx.fail(f"must be one of: {', '.join(VRAM_CHECK_MODES)}; got {_describe(mode)}", None, "vramCheck")
    mode = mode.strip().lower()
    timeout = document.get("vramCheckTimeout")
    if timeout is None:
        timeout = DEFAULT_VRAM_CHECK_TIMEOUT
    elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        ctx.fail(f"expected a number of seconds, got {_describe(timeout)}", None, "vramCheckTimeout")
    elif not 0 < timeout <= 3600:
        ctx.fail(f"must be > 0 and <= 3600 seconds, got {_describe(timeout)}", None, "vramCheckTimeout")
    return mode, float(timeout)


def _build(
    ctx: _Context,
    path: str,
    document: dict[str, Any],
    *,
    models_dir: str | None = None,
    previous: Config | None = None,
) -> Config:
    for key in document:
        if key in NOT_IMPLEMENTED_KEYS:
            ctx.warn(f"key '{key}' is accepted but not implemented by swapd yet; it is ignored")
        elif key not in KNOWN_TOP_LEVEL_KEYS:
            ctx.warn(_unknown_key_message(key, KNOWN_TOP_LEVEL_KEYS))

    expanded, ports, found = _expand(ctx, document, models_dir=models_dir, kept_ports=_kept_ports(previous))
    top = _Reader(ctx, expanded)

    health_check_timeout = top.int("healthCheckTimeout", DEFAULT_HEALTH_CHECK_TIMEOUT, seconds=True)
    health_check_timeout = max(health_check_timeout, MIN_HEALTH_CHECK_TIMEOUT)

    log_level_raw = top.str("logLevel", "info")
    log_level = log_level_raw.strip().lower() or "info"
    if log_level not in LOG_LEVELS:
        ctx.warn(
            f"key 'logLevel': unknown level {log_level_raw!r}, using 'info' (expected one of: {', '.join(LOG_LEVELS)})"
        )
        log_level = "info"

    log_to_stdout = top.str("logToStdout", "proxy")
    if log_to_stdout not in LOG_TO_STDOUT_VALUES:
        ctx.fail(f"must be one of: {', '.join(LOG_TO_STDOUT_VALUES)}; got {log_to_stdout!r}", None, "logToStdout")
    top.str("logTimeFormat", "")

    global_ttl = top.int("globalTTL", DEFAULT_GLOBAL_TTL, seconds=True)
    if global_ttl < 0:
        ctx.fail(f"must be >= 0, got {global_ttl}", None, "globalTTL")
    unload_timeout = top.int("unloadTimeout", DEFAULT_UNLOAD_TIMEOUT, seconds=True)
    if unload_timeout < 0:
        ctx.fail(f"must be >= 0, got {unload_timeout}", None, "unloadTimeout")
    if unload_timeout == 0:
        unload_timeout = DEFAULT_UNLOAD_TIMEOUT
    start_port = top.int("startPort", DEFAULT_START_PORT)

    vram_check, vram_check_timeout = _vram_check(ctx, expanded)
    send_loading_state = top.bool("sendLoadingState", False)
    include_aliases = top.bool("includeAliasesInList", False)
    top.mapping_of("hooks")
    top.mapping_of("upstream")
    _check_api_keys(ctx, top)
    _check_peers(ctx, top)

    raw_models: dict[str, dict[str, Any]] = expanded["models"]
    aliases, per_model_aliases = _collect_aliases(ctx, raw_models)

    models: dict[str, ModelConfig] = {}
    for model_id, model in raw_models.items():
        models[model_id] = _build_model(
            ctx,
            model_id,
            model,
            port=ports.get(model_id),
            aliases=per_model_aliases[model_id],
            health_check_timeout=health_check_timeout,
            global_ttl=global_ttl,
            global_unload_timeout=unload_timeout,
            global_send_loading_state=send_loading_state,
        )

    remote = frozenset(m for m, mc in models.items() if mc.remote)
    routing = _build_groups(ctx, expanded, [m for m in raw_models if m not in remote], aliases, remote)
    vram_router_settings = vram_router(ctx, expanded, raw_models, aliases)
    _check_scheduler(ctx, expanded, raw_models, aliases)
    peers = _build_peers(ctx, top)
    selectors = build_selectors(ctx, expanded, models, aliases, peers, routing.groups, routing.router, routing.matrix)
    profiles = build_profiles(ctx, expanded, models, aliases, peers, selectors)
    priority = _fifo_priority(expanded, aliases, models)
    hooks = _Reader(ctx, top.mapping_of("hooks"), prefix="hooks.")
    on_startup = _Reader(ctx, hooks.mapping_of("on_startup"), prefix="hooks.on_startup.")
    preload: list[str] = []
    for name in on_startup.str_list("preload"):
        name = name.strip()
        real = name if name in models else aliases.get(name)
        if real is None:
            if name:
                ctx.warn(f"key 'hooks.on_startup.preload': unknown model '{name}'; ignored")
            continue
        if real in remote:
            ctx.warn(f"key 'hooks.on_startup.preload': '{name}' is a remote model (proxy, no cmd); nothing to load")
            continue
        if real not in preload:
            preload.append(real)

    cors = parse_cors(ctx, expanded)  # before warnings are collected below
    # read before Config(...) so their warnings are in ctx.warnings when it is taken
    observe = observe_settings(ctx, expanded)
    ollama_listen = _ollama_listen(ctx, expanded)
    return Config(
        path=path,
        health_check_timeout=float(health_check_timeout),
        log_level=log_level,
        start_port=start_port,
        global_ttl=float(global_ttl),
        unload_timeout=float(unload_timeout),
        models=MappingProxyType(models),
        groups=MappingProxyType(routing.groups),
        aliases=MappingProxyType(dict(aliases)),
        raw=MappingProxyType(expanded),
        warnings=tuple(ctx.warnings),
        client_limits=_build_client_limits(ctx, top),
        upstream_ignore_paths=_upstream_ignore_paths(ctx, top),
        api_keys=tuple(top.str_list("apiKeys")),
        allowed_hosts=parse_allowed_hosts(ctx, top),
        cors=cors,
        peers=MappingProxyType(peers),
        preload=tuple(preload),
        priority=MappingProxyType(priority),
        include_aliases_in_list=include_aliases,
        vram_check=vram_check,
        vram_check_timeout=vram_check_timeout,
        vram_router=vram_router_settings,
        router=routing.router,
        matrix=routing.matrix,
        observe=observe,
        ollama_listen=ollama_listen,
        models_dir=(
            None
            if found is None
            else ModelsDir(found.path, MappingProxyType({mid: found.found[mid].path for mid in found.entries}))
        ),
        profiles=MappingProxyType(profiles),
        selectors=MappingProxyType(selectors),
    )


def _ollama_listen(ctx: _Context, document: Mapping[str, Any]) -> str:
    """ollama.listen: HOST:PORT or :PORT (as --ollama-listen), or "" when absent."""
    block = open_block(ctx, document.get("ollama"), "ollama", ("listen",))
    listen = block.str("listen", "").strip()
    if listen:
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            ctx.fail(
                f"expected HOST:PORT or :PORT (for example 127.0.0.1:11434), got {listen!r}", None, "ollama.listen"
            )
    return listen


DEFAULT_UPSTREAM_IGNORE_PATHS = (r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$",)


def _upstream_ignore_paths(ctx: _Context, top: _Reader) -> tuple[re.Pattern, ...]:
    reader = _Reader(ctx, top.mapping_of("upstream"), prefix="upstream.")
    patterns = reader.str_list("ignorePaths") or list(DEFAULT_UPSTREAM_IGNORE_PATHS)
    compiled = []
    for index, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            ctx.fail(f"invalid regular expression {pattern!r}: {err}", None, f"upstream.ignorePaths[{index}]")
    return tuple(compiled)


def _build_client_limits(ctx: _Context, top: _Reader) -> ClientLimits:
    """swapd's ``clientLimits``: what a client may send, and how slowly."""
    limits = top.mapping_of("clientLimits")
    for key in limits:
        if key not in KNOWN_CLIENT_LIMIT_KEYS:
            ctx.warn(f"clientLimits: {_unknown_key_message(key, KNOWN_CLIENT_LIMIT_KEYS)}")
    reader = _Reader(ctx, limits, prefix="clientLimits.")
    values = {}
    for key, default in (("maxBodyMB", 512), ("headerTimeout", 30), ("bodyIdleTimeout", 60), ("keepaliveTimeout", 75)):
        value = reader.int(key, default, seconds=key != "maxBodyMB")
        if value <= 0:
            reader.fail(key, f"must be > 0, got {value}")
        values[key] = value
    in_flight = limits.get("maxBodyBytesInFlight", 1024**3)
    match = (
        _SIZE_RE.match(str(in_flight))
        if isinstance(in_flight, (int, str)) and not isinstance(in_flight, bool)
        else None
    )
    if match is None or int(match.group(1)) <= 0:
        reader.fail(
            "maxBodyBytesInFlight",
            f"must be a positive size in bytes, or with a unit such as 512MiB or 2GiB; got {in_flight!r}",
        )
    return ClientLimits(
        max_body_bytes=values["maxBodyMB"] * 1024 * 1024,
        header_timeout=float(values["headerTimeout"]),
        body_idle_timeout=float(values["bodyIdleTimeout"]),
        keepalive_timeout=float(values["keepaliveTimeout"]),
        max_body_bytes_in_flight=int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()],
    )
