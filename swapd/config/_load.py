"""Loading, expanding and validating a llama-swap compatible configuration."""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
from types import MappingProxyType
from typing import Any, Mapping, NoReturn
from urllib.parse import urlsplit

import yaml

from ._command import CommandSyntaxError, command_to_argv, strip_comment_lines
from ._errors import ConfigError
from ._format import go_str
from ._hosts import parse_allowed_hosts
from ._macros import (
    ENV_MACRO_RE,
    MACRO_USE_RE,
    MacroList,
    env_problem,
    find_env_in_text,
    macro_declaration_problem,
    merge_macro_scopes,
    substitute,
    substitute_env_text,
    substitute_in_key,
    walk_strings,
    walk_values,
)
from ._model import DEFAULT_GROUP_ID, ClientLimits, Config, Filters, GroupConfig, ModelConfig, PeerConfig, Timeouts

# Never stripped or set by filters: routing depends on them (llama-swap's list).
PROTECTED_PARAMS = frozenset({"model"})
from ._yaml import RecursiveAliasError, describe_yaml_error, materialize, parse_yaml

# ------------------------------------------------------------------ defaults

DEFAULT_HEALTH_CHECK_TIMEOUT = 120
MIN_HEALTH_CHECK_TIMEOUT = 15
DEFAULT_START_PORT = 5800
DEFAULT_UNLOAD_TIMEOUT = 10
DEFAULT_GLOBAL_TTL = 0
DEFAULT_CONCURRENCY_LIMIT = 10
COMFYUI_MODEL_ID = "comfyui_auto"
COMFYUI_MIN_CONCURRENCY = 50
DEFAULT_PROXY = "http://localhost:${PORT}"
DEFAULT_CHECK_ENDPOINT = "/health"
MODEL_TTL_INHERIT = -1
MAX_PORT = 65535

LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_TO_STDOUT_VALUES = ("proxy", "upstream", "both", "none")
MODALITIES = ("text", "audio", "image")
VRAM_CHECK_MODES = ("off", "warn", "strict")
DEFAULT_VRAM_CHECK = "warn"
DEFAULT_VRAM_CHECK_TIMEOUT = 10.0

# Every key llama-swap understands at the top level.
KNOWN_TOP_LEVEL_KEYS = (
    "healthCheckTimeout",
    "logRequests",
    "logLevel",
    "logTimeFormat",
    "logToStdout",
    "metricsMaxInMemory",
    "captureBuffer",
    "store",
    "ui",
    "performance",
    "globalTTL",
    "unloadTimeout",
    "models",
    "profiles",
    "selectors",
    "routing",
    "groups",
    "matrix",
    "macros",
    "startPort",
    "hooks",
    "sendLoadingState",
    "includeAliasesInList",
    "apiKeys",
    "peers",
    "upstream",
    # swapd's own keys
    "vramCheck",
    "vramCheckTimeout",
    "clientLimits",
    "allowedHosts",
)
KNOWN_CLIENT_LIMIT_KEYS = ("maxBodyMB", "headerTimeout", "bodyIdleTimeout", "keepaliveTimeout", "maxBodyBytesInFlight")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}

# Accepted, but swapd does not act on them (yet).
NOT_IMPLEMENTED_KEYS = (
    "matrix",
    "profiles",
    "selectors",
    "captureBuffer",
    "store",
    "performance",
    "ui",
    "metricsMaxInMemory",
    "logRequests",
)

KNOWN_MODEL_KEYS = (
    "cmd",
    "cmdStop",
    "proxy",
    "aliases",
    "env",
    "checkEndpoint",
    "ttl",
    "unloadTimeout",
    "unlisted",
    "useModelName",
    "name",
    "description",
    "concurrencyLimit",
    "filters",
    "macros",
    "metadata",
    "sendLoadingState",
    "timeouts",
    "compat",
    "capabilities",
    "healthCheckTimeout",
    "apiKey",  # swapd addition: the backend's own key, sent instead of the client's credential
)

KNOWN_GROUP_KEYS = ("swap", "exclusive", "persistent", "members")


# ------------------------------------------------------------------- helpers


