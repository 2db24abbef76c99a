"""API keys, and where CORS preflights are answered, as llama-swap does them.

When ``apiKeys`` is set every route needs one, except the health checks,
CORS preflights and the web UI's static files (which hold no data; the UI
asks for the key and sends it with every API call). A key is accepted from ``Authorization: Bearer``, the Basic
auth password, or ``x-api-key``, and compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from aiohttp import web

from swapd.server.cors import preflight_response
from swapd.server.errors import ClientError
from swapd.server.keys import RUNTIME
from swapd.server.ui import is_ui_path
from swapd.server.webguard import cross_site_refusal, host_refusal

EXEMPT_PATHS = frozenset({"/health", "/wol-health"})


def extract_api_key(request: web.Request) -> tuple[str, str]:
    """The key a client offered, and the header it came in (lower case; "" if none)."""
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and value.strip():
        return value.strip(), "authorization"
    if scheme == "basic" and value.strip():
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            return "", ""
        return decoded.partition(":")[2], "authorization"
    key = request.headers.get("x-api-key", "").strip()
    return key, "x-api-key" if key else ""


def key_matches(provided: str, keys: tuple[str, ...]) -> bool:
    """Constant-time match against every configured key (no early exit)."""
    wanted = provided.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(wanted, key.encode())
    return ok


@web.middleware
async def access_middleware(request: web.Request, handler):
    """CORS preflights (swapd.server.cors) need no key, on any path; everything else needs one if keys are set.

    Before the key, the browser defences of :mod:`swapd.server.webguard`: a
    keyless swapd answers only Host names a DNS rebinding attack cannot use,
    and a cross-site "simple" request to a state-changing route is refused.

    One middleware rather than two: each layer costs a coroutine and a
    wrapper on every request.
    """
    if request.method == "OPTIONS":
        return preflight_response(request)  # swapd.server.cors: security.cors decides its headers
    rt = request.app[RUNTIME]
    if request.path not in EXEMPT_PATHS:
        refusal = host_refusal(request, rt.config, rt.listen_host)
        code = "host_not_allowed"
        if refusal is None:
            refusal, code = cross_site_refusal(request), "cross_site_request"
        if refusal is not None:
            raise ClientError(403, refusal, code)  # rendered and logged by error_middleware
    keys = rt.config.api_keys
    if keys and request.path not in EXEMPT_PATHS and not is_ui_path(request.path):
        provided, header = extract_api_key(request)
        if not key_matches(provided, keys):
            raise ClientError(
                401,
                "unauthorized: invalid or missing API key",
                "invalid_api_key",
                headers=_challenge(request),
            )
        # swapd's own key stops here: the relay leaves every header that carried it out
        # (a client may send it in both; each copy is dropped)
        request["swapd.credential"] = _carriers(request, provided, header)
    return await handler(request)


def _challenge(request: web.Request) -> dict[str, str] | None:
    """llama-swap's Basic challenge, except to a script's fetch from a page.

    A browser answers ``WWW-Authenticate: Basic`` with its own login dialog,
    for a page's ``fetch()`` too; the web UI asks for the key itself, so a
    request that the browser marks as not a navigation (``Sec-Fetch-Mode``:
    cors, same-origin, no-cors) gets the 401 without the challenge. Clients
    that send no ``Sec-Fetch-Mode`` (curl, SDKs) and page loads still get it.
    """
    mode = request.headers.get("Sec-Fetch-Mode")
    if mode is not None and mode != "navigate":
        return None
    return {"WWW-Authenticate": 'Basic realm="swapd"'}


def _carriers(request: web.Request, key: str, header: str) -> frozenset[str]:
    """Every header that carries the matched key: the one it was taken from, and x-api-key if it repeats it."""
    if header != "x-api-key" and request.headers.get("x-api-key", "").strip() == key:
        return frozenset((header, "x-api-key"))
    return frozenset((header,))
