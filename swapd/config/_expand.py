"""Parsing the YAML document and expanding macros (``${PORT}``, ``${env.X}``, user macros) in llama-swap's order."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from ._command import strip_comment_lines
from ._keys import DEFAULT_PROXY, DEFAULT_START_PORT, KNOWN_TOP_LEVEL_KEYS, MAX_PORT
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
from ._models_dir import (
    MODEL_PATH_MACRO,
    MODELS_DIR_KEY,
    MODELS_DIR_MODEL_KEYS,
    ModelsDirPlan,
    model_path_macro,
    read_models_dir,
)
from ._reader import _Context, _describe, _format_path, _locate, _Reader
from ._yaml import RecursiveAliasError, describe_yaml_error, materialize, parse_yaml


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
    if name == MODEL_PATH_MACRO:
        return "${MODEL_PATH} is only set for the models modelsDir finds"
    return f"unknown macro ${{{name}}}"


def _models_dir(
    ctx: _Context, document: dict[str, Any], global_macros: MacroList, models_in: dict[str, Any], override: str | None
) -> ModelsDirPlan | None:
    """``modelsDir`` with the global macros applied to its path (its cmd is expanded per model)."""

    def expand_path(text: str) -> str:
        value = substitute(text, global_macros)
        text = value if isinstance(value, str) else str(value)
        match = MACRO_USE_RE.search(text)
        if match:
            ctx.fail(_leftover_problem(match.group(1), False), None, f"{MODELS_DIR_KEY}.path")
        return text

    return read_models_dir(
        ctx, document.get(MODELS_DIR_KEY), override=override, configured=models_in, expand_path=expand_path
    )


def _check_models_dir_macros(ctx: _Context, plan: ModelsDirPlan, global_macros: MacroList) -> None:
    """A macro modelsDir's settings cannot use is an error even while the folder holds no model."""
    settings = {key: plan.raw[key] for key in ("cmd", *MODELS_DIR_MODEL_KEYS) if plan.raw.get(key) is not None}
    if isinstance(settings.get("cmd"), str):
        settings["cmd"] = strip_comment_lines(settings["cmd"])
    scope = merge_macro_scopes("x", global_macros, [(MODEL_PATH_MACRO, "x")])
    settings = substitute(substitute(settings, scope), [("PORT", 1)])
    for location, text in walk_values(settings):
        match = MACRO_USE_RE.search(text)
        if match:
            ctx.fail(_leftover_problem(match.group(1), True), None, f"{MODELS_DIR_KEY}.{_format_path(location)}")


def _expand(
    ctx: _Context,
    document: dict[str, Any],
    *,
    models_dir: str | None = None,
    kept_ports: Mapping[str, int] | None = None,
) -> tuple[dict[str, Any], dict[str, int], ModelsDirPlan | None]:
    """Apply user macros and ${PORT}; return the expanded document, the ports and what modelsDir found.

    ``models_dir`` (``--models-dir``) sets ``modelsDir.path``; ``kept_ports``
    are the ports found models had before a reload, kept when still free so an
    unchanged model keeps running when a file is added.
    """
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

    plan = _models_dir(ctx, document, global_macros, models_in, models_dir)
    found = plan.entries if plan is not None else {}
    for model_id in found:
        assert plan is not None
        model_macros[model_id] = [model_path_macro(plan.found[model_id])]

    expanded: dict[str, Any] = {key: value for key, value in document.items() if key != "macros"}
    if plan is not None:
        expanded[MODELS_DIR_KEY] = plan.raw

    # Prepare models: macro blocks are definitions, not targets; comment lines
    # go before expansion so a macro inside a comment never becomes argv; the
    # default proxy joins the same pass so its ${PORT} is handled uniformly.
    models: dict[str, dict[str, Any]] = {}
    defaulted_proxy: set[str] = set()
    for model_id, model in {**models_in, **found}.items():
        prepared = {key: value for key, value in model.items() if key != "macros"}
        for field_name in ("cmd", "cmdStop"):
            if isinstance(prepared.get(field_name), str):
                prepared[field_name] = strip_comment_lines(prepared[field_name])
        if prepared.get("proxy") is None:
            cmd_text = prepared.get("cmd")
            if cmd_text is None or (isinstance(cmd_text, str) and not cmd_text.strip()):
                # With a proxy and no cmd a model is remote (already running elsewhere); with neither
                # there is nothing to start and nowhere to send requests.
                ctx.fail(
                    "is required: the command that starts the model's server (or set proxy to the address "
                    "of a server that is already running, for a remote model)",
                    model_id,
                    "cmd",
                )
            prepared["proxy"] = DEFAULT_PROXY
            defaulted_proxy.add(model_id)
        models[model_id] = prepared

    for key in list(expanded):
        if key not in ("models", MODELS_DIR_KEY):
            expanded[key] = substitute(expanded[key], global_macros)

    start_port = _Reader(ctx, expanded).int("startPort", DEFAULT_START_PORT)
    if start_port < 1:
        ctx.fail(f"must be >= 1, got {start_port}", None, "startPort")

    ports: dict[str, int] = {}
    next_port = start_port
    # models: first, in id order, as llama-swap does; then the folder's models, each keeping
    # the port it had before a reload when no other model took it
    kept = {mid: port for mid, port in (kept_ports or {}).items() if mid in found and start_port <= port <= MAX_PORT}
    for model_id in [*sorted(models_in), *sorted(found)]:
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
            port = kept.get(model_id)
            if port is None or port in ports.values():
                taken = set(ports.values()) | (set(kept.values()) if model_id in found else set())
                while next_port in taken:
                    next_port += 1
                if next_port > MAX_PORT:
                    ctx.fail(
                        f"no port left to allocate (startPort {start_port}, port {next_port} > {MAX_PORT})",
                        model_id,
                        f"{MODELS_DIR_KEY}.cmd" if model_id in found else "cmd",
                    )
                port = next_port
                next_port += 1
            port_macro: MacroList = [("PORT", port)]
            model = substitute(model, port_macro)
            _rename_set_params_keys(ctx, model_id, model, port_macro)
            ports[model_id] = port

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

    expanded["models"] = {model_id: models[model_id] for model_id in [*models_in, *sorted(found)]}

    # Anything that still looks like a macro is an error (except ${PID} in cmdStop).
    for key, value in expanded.items():
        if key in ("models", MODELS_DIR_KEY) or key not in KNOWN_TOP_LEVEL_KEYS:
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
                    key = _format_path(location)
                    if model_id in found:  # a found model's settings are modelsDir's
                        key = f"{MODELS_DIR_KEY}.{key}"
                    ctx.fail(_leftover_problem(match.group(1), True), model_id, key)
    if plan is not None:
        _check_models_dir_macros(ctx, plan, global_macros)

    # keep the declarations visible in the raw document
    if "macros" in document:
        expanded["macros"] = document["macros"]
    order = [key for key in document if key in expanded] + [key for key in expanded if key not in document]
    return {key: expanded[key] for key in order}, ports, plan


# ------------------------------------------------------------------ building