class _Context:
    """Carries the file name for errors and collects warnings."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.warnings: list[str] = []

    def fail(self, message: str, model: str | None = None, key: str | None = None) -> NoReturn:
        raise ConfigError(self.file, model, key, message)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


def _format_path(parts: tuple) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _locate(path: tuple) -> tuple[str | None, str | None]:
    """Split a document path into (model id, key within the model)."""
    if len(path) >= 2 and path[0] == "models" and isinstance(path[1], str):
        return path[1], (_format_path(path[2:]) or None)
    return None, (_format_path(path) or None)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (bool, int, float)):
        return go_str(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _unknown_key_message(key: str, known: tuple[str, ...]) -> str:
    suggestion = None
    for candidate in known:
        if candidate.lower() == key.lower():
            suggestion = candidate
            break
    if suggestion is None:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.65)
        suggestion = close[0] if close else None
    if suggestion is not None:
        return f"unknown key '{key}' (did you mean '{suggestion}'?)"
    return f"unknown key '{key}' is ignored"


class _Reader:
    """Typed access to one mapping of the document, with located errors."""

    def __init__(self, ctx: _Context, mapping: Mapping[str, Any], model: str | None = None, prefix: str = "") -> None:
        self.ctx = ctx
        self.mapping = mapping
        self.model = model
        self.prefix = prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def fail(self, name: str, message: str) -> NoReturn:
        self.ctx.fail(message, self.model, self.key(name))

    def int(self, name: str, default: int, *, seconds: bool = False) -> int:
        value = self.mapping.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            what = "an integer number of seconds" if seconds else "an integer"
            self.fail(name, f"expected {what}, got {_describe(value)}")
        return value

    def bool(self, name: str, default: bool) -> bool:
        value = self.mapping.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(name, f"expected true or false, got {_describe(value)}")
        return value

    def str(self, name: str, default: Any) -> Any:
        value = self.mapping.get(name)
        if value is None:
            return default
        if isinstance(value, (dict, list)):
            self.fail(name, f"expected a string, got {_describe(value)}")
        return value if isinstance(value, str) else go_str(value)

    def str_list(self, name: str) -> list[str]:
        value = self.mapping.get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(name, f"expected a list of strings, got {_describe(value)}")
        out = []
        for index, item in enumerate(value):
            if isinstance(item, (dict, list)):
                self.ctx.fail(f"expected a string, got {_describe(item)}", self.model, f"{self.key(name)}[{index}]")
            out.append("" if item is None else (item if isinstance(item, str) else go_str(item)))
        return out

    def mapping_of(self, name: str) -> dict[str, Any]:
        value = self.mapping.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(name, f"expected a mapping, got {_describe(value)}")
        return value


# ------------------------------------------------------------ public entries


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate the configuration file at ``path``."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise ConfigError(path, None, None, f"cannot read config file: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(path, None, None, f"config file is not valid UTF-8 (byte offset {err.start})") from None
    return load_config_text(text, path, environ)


def load_config_text(text: str, path: str = "<string>", environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate configuration text; ``path`` is only used in messages."""
    ctx = _Context(path)
    env = os.environ if environ is None else environ
    document = _parse_document(ctx, text, env)
    return _build(ctx, path, document)


# ------------------------------------------------------------------ parsing


def _parse_document(ctx: _Context, text: str, environ: Mapping[str, str]) -> dict[str, Any]:
    substituted, refused = substitute_env_text(text, environ)
    try:
        document = parse_yaml(substituted)
    except yaml.YAMLError as err:
        # An unset variable left in place can itself break the YAML syntax
        # (e.g. inside a flow sequence); report the variable, not the syntax.
        hit = find_env_in_text(substituted)
        if hit is not None:
            name, line = hit
            ctx.fail(f"{env_problem(name, refused)} (line {line})")
        ctx.fail(describe_yaml_error(err))
    if document is None:
        document = {}
    if not isinstance(document, dict):
        ctx.fail(f"the top level of the config must be a mapping of settings, got {_describe(document)}")
    try:
        document = materialize(document)
    except RecursiveAliasError:
        ctx.fail("the document contains a recursive YAML alias")
    for location, text_value in walk_strings(document):
        match = ENV_MACRO_RE.search(text_value)
        if match:
            model, key = _locate(location)
            ctx.fail(env_problem(match.group(1), refused), model, key)
    return document


