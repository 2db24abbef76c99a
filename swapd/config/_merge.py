"""Loading a config from ``--config`` plus the files of ``--config-dir`` (llama-swap's rules).

Sources are the ``--config`` file (if any) first, then every ``*.yml`` and
``*.yaml`` file directly inside ``--config-dir`` in sorted name order. Each
file gets its ``${env.NAME}`` substitution and YAML parsing on its own; the
documents are then merged and the result is validated as one config:

- mappings merge key by key, recursively;
- lists concatenate (``apiKeys``, a model's ``aliases`` ...);
- a scalar set to different values in two files is an error naming both
  files and the key; the same value twice is fine, and null yields;
- ``models``, ``groups``, ``peers``, ``profiles``, ``selectors``, ``matrix``
  hold named entities: one name defined in two files is an error, whatever
  the contents.

Errors found after the merge name the file the offending model or key came from.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from typing import Any

from ._errors import ConfigError
from ._expand import _parse_document
from ._load import _build
from ._model import Config
from ._reader import _Context, _describe

# Dotted paths whose children are named entities (llama-swap's identityMapPaths).
_ENTITY_MAPS = {
    ("models",): "model",
    ("groups",): "group",
    ("profiles",): "profile",
    ("selectors",): "selector",
    ("peers",): "peer",
    ("matrix",): "matrix entry",
    ("routing", "router", "settings", "groups"): "group",
    ("routing", "router", "settings", "matrix"): "matrix entry",
}
_INDEX = re.compile(r"\[\d+\]")


def config_dir_files(config_dir: str) -> list[str]:
    """The ``*.yml``/``*.yaml`` files directly inside ``config_dir``, sorted by name."""
    try:
        names = os.listdir(config_dir)
    except OSError as err:
        raise ConfigError(config_dir, None, None, f"cannot read config directory: {err.strerror or err}") from None
    files = []
    for name in sorted(names):
        if not (name.endswith(".yml") or name.endswith(".yaml")):
            continue
        path = os.path.join(config_dir, name)
        if os.path.isfile(path):
            files.append(path)
    return files


def config_sources(config_path: str | None, config_dir: str | None) -> list[str]:
    """Every file a config is read from, in merge order."""
    if not config_path and not config_dir:
        raise ConfigError("swapd", None, None, "at least one of --config, --config-dir or --models-dir must be given")
    sources = [config_path] if config_path else []
    if config_dir:
        files = config_dir_files(config_dir)
        if config_path:
            for path in files:
                try:
                    same = os.path.samefile(path, config_path)
                except OSError:
                    same = os.path.abspath(path) == os.path.abspath(config_path)
                if same:
                    raise ConfigError(
                        config_path, None, None, f"is also in --config-dir {config_dir}; remove it from one of them"
                    )
        sources += files
        if not sources:
            raise ConfigError(
                config_dir, None, None, "no configuration sources found: no *.yml or *.yaml files in the directory"
            )
    return sources


def models_dir_label(models_dir: str) -> str:
    """What errors and logs call a config made by ``--models-dir`` alone (there is no file)."""
    return f"--models-dir {models_dir}"


def load_config_sources(
    config_path: str | None,
    config_dir: str | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    models_dir: str | None = None,
    previous: Config | None = None,
) -> Config:
    """Load ``--config`` and/or ``--config-dir`` as one validated :class:`Config`.

    ``models_dir`` (``--models-dir``) sets ``modelsDir.path``, and is enough on
    its own: with no config file the config is that folder's models and the
    defaults. ``previous`` is the running config on a reload (see load_config).
    """
    from ._load import load_config, load_config_text

    if models_dir and not config_path and (not config_dir or not config_dir_files(config_dir)):
        label = models_dir_label(models_dir)
        return load_config_text("", label, environ, models_dir=models_dir, previous=previous)
    if not config_dir:
        if not config_path:
            config_sources(config_path, config_dir)  # raises the "at least one" error
        assert config_path is not None
        return load_config(config_path, environ, models_dir=models_dir, previous=previous)
    sources = config_sources(config_path, config_dir)
    env = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    owners: dict[tuple, str] = {}
    for path in sources:
        document = _parse_document(_Context(path), _read(path), env)
        _merge_mapping(merged, document, (), path, owners)
    label = config_dir if not config_path else f"{config_path} + {config_dir}"
    ctx = _Context(label)
    try:
        return _build(ctx, label, merged, models_dir=models_dir, previous=previous)
    except ConfigError as err:
        raise _relocate(err, owners) from None


def _read(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise ConfigError(path, None, None, f"cannot read config file: {err.strerror or err}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(path, None, None, f"config file is not valid UTF-8 (byte offset {err.start})") from None


# -- merging -------------------------------------------------------------------


def _owner(owners: dict[tuple, str], path: tuple) -> str | None:
    for end in range(len(path), 0, -1):
        found = owners.get(path[:end])
        if found is not None:
            return found
    return None


def _error(file: str, path: tuple, message: str) -> ConfigError:
    if len(path) >= 2 and path[0] == "models":
        return ConfigError(file, str(path[1]), ".".join(map(str, path[2:])) or None, message)
    return ConfigError(file, None, ".".join(map(str, path)) or None, message)


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return "a scalar"


def _merge_mapping(dst: dict, src: dict, path: tuple, file: str, owners: dict[tuple, str]) -> None:
    for key, value in src.items():
        child = path + (key,)
        if key not in dst:
            dst[key] = copy.deepcopy(value)
            owners.setdefault(child, file)
            continue
        current = dst[key]
        entity = _ENTITY_MAPS.get(child)
        if entity is not None and isinstance(current, dict) and isinstance(value, dict):
            for name, body in value.items():
                if name in current:
                    where = _owner(owners, child + (name,))
                    raise _error(file, child + (name,), f"duplicate {entity} '{name}': already defined in {where}")
                current[name] = copy.deepcopy(body)
                owners[child + (name,)] = file
            continue
        dst[key] = _merge_value(current, value, child, file, owners)


def _merge_value(current: Any, value: Any, path: tuple, file: str, owners: dict[tuple, str]) -> Any:
    if value is None:
        return current
    if current is None:
        owners[path] = file
        return copy.deepcopy(value)
    if isinstance(current, dict) and isinstance(value, dict):
        _merge_mapping(current, value, path, file, owners)
        return current
    if isinstance(current, list) and isinstance(value, list):
        return current + copy.deepcopy(value)
    where = _owner(owners, path)
    if isinstance(current, (dict, list)) or isinstance(value, (dict, list)):
        raise _error(file, path, f"is {_kind(value)} here but {_kind(current)} in {where}")
    if type(current) is type(value) and current == value:
        return current
    raise _error(file, path, f"conflicting values: {_describe(value)} here, {_describe(current)} in {where}")


def _relocate(err: ConfigError, owners: dict[tuple, str]) -> ConfigError:
    """Point an error found in the merged document at the file it came from."""
    path: tuple = ()
    if err.model is not None and not (err.key or "").startswith("modelsDir."):  # a found model's key is modelsDir's
        path = ("models", err.model)
    if err.key:
        path += tuple(_INDEX.sub("", err.key).split("."))
    file = _owner(owners, path) if path else None
    if file is None:
        return err
    return ConfigError(file, err.model, err.key, err.message)
