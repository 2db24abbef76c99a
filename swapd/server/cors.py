"""CORS on every response, from one place, as llama-swap does it (``security.cors``).

A request that carries an ``Origin`` gets ``Access-Control-Allow-Origin``
exactly once, on whatever answers it: a JSON route, an error (401, 403, 404,
a failed start), a stream, a proxied backend answer, ``/metrics``, the UI's
files, a websocket's 101. A request without ``Origin`` (curl, SDKs, LiteLLM)
gets no CORS header at all.

How exactly once holds:

- swapd writes the headers in aiohttp's ``on_response_prepare`` signal, which
  runs for every response a handler or middleware produces, after its
  headers are final and before they are written, streams included. It
  *sets* the header, so nothing earlier can leave a second copy;
- a backend's own CORS headers never reach the client: the relay drops them
  from every proxied answer (``RESPONSE_HEADERS``, whether or not the request
  had an ``Origin``). llama-server echoes ``Origin`` even when it is empty,
  and a client that folds the two copies sees ``*, ``, which strict clients
  (LiteLLM through h11) reject outright (llama-swap #85, #1121, #1133). swapd's
  policy wins, as llama-swap's does (``StripUpstreamCORSHeaders``).

The policy is llama-swap's (internal/server/cors.go):

- the default (no ``allowedOrigins``): any origin, answered with ``*``;
- listed origins match case-insensitively and the configured spelling is
  sent back; ``*`` in the list allows any; an origin not listed (``null``
  included) gets no CORS headers, and the request is otherwise served as
  usual, so the browser withholds the answer from the page;
- ``Vary: Origin`` goes with every allowed answer (a request without
  ``Origin`` is answered differently); ``Access-Control-Allow-Credentials:
  true`` with ``allowCredentials`` (never together with ``*``: the config
  refuses it); ``Access-Control-Expose-Headers`` when ``exposedHeaders`` is
  set, never empty;
- every ``OPTIONS`` is a preflight, answered 204 before the API key check
  (browsers send no credentials on a preflight): allowed methods, allowed
  headers (the configured list, or else the request's
  ``Access-Control-Request-Headers`` with the names that are not HTTP tokens
  dropped, plus ``Vary: Access-Control-Request-Headers``, or else
  llama-swap's four defaults), ``Access-Control-Max-Age``, and
  ``Access-Control-Allow-Private-Network: true`` when ``allowPrivateNetwork``
  is set and the preflight asked for it. A preflight from a disallowed or
  absent origin gets the 204 without them.
"""

from __future__ import annotations

import re

from aiohttp import web
from multidict import CIMultiDict, istr

from swapd.config import CorsSettings
from swapd.config._model import CORS_DEFAULT_HEADERS
from swapd.server.keys import RUNTIME

ALLOW_ORIGIN = istr("Access-Control-Allow-Origin")
_VARY = istr("Vary")
_CREDENTIALS = istr("Access-Control-Allow-Credentials")
_EXPOSE = istr("Access-Control-Expose-Headers")

# Every header a CORS policy sends: a backend's copies are dropped from proxied answers (lower case).
RESPONSE_HEADERS = frozenset(
    (
        "access-control-allow-origin",
        "access-control-allow-methods",
        "access-control-allow-headers",
        "access-control-allow-credentials",
        "access-control-expose-headers",
        "access-control-max-age",
        "access-control-allow-private-network",
    )
)

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_DEFAULT_ALLOWED_HEADERS = ", ".join(CORS_DEFAULT_HEADERS)