def _read_macro_block(ctx: _Context, value: Any, model: str | None) -> MacroList:
    if value is None:
        return []
    if not isinstance(value, dict):
        ctx.fail(f"expected a mapping of macro names to values, got {_describe(value)}", model, "macros")
    macros: MacroList = []
    for name, macro_value in value.items():
        problem = macro_declaration_problem(name, macro_value)
        if problem is not None:
            ctx.fail(problem, model, f"macros.{name}")
        macros.append((name, macro_value))
    return macros


# ---------------------------------------------------------------- expansion


def _rename_set_params_keys(ctx: _Context, model_id: str, model: dict[str, Any], macros: MacroList) -> None:
    filters = model.get("filters")
    if not isinstance(filters, dict):
        return
    by_id = filters.get("setParamsByID")
    if not isinstance(by_id, dict):
        return
    renamed: dict[str, Any] = {}
    for key, value in by_id.items():
        new_key = substitute_in_key(key, macros)
        if new_key in renamed:
            ctx.fail(f"keys '{key}' and another entry both resolve to '{new_key}'", model_id, "filters.setParamsByID")
        renamed[new_key] = value
    filters["setParamsByID"] = renamed


def _leftover_problem(name: str, in_model: bool) -> str:
    if name == "PID":
        return "${PID} is only allowed in cmdStop"
    if name == "PORT":
        if in_model:
            return "${PORT} is only available when the model's cmd uses ${PORT}"
        return "${PORT} can only be used inside a model definition"
    if name == "MODEL_ID" and not in_model:
        return "${MODEL_ID} can only be used inside a model definition"
    return f"unknown macro ${{{name}}}"


