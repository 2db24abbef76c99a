"""``modelsDir`` (a swapd addition): every GGUF file under a folder becomes a model.

The rules, in the order they apply (README.md and docs/compatibility.md say the same):

* The folder is searched recursively. Symbolic links are followed, to files and
  to folders (a folder reached twice is read once); names that start with a
  dot are skipped, and so is a subfolder that cannot be read (with a warning).
  At most ``MAX_FOLDERS`` folders are read.
* Every ``*.gguf`` file (any case) is a model; its id is the file name without
  ``.gguf``. ``name-00001-of-00003.gguf`` and its siblings are one model,
  ``name``, whose path is the first part; a split with a part missing is
  skipped with a warning.
* A file whose name contains ``mmproj`` is a multimodal projector, never a
  model. In its folder it goes to the models its name names: the name less the
  ``mmproj`` word and a trailing precision (``f16``, ``bf16``, ``f32``, ``q8_0``
  ...) must begin the model's id, case aside, up to a ``-``, ``_`` or ``.``
  (the longest such name wins; then the first file name). A projector that
  names no model in its folder (``mmproj-F16.gguf``) goes to every model of the
  folder when it is the only projector there; with several, such models get
  none (a warning says so).
* An id swapd would refuse (a space, ``/``, ``$``, ``%`` ...) is skipped with a
  warning naming the file; so is an id found twice (the first wins: a folder's
  own files before its subfolders, each in name order).

No process starts and nothing is read from the files themselves.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._command import CommandSyntaxError, command_to_argv
from ._reader import _Context, _describe, open_block

MODELS_DIR_KEY = "modelsDir"
KNOWN_MODELS_DIR_KEYS = ("path", "cmd", "ttl", "env", "checkEndpoint", "unloadTimeout", "concurrencyLimit")
# The keys of a discovered model that come from modelsDir (besides cmd).
MODELS_DIR_MODEL_KEYS = ("ttl", "env", "checkEndpoint", "unloadTimeout", "concurrencyLimit")
DEFAULT_MODELS_DIR_CMD = "llama-server --port ${PORT} -m ${MODEL_PATH}"
MODEL_PATH_MACRO = "MODEL_PATH"
MAX_FOLDERS = 10_000

_SUFFIX = ".gguf"
_SPLIT_RE = re.compile(r"^(?P<base>.+)-(?P<part>\d{5})-of-(?P<total>\d{5})$")
# What an id may hold: letters and digits of any script, and . _ - + @ = , : ( ) [ ].
# Nothing that needs quoting in a URL path or a command line, and no "${".
_ID_RE = re.compile(r"^\w[\w.+@=,:()\[\]-]*$")
_MMPROJ_WORD_RE = re.compile(r"[-_.]*mmproj[-_.]*", re.IGNORECASE)
_PRECISION_RE = re.compile(r"(?:^|[-_.])(?:b?fp?(?:16|32)|i?q\d+(?:_[a-z0-9]+)*)$", re.IGNORECASE)
_SEPARATORS = "-_."
# a cmd that already chooses its projector gets none appended
_MMPROJ_FLAG_RE = re.compile(r"(?:^|\s)(?:--mmproj|-mm|--no-mmproj|--mmproj-url|-mmu)(?:[\s=]|$)")

Warn = Callable[[str], None]


@dataclass(frozen=True)
class FoundModel:
    """One model found in the folder."""

    id: str
    path: str  # ${MODEL_PATH}: the file, or the first part of a split model
    mmproj: str | None = None


def is_mmproj(name: str) -> bool:
    return "mmproj" in name.lower()


def cmd_passes_mmproj(cmd: str) -> bool:
    """Whether a cmd already passes (or refuses) a projector itself."""
    return _MMPROJ_FLAG_RE.search(cmd) is not None


def mmproj_target(file_name: str) -> str:
    """The model name a projector's file name carries ('' for ``mmproj-F16.gguf``)."""
    stem = file_name[: -len(_SUFFIX)] if file_name.lower().endswith(_SUFFIX) else file_name
    name = _MMPROJ_WORD_RE.sub("-", stem).strip(_SEPARATORS)
    return _PRECISION_RE.sub("", name).strip(_SEPARATORS)


def _names_model(target: str, model_id: str) -> bool:
    if not target:
        return False
    low, want = model_id.lower(), target.lower()
    return low.startswith(want) and (len(low) == len(want) or low[len(want)] in _SEPARATORS)