class CorsPolicy:
    """``security.cors`` resolved once: per request, a dict lookup and a few header writes."""

    __slots__ = (
        "settings",
        "any_origin",
        "origins",
        "credentials",
        "exposed",
        "methods",
        "allowed_headers",
        "max_age",
        "private_network",
    )

    def __init__(self, settings: CorsSettings) -> None:
        self.settings = settings
        self.any_origin = "*" in settings.allowed_origins
        # lower-cased origin -> the spelling the config gave, which is what goes back
        self.origins = {o.lower(): o for o in settings.allowed_origins if o != "*"}
        self.credentials = settings.allow_credentials
        self.exposed = ", ".join(settings.exposed_headers)
        self.methods = ", ".join(settings.allowed_methods)
        self.allowed_headers = ", ".join(settings.allowed_headers)
        self.max_age = str(settings.max_age)
        self.private_network = settings.allow_private_network

    def allow_origin(self, origin: str) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for ``origin``, or None when it is not allowed."""
        if not origin:
            return None
        if self.any_origin:
            return "*"  # the config refuses "*" with credentials, so this is always safe to send
        return self.origins.get(origin.lower())

    def apply(self, origin: str, headers: CIMultiDict[str]) -> None:
        """Add the headers every answer to an allowed ``origin`` carries (preflight or not)."""
        allowed = self.allow_origin(origin)
        if allowed is None:
            return
        headers[ALLOW_ORIGIN] = allowed  # replaces any copy: exactly one
        add_vary(headers, "Origin")
        if self.credentials:
            headers[_CREDENTIALS] = "true"
        if self.exposed:
            headers[_EXPOSE] = self.exposed


_cached: tuple[CorsSettings | None, CorsPolicy | None] = (None, None)


def policy_for(settings: CorsSettings) -> CorsPolicy:
    """The policy for the running config's settings (rebuilt only when a reload changed them)."""
    global _cached
    cached_settings, cached = _cached
    if cached is None or cached_settings is not settings:
        cached = CorsPolicy(settings)
        _cached = (settings, cached)
    return cached


def add_vary(headers: CIMultiDict[str], token: str) -> None:
    """Name ``token`` in ``Vary`` once, on one line, keeping what is there (a backend's ``Vary`` too)."""
    existing = headers.getall(_VARY, ())
    if not existing:
        headers[_VARY] = token
        return
    wanted = token.lower()
    for value in existing:
        for part in value.split(","):
            part = part.strip().lower()
            if part == wanted or part == "*":
                return
    headers[_VARY] = ", ".join((*existing, token))


def allowed_request_headers(requested: str) -> str:
    """The preflight's requested header names that are HTTP tokens, so the echo is a valid header value."""
    valid = []
    for part in requested.split(","):
        name = part.strip()
        if name and _TOKEN.match(name):
            valid.append(name)
    return ", ".join(valid)


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp's signal, for every response: the CORS headers of a request that has an ``Origin``."""
    origin = request.headers.get("Origin")
    if origin:
        policy_for(request.app[RUNTIME].config.cors).apply(origin, response.headers)


def preflight_response(request: web.Request) -> web.Response:
    """The 204 for an ``OPTIONS`` request; the shared headers are added when it is prepared."""
    response = web.Response(status=204)
    origin = request.headers.get("Origin")
    if not origin:
        return response
    policy = policy_for(request.app[RUNTIME].config.cors)
    if policy.allow_origin(origin) is None:
        return response
    headers = response.headers
    headers["Access-Control-Allow-Methods"] = policy.methods
    if policy.allowed_headers:
        headers["Access-Control-Allow-Headers"] = policy.allowed_headers
    else:
        echoed = allowed_request_headers(request.headers.get("Access-Control-Request-Headers", ""))
        if echoed:
            headers["Access-Control-Allow-Headers"] = echoed
            add_vary(headers, "Access-Control-Request-Headers")  # the answer depends on what was asked
        else:
            headers["Access-Control-Allow-Headers"] = _DEFAULT_ALLOWED_HEADERS
    headers["Access-Control-Max-Age"] = policy.max_age
    if policy.private_network and request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
        headers["Access-Control-Allow-Private-Network"] = "true"
    return response


def install(app: web.Application) -> None:
    """Every response of ``app`` goes through the policy."""
    app.on_response_prepare.append(on_response_prepare)
