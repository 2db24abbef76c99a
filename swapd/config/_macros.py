"""Environment and user macro handling (``${env.NAME}``, ``${name}``, ``${PORT}`` ...).

Semantics follow llama-swap:

* ``${env.NAME}`` is replaced in the raw text before YAML parsing; the value
  has backslashes and double quotes escaped so it survives inside a
  double-quoted YAML string.  References that only appear in comments are
  ignored.  Values holding newlines, carriage returns or NUL bytes are refused.
* User macros are an ordered list.  Substitution walks the list from the last
  entry to the first, so a macro may use macros declared *before* it, and
  ``MODEL_ID`` (always first) is available to every macro.
* A string that is exactly ``${name}`` takes the macro's typed value
  (int/float/bool); otherwise the value is interpolated as text.

swapd adds ``${swapd.python}``, swapd's own interpreter (``sys.executable``),
so a config can run ``${swapd.python} -m swapd.fake_backend`` whatever python
is on PATH.  It is replaced with the env macros; the dot keeps it apart from
user macros, whose names cannot contain one.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from ._format import go_str

ENV_MACRO_RE = re.compile(r"\$\{env\.([a-zA-Z_][a-zA-Z0-9_]*)\}")
MACRO_USE_RE = re.compile(r"\$\{([a-zA-Z0-9_-]+)\}")
MACRO_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]+$")
MAX_MACRO_NAME_LEN = 63
RESERVED_MACROS = ("PID", "PORT", "MODEL_ID")
SWAPD_PYTHON_MACRO = "${swapd.python}"

MacroList = list[tuple[str, Any]]

_BAD_ENV_CHARS = ("\n", "\r", "\x00")


# ---------------------------------------------------------------- env macros


def substitute_env_text(text: str, environ: Mapping[str, str]) -> tuple[str, set[str]]:
    """Replace ``${swapd.python}``, and ``${env.NAME}`` for every variable that is set and usable.

    Returns the new text and the names whose values were refused.  Unset
    variables are left in place; the caller reports them if they survive in
    the parsed document (i.e. they were not inside a comment).
    """
    refused: set[str] = set()
    text = text.replace(SWAPD_PYTHON_MACRO, shlex.quote(sys.executable))
    for name in dict.fromkeys(ENV_MACRO_RE.findall(text)):
        if name not in environ:
            continue
        value = environ[name]
        if any(ch in value for ch in _BAD_ENV_CHARS):
            refused.add(name)
            continue
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        text = text.replace("${env." + name + "}", escaped)
    return text, refused


def env_problem(name: str, refused: set[str]) -> str:
    if name in refused:
        return (
            f"environment variable '{name}' contains a newline, carriage return or NUL byte and cannot be substituted"
        )
    return f"environment variable '{name}' is not set (referenced as ${{env.{name}}})"


def _without_comment(line: str) -> str:
    for pos, ch in enumerate(line):
        if ch == "#" and (pos == 0 or line[pos - 1] in " \t"):
            return line[:pos]
    return line


def find_env_in_text(text: str) -> tuple[str, int] | None:
    """First ``${env.NAME}`` outside (apparent) comments, with its line number."""
    for lineno, line in enumerate(text.split("\n"), start=1):
        match = ENV_MACRO_RE.search(_without_comment(line))
        if match:
            return match.group(1), lineno
    return None


def walk_strings(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, str]]:
    """Yield (path, text) for every string (mapping keys included) in a tree."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield path + (key,), key
            yield from walk_strings(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from walk_strings(item, path + (index,))


def walk_values(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, str]]:
    """Yield (path, text) for every string value in a tree (mapping keys excluded)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from walk_values(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from walk_values(item, path + (index,))


# -------------------------------------------------------------- user macros


def macro_declaration_problem(name: str, value: Any) -> str | None:
    """Why a macro declaration is invalid, or None when it is fine."""
    if len(name) > MAX_MACRO_NAME_LEN:
        return f"macro name '{name}' is longer than {MAX_MACRO_NAME_LEN} characters"
    if not MACRO_NAME_RE.match(name):
        return f"macro name '{name}' may only contain letters, digits, '_' and '-'"
    if isinstance(value, str):
        if "${" + name + "}" in value:
            return f"macro '{name}' refers to itself (self-reference)"
    elif not isinstance(value, (bool, int, float)):
        kind = "null" if value is None else ("a list" if isinstance(value, list) else "a mapping")
        return f"macro '{name}' must be a scalar (string, number or boolean), got {kind}"
    if name in RESERVED_MACROS:
        return f"macro name '{name}' is reserved"
    return None


def merge_macro_scopes(model_id: str, global_macros: MacroList, model_macros: MacroList) -> MacroList:
    """MODEL_ID first, then the globals; model macros replace same-named globals in place."""
    merged: MacroList = [("MODEL_ID", model_id)] + list(global_macros)
    for name, value in model_macros:
        for index, (existing, _old) in enumerate(merged):
            if existing == name:
                merged[index] = (name, value)
                break
        else:
            merged.append((name, value))
    return merged


def _substitute_one(value: Any, slug: str, macro_value: Any, macro_text: str) -> Any:
    if isinstance(value, str):
        if value == slug:
            return macro_value
        if slug in value:
            return value.replace(slug, macro_text)
        return value
    if isinstance(value, dict):
        return {k: _substitute_one(v, slug, macro_value, macro_text) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_one(v, slug, macro_value, macro_text) for v in value]
    return value


def substitute(value: Any, macros: MacroList) -> Any:
    """Apply macros to every string in ``value`` (mapping keys excluded)."""
    for name, macro_value in reversed(macros):
        value = _substitute_one(value, "${" + name + "}", macro_value, go_str(macro_value))
    return value


def substitute_in_key(key: str, macros: MacroList) -> str:
    for name, macro_value in reversed(macros):
        key = key.replace("${" + name + "}", go_str(macro_value))
    return key
