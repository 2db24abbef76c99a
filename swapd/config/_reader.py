"""Reading typed values from the parsed document; every error names the file, the model and the key."""

from __future__ import annotations

import builtins
import difflib
from collections.abc import Mapping
from typing import Any, NoReturn, overload

from ._errors import ConfigError
from ._format import go_str


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

    @overload
    def str(self, name: builtins.str, default: builtins.str) -> builtins.str: ...
    @overload
    def str(self, name: builtins.str, default: None) -> builtins.str | None: ...

    def str(self, name: builtins.str, default: builtins.str | None) -> builtins.str | None:
        value = self.mapping.get(name)
        if value is None:
            return default
        if isinstance(value, (dict, list)):
            self.fail(name, f"expected a string, got {_describe(value)}")
        return value if isinstance(value, str) else go_str(value)

    def str_list(self, name: builtins.str) -> list[builtins.str]:  # builtins: ``str`` here is the method above
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

    def mapping_of(self, name: builtins.str) -> dict[builtins.str, Any]:
        value = self.mapping.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(name, f"expected a mapping, got {_describe(value)}")
        return value


# ------------------------------------------------------------ public entries


def open_block(ctx: _Context, node: Any, key: str, known: tuple[str, ...]) -> _Reader:
    """A reader for the optional mapping at ``key``: absent is empty, not a mapping fails, unknown keys warn."""
    if node is None:
        node = {}
    if not isinstance(node, dict):
        names = ", ".join(known[:-1]) + f" and {known[-1]}" if len(known) > 1 else known[0]
        ctx.fail(f"expected a mapping with {names}, got {_describe(node)}", None, key)
    for name in node:
        if name not in known:
            ctx.warn(f"{key}: {_unknown_key_message(name, known)}")
    return _Reader(ctx, node, prefix=key + ".")
