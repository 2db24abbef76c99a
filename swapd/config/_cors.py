"""llama-swap's ``security.cors`` block: which browser origins may read swapd's answers.

Two modes, as in llama-swap (internal/config/security.go):

- no ``allowedOrigins`` (no block, an empty block, or the key left null):
  the permissive policy llama-swap always had, any origin answered with
  ``*``. Setting only the other keys is refused, since falling back to "any
  origin" would widen what a half-written block plainly meant to narrow;
- ``allowedOrigins`` listed: only those origins (``*`` among them allows
  any, and cannot be combined with ``allowCredentials`` or
  ``allowPrivateNetwork``). An empty list is refused rather than read as
  "all". The preflight keys keep their defaults when left out.

Every error names its key (``security.cors.allowedOrigins[1]`` ...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ._keys import KNOWN_CORS_KEYS, KNOWN_SECURITY_KEYS
from ._model import CORS_DEFAULT_MAX_AGE, CORS_DEFAULT_METHODS, CorsSettings
from ._reader import _Context, _describe, open_block

WILDCARD = "*"
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token: method and header names


def is_token(text: str) -> bool:
    return bool(_TOKEN.match(text))


def parse_cors(ctx: _Context, document: Mapping[str, Any]) -> CorsSettings:
    """The ``security.cors`` settings; a bad value fails naming its key."""
    security = open_block(ctx, document.get("security"), "security", KNOWN_SECURITY_KEYS)
    cors = open_block(ctx, security.mapping.get("cors"), "security.cors", KNOWN_CORS_KEYS)
    credentials = cors.bool("allowCredentials", False)
    private_network = cors.bool("allowPrivateNetwork", False)
    methods = _tokens(ctx, cors.str_list("allowedMethods"), "security.cors.allowedMethods", "HTTP method")
    headers = _tokens(ctx, cors.str_list("allowedHeaders"), "security.cors.allowedHeaders", "HTTP header name")
    exposed = _tokens(ctx, cors.str_list("exposedHeaders"), "security.cors.exposedHeaders", "HTTP header name")
    max_age = cors.int("maxAge", 0, seconds=True)
    if max_age < 0:
        cors.fail("maxAge", f"must be >= 0 seconds, got {max_age}")

    key = "security.cors.allowedOrigins"
    raw_origins = cors.mapping.get("allowedOrigins")
    if raw_origins is None:
        if credentials or private_network or methods or headers or exposed or max_age:
            ctx.fail(
                'is required when any other security.cors key is set (list the origins, or "*" for any); '
                "remove the security.cors block to keep the permissive default",
                None,
                key,
            )
        return CorsSettings()
    origins = cors.str_list("allowedOrigins")
    if not origins:
        ctx.fail(
            'must list at least one origin, or "*" to allow any; remove the key to keep the permissive default',
            None,
            key,
        )
    for index, origin in enumerate(origins):
        if origin == WILDCARD:
            if credentials:
                ctx.fail('may not contain "*" when allowCredentials is true; list the origins explicitly', None, key)
            if private_network:
                ctx.fail('may not contain "*" when allowPrivateNetwork is true; list the origins explicitly', None, key)
            continue
        problem = origin_problem(origin)
        if problem:
            ctx.fail(problem, None, f"{key}[{index}]")
    return CorsSettings(
        allowed_origins=tuple(origins),
        allow_credentials=credentials,
        allow_private_network=private_network,
        allowed_methods=methods or CORS_DEFAULT_METHODS,
        allowed_headers=headers,
        exposed_headers=exposed,
        max_age=max_age or CORS_DEFAULT_MAX_AGE,
    )


def origin_problem(origin: str) -> str | None:
    """Why ``origin`` can never equal a browser's ``Origin`` header (``scheme://host[:port]``), or None."""
    if origin == "":
        return "an origin must not be empty"
    if origin != origin.strip():
        return f"{origin!r} must not have leading or trailing whitespace"
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError as err:
        return f"{origin!r} is not a valid origin: {err}"
    if not parts.scheme or not parts.netloc or not parts.hostname:
        return f"{origin!r} must be a scheme://host[:port] origin, e.g. https://dashboard.example.com"
    if parts.path or parts.query or parts.fragment or "#" in origin or "?" in origin or "@" in parts.netloc:
        return f"{origin!r} must not include a path, query, fragment or userinfo (a browser sends none)"
    return None


def _tokens(ctx: _Context, values: list[str], key: str, what: str) -> tuple[str, ...]:
    for index, value in enumerate(values):
        if not is_token(value):
            ctx.fail(f"{_describe(value)} is not a valid {what}", None, f"{key}[{index}]")
    return tuple(values)
