"""YAML parsing tuned to behave like the Go yaml.v3 decoder used by llama-swap.

PyYAML implements YAML 1.1, where ``yes``/``on``/``no`` are booleans, ``1:30``
is a base-60 integer and dates become ``datetime`` objects.  yaml.v3 (decoding
into untyped values, as llama-swap does) treats all of those as plain strings.
This module provides a loader with yaml.v3-like scalar resolution, rejects
duplicate mapping keys (yaml.v3 refuses them) and converts the result into
plain, unshared dict/list trees with string keys.
"""

from __future__ import annotations

import datetime
import math
import re
from typing import Any

import yaml

from ._format import go_str

_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _GoLikeLoader(yaml.SafeLoader):
    """SafeLoader with yaml.v3-style implicit typing and duplicate-key checks."""

    def _reject_duplicate_keys(self, node: yaml.MappingNode) -> None:
        # Runs once per node and before PyYAML flattens "<<" merges into it,
        # so keys brought in by a merge are never mistaken for duplicates.
        checked = self.__dict__.setdefault("_checked_mapping_nodes", set())
        if id(node) in checked:
            return
        checked.add(id(node))
        seen: set[tuple[str, str]] = set()
        for key_node, _value_node in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            ident = (key_node.tag, key_node.value)
            if ident in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key_node.value!r} in mapping",
                    key_node.start_mark,
                )
            seen.add(ident)

    def flatten_mapping(self, node):  # noqa: D401 - PyYAML hook
        self._reject_duplicate_keys(node)
        super().flatten_mapping(node)


# Rebuild the implicit resolver table without PyYAML's YAML 1.1 rules for
# booleans, numbers and timestamps, then add yaml.v3-like ones.
_GoLikeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in {_BOOL_TAG, _INT_TAG, _FLOAT_TAG, _TIMESTAMP_TAG}]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_GoLikeLoader.add_implicit_resolver(
    _BOOL_TAG,
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)
_GoLikeLoader.add_implicit_resolver(
    _INT_TAG,
    re.compile(r"^[-+]?(?:0[bB][01_]+|0[oO][0-7_]+|0[xX][0-9a-fA-F_]+|[0-9][0-9_]*)$"),
    list("-+0123456789"),
)
_GoLikeLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^(?:[-+]?(?:\.[0-9_]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)


def _construct_bool(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    text = loader.construct_scalar(node)
    low = text.strip().lower()
    if low == "true":
        return True
    if low == "false":
        return False
    return text


def _parse_go_int(text: str) -> Any:
    """Integer parsing in the spirit of Go's strconv.ParseInt(s, 0, 64)."""
    s = text.replace("_", "")
    sign = 1
    body = s
    if body[:1] in ("+", "-"):
        sign = -1 if body[0] == "-" else 1
        body = body[1:]
    low = body.lower()
    try:
        if low.startswith("0x"):
            return sign * int(body[2:], 16)
        if low.startswith("0o"):
            return sign * int(body[2:], 8)
        if low.startswith("0b"):
            return sign * int(body[2:], 2)
        if len(body) > 1 and body[0] == "0":
            return sign * int(body, 8)
        return sign * int(body, 10)
    except ValueError:
        # yaml.v3 falls back to a float for things like "08"
        try:
            return float(s)
        except ValueError:
            return text


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    return _parse_go_int(loader.construct_scalar(node))


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    text = loader.construct_scalar(node)
    s = text.replace("_", "")
    low = s.lower()
    if low in (".inf", "+.inf"):
        return math.inf
    if low == "-.inf":
        return -math.inf
    if low == ".nan":
        return math.nan
    try:
        return float(s)
    except ValueError:
        return text


_GoLikeLoader.add_constructor(_BOOL_TAG, _construct_bool)
_GoLikeLoader.add_constructor(_INT_TAG, _construct_int)
_GoLikeLoader.add_constructor(_FLOAT_TAG, _construct_float)


class RecursiveAliasError(ValueError):
    """Raised when a YAML document contains a self-referencing alias."""


def parse_yaml(text: str) -> Any:
    """Parse one YAML document. Raises yaml.YAMLError on syntax problems."""
    return yaml.load(text, Loader=_GoLikeLoader)  # noqa: S506 - safe loader subclass


def _key_to_str(key: Any) -> str:
    if isinstance(key, str):
        return key
    if key is None:
        return ""
    return go_str(key)


def materialize(value: Any, _active: frozenset[int] = frozenset()) -> Any:
    """Return a deep, unshared copy with string mapping keys.

    YAML anchors make PyYAML reuse the same Python objects in several places;
    llama-swap sees independent copies, so we do too.
    """
    if isinstance(value, dict):
        if id(value) in _active:
            raise RecursiveAliasError("recursive YAML alias")
        inner = _active | {id(value)}
        return {_key_to_str(k): materialize(v, inner) for k, v in value.items()}
    if isinstance(value, list):
        if id(value) in _active:
            raise RecursiveAliasError("recursive YAML alias")
        inner = _active | {id(value)}
        return [materialize(v, inner) for v in value]
    if isinstance(value, (set, frozenset)):
        return {_key_to_str(k): None for k in value}
    if isinstance(value, tuple):
        return [materialize(v, _active) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    return value


def describe_yaml_error(err: yaml.YAMLError) -> str:
    """One-line description of a PyYAML error, with its line and column."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "invalid YAML"
        if err.context and err.problem:
            problem = f"{problem} ({err.context})"
        if mark is not None:
            return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
        return f"invalid YAML: {problem}"
    return f"invalid YAML: {err}"