def gguf_folders(root: str, warn: Warn) -> list[tuple[str, list[str]]]:
    """Each folder under ``root`` (``root`` first) with the ``*.gguf`` names directly in it, sorted.

    ``root`` itself must be readable (the caller checked it; an OSError from it
    propagates); an unreadable subfolder is skipped with a warning.
    """
    out: list[tuple[str, list[str]]] = []
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        if len(out) >= MAX_FOLDERS:
            warn(f"key 'modelsDir.path': stopped after {MAX_FOLDERS} folders under {root}; the rest are not searched")
            break
        try:
            st = os.stat(folder)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda entry: entry.name)
        except OSError as err:
            if folder == root:
                raise
            warn(f"key 'modelsDir.path': cannot read folder {folder} ({err.strerror or err}); skipped")
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue  # a link back to a folder already read
        seen.add((st.st_dev, st.st_ino))
        files: list[str] = []
        subfolders: list[str] = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():  # follows links
                    subfolders.append(entry.path)
                elif entry.name.lower().endswith(_SUFFIX) and entry.is_file():
                    files.append(entry.name)
            except OSError:
                continue
        out.append((folder, files))
        stack.extend(reversed(subfolders))
    return out


def _folder_models(folder: str, names: list[str], warn: Warn) -> list[FoundModel]:
    projectors = [name for name in names if is_mmproj(name)]
    found: list[tuple[str, str]] = []  # (id, file name), in name order
    splits: dict[tuple[str, int], dict[int, str]] = {}
    for name in names:
        if name in projectors:
            continue
        stem = name[: -len(_SUFFIX)]
        match = _SPLIT_RE.match(stem)
        if match is None:
            found.append((stem, name))
        else:
            splits.setdefault((match["base"], int(match["total"])), {})[int(match["part"])] = name
    for (base, total), parts in splits.items():
        if set(parts) != set(range(1, total + 1)):
            first = parts[min(parts)]
            warn(
                f"key 'modelsDir.path': {os.path.join(folder, first)}: split model '{base}' has "
                f"{len(parts)} of its {total} parts; skipped"
            )
            continue
        found.append((base, parts[1]))
    found.sort(key=lambda item: item[1])

    # Projectors: by the model name in their file name, else the folder's only one.
    chosen: dict[str, str] = {}
    named_any: set[str] = set()
    for model_id, _name in found:
        matches = [p for p in projectors if _names_model(mmproj_target(p), model_id)]
        if matches:
            best = max(len(mmproj_target(p)) for p in matches)
            chosen[model_id] = min(p for p in matches if len(mmproj_target(p)) == best)
            named_any.update(matches)
    unnamed = [p for p in projectors if p not in named_any]
    leftover = [model_id for model_id, _name in found if model_id not in chosen]
    if leftover and unnamed:
        if len(projectors) == 1:
            for model_id in leftover:
                chosen[model_id] = projectors[0]
        else:
            warn(
                f"key 'modelsDir.path': folder {folder} has {len(projectors)} mmproj files and none names "
                f"{', '.join(repr(m) for m in leftover)}; no --mmproj given to "
                f"{'it' if len(leftover) == 1 else 'them'} (name the projector after the model, or use a models: entry)"
            )
    return [
        FoundModel(
            id=model_id,
            path=os.path.join(folder, name),
            mmproj=os.path.join(folder, chosen[model_id]) if model_id in chosen else None,
        )
        for model_id, name in found
    ]


def scan_models_dir(root: str, warn: Warn) -> list[FoundModel]:
    """The models under ``root`` (absolute), in the order found; problems with single files are warnings."""
    by_id: dict[str, FoundModel] = {}
    for folder, names in gguf_folders(root, warn):
        for found in _folder_models(folder, names, warn):
            if "${" in found.path or "${" in (found.mmproj or ""):
                warn(f"key 'modelsDir.path': {found.path}: the path holds '${{', which would read as a macro; skipped")
                continue
            if not _ID_RE.match(found.id):
                warn(
                    f"key 'modelsDir.path': {found.path}: model id {found.id!r} holds characters swapd does not "
                    "accept in an id (letters, digits and . _ - + @ = , : ( ) [ ] only); skipped"
                )
                continue
            first = by_id.get(found.id)
            if first is not None:
                warn(
                    f"key 'modelsDir.path': {found.path}: model id '{found.id}' was already found "
                    f"in {first.path}; skipped"
                )
                continue
            by_id[found.id] = found
    return list(by_id.values())


def models_dir_stamp(root: str) -> tuple[str, ...] | None:
    """What the folder holds, for ``--watch-config``: every ``*.gguf`` path; None when it cannot be read."""
    try:
        folders = gguf_folders(root, lambda _message: None)
    except OSError:
        return None
    return tuple(os.path.join(folder, name) for folder, names in folders for name in names)


# ------------------------------------------------------------------ the config key


@dataclass
class ModelsDirPlan:
    """What ``modelsDir`` adds to a config: model entries as if written under ``models:``."""

    path: str  # absolute
    raw: dict[str, Any]  # the modelsDir mapping as applied (``--models-dir`` sets its path)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> model entry
    found: dict[str, FoundModel] = field(default_factory=dict)  # id -> what was found, for the entries