def _expand(ctx: _Context, document: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """Apply user macros and ${PORT}; return the expanded document and ports."""
    global_macros = _read_macro_block(ctx, document.get("macros"), None)

    models_in = document.get("models")
    if models_in is None:
        models_in = {}
    if not isinstance(models_in, dict):
        ctx.fail(f"expected a mapping of model ids to settings, got {_describe(models_in)}", None, "models")
    for model_id, model in models_in.items():
        if model_id == "":
            ctx.fail("model ids must not be empty", None, "models")
        if not isinstance(model, dict):
            ctx.fail(f"expected a mapping of model settings, got {_describe(model)}", model_id)
    model_macros = {mid: _read_macro_block(ctx, models_in[mid].get("macros"), mid) for mid in sorted(models_in)}

    expanded: dict[str, Any] = {key: value for key, value in document.items() if key != "macros"}

    # Prepare models: macro blocks are definitions, not targets; comment lines
    # go before expansion so a macro inside a comment never becomes argv; the
    # default proxy joins the same pass so its ${PORT} is handled uniformly.
    models: dict[str, dict[str, Any]] = {}
    defaulted_proxy: set[str] = set()
    for model_id, model in models_in.items():
        prepared = {key: value for key, value in model.items() if key != "macros"}
        for field_name in ("cmd", "cmdStop"):
            if isinstance(prepared.get(field_name), str):
                prepared[field_name] = strip_comment_lines(prepared[field_name])
        if prepared.get("proxy") is None:
            prepared["proxy"] = DEFAULT_PROXY
            defaulted_proxy.add(model_id)
        models[model_id] = prepared

    for key in list(expanded):
        if key != "models":
            expanded[key] = substitute(expanded[key], global_macros)

    start_port = _Reader(ctx, expanded).int("startPort", DEFAULT_START_PORT)
    if start_port < 1:
        ctx.fail(f"must be >= 1, got {start_port}", None, "startPort")

    ports: dict[str, int] = {}
    next_port = start_port
    for model_id in sorted(models):
        scope = merge_macro_scopes(model_id, global_macros, model_macros[model_id])
        model = substitute(models[model_id], scope)
        _rename_set_params_keys(ctx, model_id, model, scope)

        cmd = model.get("cmd")
        proxy = model.get("proxy")
        cmd_uses_port = isinstance(cmd, str) and "${PORT}" in cmd
        proxy_uses_port = isinstance(proxy, str) and "${PORT}" in proxy
        if cmd_uses_port or proxy_uses_port:
            if not cmd_uses_port:
                # llama-swap refuses the whole file here. One broken entry should
                # not take every other model down, so swapd warns and loads it;
                # the model then fails its health check with a clear error.
                if model_id in defaulted_proxy:
                    ctx.warn(
                        f"model '{model_id}': key 'proxy': not set, so it defaults to http://localhost:${{PORT}}, "
                        "but cmd does not use ${PORT}; set proxy to the server's address or pass ${PORT} "
                        "to the server in cmd (llama-swap rejects this config)"
                    )
                else:
                    ctx.warn(
                        f"model '{model_id}': key 'proxy': uses ${{PORT}} but cmd does not, so the server "
                        "cannot know the port (llama-swap rejects this config)"
                    )
            if next_port > MAX_PORT:
                ctx.fail(f"no port left to allocate (startPort {start_port}, port {next_port} > {MAX_PORT})", model_id, "cmd")
            port_macro: MacroList = [("PORT", next_port)]
            model = substitute(model, port_macro)
            _rename_set_params_keys(ctx, model_id, model, port_macro)
            ports[model_id] = next_port
            next_port += 1

        filters = model.get("filters")
        if isinstance(filters, dict) and isinstance(filters.get("setParamsByID"), dict):
            for key in filters["setParamsByID"]:
                match = MACRO_USE_RE.search(key)
                if match:
                    ctx.fail(
                        f"{_leftover_problem(match.group(1), True)} (in key '{key}')",
                        model_id,
                        "filters.setParamsByID",
                    )
        models[model_id] = model

    expanded["models"] = {model_id: models[model_id] for model_id in models_in}

    # Anything that still looks like a macro is an error (except ${PID} in cmdStop).
    for key, value in expanded.items():
        if key == "models" or key not in KNOWN_TOP_LEVEL_KEYS:
            continue
        for location, text_value in walk_values(value, (key,)):
            match = MACRO_USE_RE.search(text_value)
            if match:
                ctx.fail(_leftover_problem(match.group(1), False), None, _format_path(location))
    for model_id, model in expanded["models"].items():
        for field_name, value in model.items():
            for location, text_value in walk_values(value, (field_name,)):
                for match in MACRO_USE_RE.finditer(text_value):
                    if match.group(1) == "PID" and field_name == "cmdStop":
                        continue
                    ctx.fail(_leftover_problem(match.group(1), True), model_id, _format_path(location))

    # keep the declarations visible in the raw document
    if "macros" in document:
        expanded["macros"] = document["macros"]
    order = [key for key in document if key in expanded] + [key for key in expanded if key not in document]
    return {key: expanded[key] for key in order}, ports


# ------------------------------------------------------------------ building


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
            ctx.fail(f"expected a mapping of parameters, got {_describe(params)}", owner, f"{prefix}filters.setParamsByID.{requested}")
        by_id[str(requested)] = {k: v for k, v in params.items() if k not in PROTECTED_PARAMS}
    return Filters(tuple(sorted(strip)), copy.deepcopy(set_params), copy.deepcopy(by_id))


def _build_timeouts(ctx: _Context, reader: _Reader, model_id: str) -> Timeouts:
    treader = _Reader(ctx, reader.mapping_of("timeouts"), model_id, "timeouts.")

    def seconds(name: str) -> float | None:
        value = treader.int(name, 0, seconds=True)
        if value < 0:
            treader.fail(name, f"must be >= 0, got {value}")
        return float(value) if value > 0 else None

    return Timeouts(connect=seconds("connect"), response_header=seconds("responseHeader"), idle_conn=seconds("idleConn"))


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
        )
    return peers


