"""Browser attacks on a swapd without keys: DNS rebinding and cross-site posts.

A web page can make a visitor's browser talk to a swapd on their machine or
LAN in two ways, and neither needs a key when ``apiKeys`` is not set:

- **DNS rebinding**: the page's own name (``attacker.example``) is made to
  resolve to swapd's address, so the page is "same-origin" with swapd and can
  read ``/running`` and ``/logs`` and call ``/unload``. Every such request
  carries ``Host: attacker.example``. Without ``apiKeys`` swapd answers only
  Host names that an outside attacker cannot point at it: IP addresses,
  names without a dot (``localhost``, ``gpubox``), ``*.localhost`` and
  ``*.local`` (mDNS), the name given to ``--listen``, and the config's
  ``allowedHosts``. Anything else gets 403. With ``apiKeys`` the keys are the
  defence (the rebound page has no key), so the Host is not checked.
- **Cross-site requests**: a form or ``fetch(..., {mode: "no-cors"})`` may
  send a "simple" request (``text/plain``, a form, or no body) to any
  address without a CORS preflight. swapd refuses such a request on a
  state-changing route (any method but GET/HEAD/OPTIONS, and ``GET /unload``)
  when the browser says it comes from another origin: an ``Origin`` that is
  not the request's own Host, or ``Sec-Fetch-Site: cross-site``/``same-site``.
  Requests with no ``Origin`` (curl, SDKs, servers, multipart uploads from
  scripts) and same-origin ones are unaffected, and so is every request a
  preflight approved: JSON bodies, or a ``Bearer``/``x-api-key`` credential
  (headers a browser only sends after a preflight). This holds with or
  without keys, since a browser may re-send cached Basic credentials.
"""

from __future__ import annotations

import functools
import ipaddress

from aiohttp import web

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
STATE_CHANGING_GETS = frozenset({"/unload"})
# Content types a browser sends cross-origin without a preflight ("" = no body type).
SIMPLE_TYPES = frozenset({"", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})
_LOCAL_SUFFIXES = (".localhost", ".local")
_DEFAULT_PORTS = (":80", ":443")


def split_host(value: str) -> str:
    """The host part of a Host header or netloc, lower-cased, without port, brackets or trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".") if value != "." else value


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=512)  # every request asks, with a handful of distinct hosts
def host_allowed(host: str, allowed: tuple[str, ...], listen_host: str | None = None) -> bool:
    """Whether a keyless swapd answers a request for ``host`` (already split)."""
    if "*" in allowed or not host or "." not in host or _is_ip(host) or host.endswith(_LOCAL_SUFFIXES):
        return True
    if listen_host and host == split_host(listen_host):
        return True
    for entry in allowed:
        if host == entry or (entry.startswith(".") and (host.endswith(entry) or host == entry[1:])):
            return True
    return False


def host_refusal(request: web.Request, config, listen_host: str | None) -> str | None:
    """Why this request's Host is refused, or None when it may proceed."""
    if config.api_keys:
        return None
    raw = request.headers.get("Host")
    if raw is None:
        return None
    host = split_host(raw)
    if host_allowed(host, config.allowed_hosts, listen_host):
        return None
    return (
        f"host {host!r} is not allowed: without apiKeys swapd answers only IP addresses, localhost and "
        "local names, its --listen name and the names in allowedHosts (a defence against DNS rebinding); "
        "add it to allowedHosts or set apiKeys"
    )


def _netloc(value: str) -> str:
    value = value.strip().lower().rstrip("/")
    if value.endswith(_DEFAULT_PORTS):
        value = value.rsplit(":", 1)[0]
    return value


def _foreign_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is not None:
        scheme, sep, netloc = origin.partition("://")
        if not sep or not netloc:  # "null" (sandboxed frames, file: pages) or garbage
            return True
        origin_netloc, host = _netloc(netloc), _netloc(request.headers.get("Host", ""))
        if origin_netloc == host:
            return False
        # A Host without a port from a proxy that dropped it (nginx's $host):
        # the host names must match.
        return not (host and ":" not in host.rpartition("]")[2] and split_host(origin_netloc) == split_host(host))
    return request.headers.get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site")


def _preflighted(request: web.Request) -> bool:
    """Carries a header a browser sends cross-origin only after a CORS preflight."""
    scheme = request.headers.get("Authorization", "").partition(" ")[0].lower()
    return scheme == "bearer" or "x-api-key" in request.headers


def cross_site_refusal(request: web.Request) -> str | None:
    """Why this request looks like a cross-site forgery, or None."""
    if request.method in SAFE_METHODS:
        if request.method != "GET" or request.path not in STATE_CHANGING_GETS:
            return None
        if _foreign_origin(request):
            return (
                f"cross-site GET {request.path} refused: it changes state; "
                "call it from the same origin or without a browser"
            )
        return None
    if not _foreign_origin(request) or _preflighted(request):
        return None
    ctype = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if ctype not in SIMPLE_TYPES:
        return None
    return (
        f"cross-site {request.method} with content type {ctype or '(none)'!r} refused: a web page on "
        f"{request.headers.get('Origin') or 'another site'} cannot change swapd's state without a CORS preflight; "
        "send JSON or an API key header"
    )


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def unprotected_listen(host: str | None, config) -> bool:
    """Serving beyond this machine with no apiKeys (worth a loud warning at startup)."""
    if config.api_keys:
        return False
    if host is None:
        return True
    name = split_host(host)
    if name in LOOPBACK_HOSTS:
        return False
    return not (_is_ip(name) and ipaddress.ip_address(name).is_loopback)