def _configured_names(models: Mapping[str, Any]) -> dict[str, str]:
    """Every alias (and setParamsByID key) of the ``models:`` entries, to its model."""
    names: dict[str, str] = {}
    for model_id, model in models.items():
        if not isinstance(model, dict):
            continue
        aliases = model.get("aliases")
        for alias in aliases if isinstance(aliases, list) else ():
            if isinstance(alias, str):
                names.setdefault(alias, model_id)
        filters = model.get("filters")
        by_id = filters.get("setParamsByID") if isinstance(filters, dict) else None
        for key in by_id if isinstance(by_id, dict) else ():
            names.setdefault(str(key), model_id)
    return names


def _check_keys(ctx: _Context, node: dict[str, Any]) -> str:
    """Validate the per-model keys here, so errors name ``modelsDir.<key>``; return the cmd template."""
    reader = open_block(ctx, node, MODELS_DIR_KEY, KNOWN_MODELS_DIR_KEYS)
    cmd = reader.str("cmd", DEFAULT_MODELS_DIR_CMD)
    try:
        if not command_to_argv(cmd):
            reader.fail("cmd", "command is empty")
    except CommandSyntaxError as err:
        reader.fail("cmd", f"cannot split command: {err}")
    ttl = reader.int("ttl", -1, seconds=True)
    if ttl < -1:
        reader.fail("ttl", f"must be >= 0 (or -1 to use globalTTL), got {ttl}")
    for name in ("unloadTimeout", "concurrencyLimit"):
        value = reader.int(name, 0, seconds=name == "unloadTimeout")
        if value < 0:
            reader.fail(name, f"must be >= 0, got {value}")
    for index, entry in enumerate(reader.str_list("env")):
        name, sep, _value = entry.partition("=")
        if not sep or not name:
            ctx.fail(f"expected NAME=VALUE, got {entry!r}", None, f"{MODELS_DIR_KEY}.env[{index}]")
    reader.str("checkEndpoint", "")
    return cmd


def read_models_dir(
    ctx: _Context,
    node: Any,
    *,
    override: str | None,
    configured: Mapping[str, Any],
    expand_path: Callable[[str], str],
) -> ModelsDirPlan | None:
    """Read ``modelsDir`` (and ``--models-dir``), search the folder, and build an entry per model.

    ``expand_path`` applies the global macros to ``path``; ``configured`` is
    ``models:``, whose ids and aliases win over what the folder holds.
    """
    if node is None and override is None:
        return None
    if node is None:
        node = {}
    if not isinstance(node, dict):
        ctx.fail(f"expected a mapping with path, cmd, ttl ..., got {_describe(node)}", None, MODELS_DIR_KEY)
    raw = dict(node)
    if override is not None:
        raw["path"] = override
    where = " (given with --models-dir)" if override is not None else ""
    template = _check_keys(ctx, raw)
    path_key = f"{MODELS_DIR_KEY}.path"
    text = raw.get("path")
    if text is None or (isinstance(text, str) and not text.strip()):
        ctx.fail("is required: the folder whose *.gguf files become models", None, path_key)
    if not isinstance(text, str):
        ctx.fail(f"expected the path of a folder, got {_describe(text)}", None, path_key)
    root = os.path.abspath(os.path.expanduser(expand_path(text)))
    try:
        if not os.path.isdir(root):
            problem = "is not a folder" if os.path.exists(root) else "does not exist"
            ctx.fail(f"folder {root} {problem}{where}", None, path_key)
        found = scan_models_dir(root, ctx.warn)
    except OSError as err:
        ctx.fail(f"cannot read folder {root}: {err.strerror or err}{where}", None, path_key)

    plan = ModelsDirPlan(path=root, raw=raw)
    aliases = _configured_names(configured)
    passes_mmproj = cmd_passes_mmproj(template)
    for model in found:
        if model.id in configured:
            continue  # models: wins, silently: that is how a found model is given its own settings
        if model.id in aliases:
            ctx.warn(
                f"key 'modelsDir.path': {model.path}: model id '{model.id}' is an alias of model "
                f"'{aliases[model.id]}' in models:; skipped"
            )
            continue
        cmd = template
        if model.mmproj is not None and not passes_mmproj:
            cmd = f"{template.rstrip()}\n--mmproj {shlex.quote(model.mmproj)}"
        entry: dict[str, Any] = {"cmd": cmd}
        for key in MODELS_DIR_MODEL_KEYS:
            if raw.get(key) is not None:
                entry[key] = copy.deepcopy(raw[key])
        plan.entries[model.id] = entry
        plan.found[model.id] = model
    return plan


def model_path_macro(model: FoundModel) -> tuple[str, str]:
    """``${MODEL_PATH}`` for one found model: shell-quoted when it needs it, as ``${swapd.python}`` is."""
    return MODEL_PATH_MACRO, shlex.quote(model.path)