def _check_capabilities(ctx: _Context, model_id: str, reader: _Reader) -> None:
    caps = reader.mapping_of("capabilities")
    caps_reader = _Reader(ctx, caps, model_id, "capabilities.")
    for direction in ("in", "out"):
        for index, modality in enumerate(caps_reader.str_list(direction)):
            if modality not in MODALITIES:
                ctx.fail(
                    f"invalid modality {modality!r} (expected one of: {', '.join(MODALITIES)})",
                    model_id,
                    f"capabilities.{direction}[{index}]",
                )
    if caps_reader.int("context", 0) < 0:
        ctx.fail("must be >= 0", model_id, "capabilities.context")
    caps_reader.bool("tools", False)
    caps_reader.bool("reranker", False)


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

    cmd_text = reader.str("cmd", None)
    if cmd_text is None:
        ctx.fail("is required (the command that starts the model's server)", model_id, "cmd")
    cmd = _argv(ctx, model_id, "cmd", cmd_text)
    if not cmd:
        ctx.fail("command is empty", model_id, "cmd")

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
    reader.mapping_of("compat")
    sls = model.get("sendLoadingState")
    if sls is not None and not isinstance(sls, bool):
        reader.fail("sendLoadingState", f"expected true or false, got {_describe(sls)}")
    _check_capabilities(ctx, model_id, reader)

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
    }
    fingerprint = _fingerprint({**fields, "raw": model})
    return ModelConfig(
        **fields,
        fingerprint=fingerprint,
        filters=_build_filters(ctx, reader, model_id),
        send_loading_state=global_send_loading_state if sls is None else sls,
        timeouts=_build_timeouts(ctx, reader, model_id),
    )


def _collect_aliases(
    ctx: _Context, models: dict[str, dict[str, Any]]
) -> tuple[dict[str, str], dict[str, list[str]]]:
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
    elif use in ("group", ""):
        groups_in, groups_key = settings.get("groups"), "routing.router.settings.groups"
    else:
        ctx.fail(f"unknown router {use!r} (expected 'group' or 'matrix')", None, "routing.router.use")

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
            ctx.fail(f"expected a mapping with swap, exclusive, persistent and members, got {_describe(group)}", None, key)
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


def _check_scheduler(ctx: _Context, expanded: dict[str, Any], models: Mapping[str, Any], aliases: Mapping[str, str]) -> None:
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


def _build(ctx: _Context, path: str, document: dict[str, Any]) -> Config:
    for key in document:
        if key in NOT_IMPLEMENTED_KEYS:
            ctx.warn(f"key '{key}' is accepted but not implemented by swapd yet; it is ignored")
        elif key not in KNOWN_TOP_LEVEL_KEYS:
            ctx.warn(_unknown_key_message(key, KNOWN_TOP_LEVEL_KEYS))

    expanded, ports = _expand(ctx, document)
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

    groups = _build_groups(ctx, expanded, list(raw_models), aliases)
    _check_scheduler(ctx, expanded, raw_models, aliases)
    peers = _build_peers(ctx, top)
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
        if real not in preload:
            preload.append(real)

    return Config(
        path=path,
        health_check_timeout=float(health_check_timeout),
        log_level=log_level,
        start_port=start_port,
        global_ttl=float(global_ttl),
        unload_timeout=float(unload_timeout),
        models=MappingProxyType(models),
        groups=MappingProxyType(groups),
        aliases=MappingProxyType(dict(aliases)),
        raw=MappingProxyType(expanded),
        warnings=tuple(ctx.warnings),
        client_limits=_build_client_limits(ctx, top),
        upstream_ignore_paths=_upstream_ignore_paths(ctx, top),
        api_keys=tuple(top.str_list("apiKeys")),
        allowed_hosts=parse_allowed_hosts(ctx, top),
        peers=MappingProxyType(peers),
        preload=tuple(preload),
        priority=MappingProxyType(priority),
        include_aliases_in_list=include_aliases,
        vram_check=vram_check,
        vram_check_timeout=vram_check_timeout,
    )


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
    match = _SIZE_RE.match(str(in_flight)) if isinstance(in_flight, (int, str)) and not isinstance(in_flight, bool) else None
    if match is None or int(match.group(1)) <= 0:
        reader.fail("maxBodyBytesInFlight", f"must be a positive size in bytes, or with a unit such as 512MiB or 2GiB; got {in_flight!r}")
    return ClientLimits(
        max_body_bytes=values["maxBodyMB"] * 1024 * 1024,
        header_timeout=float(values["headerTimeout"]),
        body_idle_timeout=float(values["bodyIdleTimeout"]),
        keepalive_timeout=float(values["keepaliveTimeout"]),
        max_body_bytes_in_flight=int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()],
    )


def _fifo_priority(expanded: Mapping[str, Any], aliases: Mapping[str, str], models: Mapping[str, Any]) -> dict[str, int]:
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
