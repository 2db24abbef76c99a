"""Building each model's ``ModelConfig``: command lines, URLs, filters, timeouts, capabilities, aliases."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Any
from urllib.parse import urlsplit

from ._command import CommandSyntaxError, command_to_argv
from ._keys import (
    COMFYUI_MIN_CONCURRENCY,
    COMFYUI_MODEL_ID,
    DEFAULT_CHECK_ENDPOINT,
    DEFAULT_CONCURRENCY_LIMIT,
    DEFAULT_PROXY,
    KNOWN_COMPAT_KEYS,
    KNOWN_MODEL_KEYS,
    MODALITIES,
    MODEL_TTL_INHERIT,
    PROTECTED_PARAMS,
)
from ._model import Capabilities, Filters, ModelConfig, Timeouts
from ._reader import _Context, _describe, _Reader, _unknown_key_message
from ._vram import model_vram


def _argv(ctx: _Context, model_id: str, key: str, text: str) -> list[str]:
    try:
        return command_to_argv(text)
    except CommandSyntaxError as err:
        ctx.fail(f"cannot split command: {err}", model_id, key)


def _check_url(ctx: _Context, value: str, model: str | None, key: str) -> None:
    if not value.strip():
        ctx.fail("must not be empty", model, key)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as err:
        ctx.fail(f"invalid URL {value!r}: {err}", model, key)
    if parts.scheme not in ("http", "https"):
        label = f"model '{model}': " if model is not None else ""
        ctx.warn(f"{label}key '{key}': URL {value!r} does not start with http:// or https://")


def _fingerprint(payload: dict[str, Any]) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _build_filters(ctx: _Context, reader: _Reader, owner: str | None, prefix: str = "") -> Filters:
    """Read ``filters`` (and the legacy ``strip_params`` spelling) into a Filters."""
    filters = reader.mapping_of("filters")
    freader = _Reader(ctx, filters, owner, prefix + "filters.")
    strip_text = freader.str("stripParams", "") or freader.str("strip_params", "")
    strip: list[str] = []
    for name in str(strip_text).split(","):
        name = name.strip()
        if name and name not in PROTECTED_PARAMS and name not in strip:
            strip.append(name)
    set_params = {k: v for k, v in freader.mapping_of("setParams").items() if k not in PROTECTED_PARAMS}
    by_id: dict[str, dict[str, Any]] = {}
    for requested, params in freader.mapping_of("setParamsByID").items():
        if not isinstance(params, dict):
            ctx.fail(
                f"expected a mapping of parameters, got {_describe(params)}",
                owner,
                f"{prefix}filters.setParamsByID.{requested}",
            )
        by_id[str(requested)] = {k: v for k, v in params.items() if k not in PROTECTED_PARAMS}
    return Filters(tuple(sorted(strip)), copy.deepcopy(set_params), copy.deepcopy(by_id))


# llama-swap's timeouts keys; expectContinue is validated but has nothing to bound in swapd (it never sends
# ``Expect: 100-continue`` upstream: docs/compatibility.md)
TIMEOUT_KEYS = ("connect", "keepalive", "responseHeader", "tlsHandshake", "expectContinue", "idleConn")
# a model's defaults where a key is absent (None: swapd's own behaviour, see Timeouts)
MODEL_TIMEOUT_DEFAULTS: dict[str, int | None] = {"connect": 30, "tlsHandshake": 10}
# a peer's, as llama-swap's PeerConfig sets them
PEER_TIMEOUT_DEFAULTS: dict[str, int | None] = {
    "connect": 30,
    "keepalive": 30,
    "responseHeader": 60,
    "tlsHandshake": 10,
    "idleConn": 90,
}


def build_timeouts(
    ctx: _Context, mapping: Any, owner: str | None, prefix: str, defaults: dict[str, int | None]
) -> Timeouts:
    """``timeouts``: whole seconds, 0 = no limit (as in llama-swap), an absent key takes ``defaults``."""
    treader = _Reader(ctx, mapping, owner, prefix)
    for name in treader.mapping:
        if name not in TIMEOUT_KEYS:
            where = (f"model '{owner}': " if owner else "") + prefix.rstrip(".") + ": "
            ctx.warn(where + _unknown_key_message(name, TIMEOUT_KEYS))

    def seconds(name: str) -> float | None:
        if treader.mapping.get(name) is None:
            default = defaults.get(name)
            return None if default is None else float(default)
        value = treader.int(name, 0, seconds=True)
        if value < 0:
            treader.fail(name, f"must be >= 0, got {value}")
        return float(value) if value > 0 else None

    seconds("expectContinue")  # validated only
    return Timeouts(
        connect=seconds("connect"),
        response_header=seconds("responseHeader"),
        idle_conn=seconds("idleConn"),
        keepalive=seconds("keepalive"),
        tls_handshake=seconds("tlsHandshake"),
    )


def _build_timeouts(ctx: _Context, reader: _Reader, model_id: str) -> Timeouts:
    return build_timeouts(ctx, reader.mapping_of("timeouts"), model_id, "timeouts.", MODEL_TIMEOUT_DEFAULTS)


def _check_capabilities(ctx: _Context, model_id: str, reader: _Reader) -> Capabilities:
    caps = reader.mapping_of("capabilities")
    caps_reader = _Reader(ctx, caps, model_id, "capabilities.")
    modalities: dict[str, tuple[str, ...]] = {}
    for direction in ("in", "out"):
        modalities[direction] = tuple(caps_reader.str_list(direction))
        for index, modality in enumerate(modalities[direction]):
            if modality not in MODALITIES:
                ctx.fail(
                    f"invalid modality {modality!r} (expected one of: {', '.join(MODALITIES)})",
                    model_id,
                    f"capabilities.{direction}[{index}]",
                )
    context = caps_reader.int("context", 0)
    if context < 0:
        ctx.fail("must be >= 0", model_id, "capabilities.context")
    return Capabilities(
        inputs=modalities["in"],
        outputs=modalities["out"],
        tools=caps_reader.bool("tools", False),
        reranker=caps_reader.bool("reranker", False),
        context=context,
    )


def _build_model(
    ctx: _Context,
    model_id: str,
    model: dict[str, Any],
    *,
    port: int | None,
    aliases: list[str],
    health_check_timeout: int,
    global_ttl: int,
    global_unload_timeout: int,
    global_send_loading_state: bool = False,
) -> ModelConfig:
    for key in model:
        if key not in KNOWN_MODEL_KEYS:
            ctx.warn(f"model '{model_id}': {_unknown_key_message(key, KNOWN_MODEL_KEYS)}")
    if "healthCheckTimeout" in model:
        ctx.warn(f"model '{model_id}': key 'healthCheckTimeout' is ignored per model; the global value applies")

    reader = _Reader(ctx, model, model_id)

    # No cmd (missing, empty, or only comments) makes a remote model: swapd's config loader already refused
    # a model with neither cmd nor proxy, so this one has a proxy to send its requests to.
    cmd_text = reader.str("cmd", "")
    cmd = _argv(ctx, model_id, "cmd", cmd_text) if cmd_text.strip() else []
    remote = not cmd

    stop_text = reader.str("cmdStop", "")
    cmd_stop = _argv(ctx, model_id, "cmdStop", stop_text) if stop_text.strip() else []

    proxy = reader.str("proxy", DEFAULT_PROXY)
    _check_url(ctx, proxy, model_id, "proxy")

    env: list[tuple[str, str]] = []
    for index, entry in enumerate(reader.str_list("env")):
        name, sep, value = entry.partition("=")
        if not sep or not name:
            ctx.fail(f"expected NAME=VALUE, got {entry!r}", model_id, f"env[{index}]")
        env.append((name, value))

    check_endpoint = reader.str("checkEndpoint", DEFAULT_CHECK_ENDPOINT).strip()

    ttl = reader.int("ttl", MODEL_TTL_INHERIT, seconds=True)
    if ttl == MODEL_TTL_INHERIT:
        ttl = global_ttl
    elif ttl < 0:
        ctx.fail(f"must be >= 0 (or -1 to use globalTTL), got {ttl}", model_id, "ttl")

    unload_timeout = reader.int("unloadTimeout", 0, seconds=True)
    if unload_timeout < 0:
        ctx.fail(f"must be >= 0, got {unload_timeout}", model_id, "unloadTimeout")
    if unload_timeout == 0:
        unload_timeout = global_unload_timeout

    concurrency = reader.int("concurrencyLimit", 0)
    if model_id == COMFYUI_MODEL_ID and concurrency < COMFYUI_MIN_CONCURRENCY:
        concurrency = COMFYUI_MIN_CONCURRENCY
    if concurrency <= 0:
        concurrency = DEFAULT_CONCURRENCY_LIMIT

    metadata = reader.mapping_of("metadata")
    reader.mapping_of("filters")
    reader.mapping_of("timeouts")
    ignore_websockets = _ignore_websockets(ctx, model_id, reader)
    sls = model.get("sendLoadingState")
    if sls is not None and not isinstance(sls, bool):
        reader.fail("sendLoadingState", f"expected true or false, got {_describe(sls)}")
    capabilities = _check_capabilities(ctx, model_id, reader)

    fields: dict[str, Any] = {
        "id": model_id,
        "cmd": tuple(cmd),
        "cmd_stop": tuple(cmd_stop),
        "proxy": proxy,
        "port": port,
        "aliases": tuple(aliases),
        "env": tuple(env),
        "check_endpoint": check_endpoint,
        "ttl": float(ttl),
        "unload_timeout": float(unload_timeout),
        "health_check_timeout": float(health_check_timeout),
        "unlisted": reader.bool("unlisted", False),
        "use_model_name": reader.str("useModelName", ""),
        "name": reader.str("name", ""),
        "description": reader.str("description", ""),
        "concurrency_limit": concurrency,
        "metadata": copy.deepcopy(metadata),
        "api_key": reader.str("apiKey", ""),
        "remote": remote,
        "headers": _build_headers(ctx, model_id, reader),
        "ignore_websockets": ignore_websockets,
    }
    # The declared footprint guides scheduling only: changing it never restarts the model.
    fingerprint = _fingerprint({**fields, "raw": {k: v for k, v in model.items() if k != "vram"}})
    fields["vram"] = model_vram(ctx, model_id, model)
    return ModelConfig(
        **fields,
        fingerprint=fingerprint,
        filters=_build_filters(ctx, reader, model_id),
        send_loading_state=global_send_loading_state if sls is None else sls,
        timeouts=_build_timeouts(ctx, reader, model_id),
        capabilities=capabilities,
    )


def _ignore_websockets(ctx: _Context, model_id: str, reader: _Reader) -> bool:
    """``compat.ignoreWebsockets``; llama-swap forces it on for ``comfyui_auto``, whatever the config says."""
    compat = _Reader(ctx, reader.mapping_of("compat"), model_id, prefix="compat.")
    for name in compat.mapping:
        if name not in KNOWN_COMPAT_KEYS:
            ctx.warn(f"model '{model_id}': compat: {_unknown_key_message(name, KNOWN_COMPAT_KEYS)}")
    value = compat.bool("ignoreWebsockets", False)
    return True if model_id == COMFYUI_MODEL_ID else value


_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# set by swapd itself on every proxied request; a model's headers may not replace them
_RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer"})


def _build_headers(ctx: _Context, model_id: str, reader: _Reader) -> tuple[tuple[str, str], ...]:
    """``headers``: name -> value, added to every request to the model (macros already expanded)."""
    out = []
    for name, value in reader.mapping_of("headers").items():
        key = f"headers.{name}"
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            ctx.fail(f"{name!r} is not a valid HTTP header name", model_id, key)
        if name.lower() in _RESERVED_HEADERS:
            ctx.fail(f"swapd sets {name} itself; it cannot be configured", model_id, key)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            ctx.fail(f"expected a string, got {_describe(value)}", model_id, key)
        text = str(value)
        if any(c in text for c in "\r\n\0"):
            ctx.fail("a header value cannot hold line breaks or NUL", model_id, key)
        out.append((name, text))
    return tuple(out)


def _collect_aliases(ctx: _Context, models: dict[str, dict[str, Any]]) -> tuple[dict[str, str], dict[str, list[str]]]:
    alias_owner: dict[str, str] = {}
    per_model: dict[str, list[str]] = {}
    for model_id, model in models.items():
        names = _Reader(ctx, model, model_id).str_list("aliases")
        for index, alias in enumerate(names):
            if alias == "":
                ctx.fail("aliases must not be empty", model_id, f"aliases[{index}]")
            owner = alias_owner.get(alias)
            if owner is not None:
                if owner == model_id:
                    ctx.fail(f"alias '{alias}' is listed more than once", model_id, "aliases")
                ctx.fail(f"duplicate alias '{alias}': already used by model '{owner}'", model_id, "aliases")
            alias_owner[alias] = model_id
        per_model[model_id] = list(names)

    # setParamsByID keys become aliases of their model (llama-swap behaviour)
    for model_id in sorted(models):
        filters = models[model_id].get("filters")
        if not isinstance(filters, dict):
            continue
        by_id = filters.get("setParamsByID")
        if by_id is None:
            continue
        if not isinstance(by_id, dict):
            ctx.fail(f"expected a mapping, got {_describe(by_id)}", model_id, "filters.setParamsByID")
        for key in by_id:
            if key == model_id:
                continue
            if key in models:
                ctx.fail(f"'{key}' conflicts with an existing model id", model_id, "filters.setParamsByID")
            owner = alias_owner.get(key)
            if owner is not None:
                if owner != model_id:
                    ctx.fail(
                        f"duplicate alias '{key}': already used by model '{owner}'",
                        model_id,
                        "filters.setParamsByID",
                    )
                continue
            alias_owner[key] = model_id
            per_model[model_id].append(key)

    for alias, owner in alias_owner.items():
        if alias in models:
            ctx.warn(f"model '{owner}': alias '{alias}' is also a model id; requests for '{alias}' go to that model")
    return alias_owner, per_model
