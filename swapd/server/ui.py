"""The web UI at ``/ui/``: static files shipped inside the package, served from memory.

The UI is plain ES modules (Preact and htm, vendored under ``swapd/ui/vendor``)
with no build step. It talks to swapd only through the public API, with
relative URLs, so it also works behind a proxy at a sub-path.

The files hold no data: every model name, log line and number reaches the
browser through an API route, behind ``apiKeys`` when they are set. So the
static files themselves are served without a key (the key prompt must load),
which :mod:`swapd.server.auth` allows through :func:`is_ui_path`.

Every file is read once at start-up, given a strong ETag and, when it is
worth it, a gzip copy; a request costs a dict lookup and never touches the
disk or the relay path.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from swapd.server.dialects import on_ollama_listener
from swapd.server.errors import ClientError

UI_DIR = Path(__file__).resolve().parent.parent / "ui"

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}
_CLIENT_ROUTE = re.compile(r"[a-z][a-z-]*/?")
_IMPORT_MAP = re.compile(rb'<script type="importmap">(.*?)</script>', re.S)


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    gzipped: bytes | None
    content_type: str
    etag: str


def load_assets(root: Path = UI_DIR) -> dict[str, Asset]:
    """Every servable file under ``root``, keyed by its path relative to it (``index.html``, ``vendor/...``)."""
    assets: dict[str, Asset] = {}
    if not root.is_dir():
        return assets
    for path in sorted(root.rglob("*")):
        content_type = _TYPES.get(path.suffix)
        if not path.is_file() or content_type is None:
            continue
        body = path.read_bytes()
        packed = gzip.compress(body, 9, mtime=0) if len(body) > 1024 else None
        if packed is not None and len(packed) >= len(body):
            packed = None
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        assets[path.relative_to(root).as_posix()] = Asset(body, packed, content_type, etag)
    return assets


def content_security_policy(index: bytes | None) -> str:
    """Scripts from swapd only, plus the index page's inline import map by its hash."""
    script = "'self'"
    match = _IMPORT_MAP.search(index or b"")
    if match:
        digest = base64.b64encode(hashlib.sha256(match.group(1)).digest()).decode()
        script += f" 'sha256-{digest}'"
    return (
        f"default-src 'none'; script-src {script}; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def is_ui_path(path: str) -> bool:
    """The paths that carry no data and need no key: ``/`` (a redirect), ``/ui``, the files under ``/ui/``, the icon."""
    return path == "/" or path == "/ui" or path.startswith("/ui/") or path == "/favicon.ico"


UI_ASSETS: web.AppKey[dict[str, Asset]] = web.AppKey("swapd.ui_assets", dict)
UI_HEADERS: web.AppKey[dict[str, str]] = web.AppKey("swapd.ui_headers", dict)


def install(app: web.Application, root: Path = UI_DIR) -> None:
    assets = load_assets(root)
    app[UI_ASSETS] = assets
    index = assets.get("index.html")
    app[UI_HEADERS] = {
        "Content-Security-Policy": content_security_policy(index.body if index else None),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        # Revalidate every time (a 304 is cheap): an upgraded swapd never runs yesterday's app.js.
        "Cache-Control": "no-cache",
    }
    app.router.add_get("/", handle_redirect)
    app.router.add_get("/ui", handle_redirect)
    app.router.add_get("/ui/{path:.*}", handle_asset)
    app.router.add_get("/favicon.ico", handle_favicon)


async def handle_redirect(request: web.Request) -> web.Response:
    if request.path == "/" and on_ollama_listener(request):
        return web.Response(text="Ollama is running")  # what Ollama's clients probe its root for
    # Relative, so a proxy that serves swapd at a sub-path (/swapd/) keeps it: "/swapd/" -> "/swapd/ui/".
    # From "/ui" it resolves to "/ui/" as well.
    location = "ui/"
    if request.query_string:
        location += "?" + request.query_string
    raise web.HTTPFound(location)


async def handle_favicon(request: web.Request) -> web.StreamResponse:
    """``/favicon.ico``: the UI's icon, as llama-swap serves its UI build's (browsers ask for it at the root)."""
    return await handle_asset(request, "favicon.ico")


async def handle_asset(request: web.Request, name: str = "") -> web.StreamResponse:
    assets = request.app[UI_ASSETS]
    name = name or request.match_info["path"] or "index.html"
    asset = assets.get(name)
    if asset is None and _CLIENT_ROUTE.fullmatch(name):
        asset = assets.get("index.html")  # a client-side route (/ui/models, as llama-swap's UI has) gets the app
    if asset is None:
        if not assets:
            raise ClientError(404, "the web UI is not installed in this copy of swapd", "not_found")
        raise ClientError(404, f"no such file in the web UI: {name}", "not_found")
    headers = {**request.app[UI_HEADERS], "ETag": asset.etag, "Vary": "Accept-Encoding"}
    if asset.etag in _etags(request.headers.get("If-None-Match", "")):
        return web.Response(status=304, headers=headers)
    body = asset.body
    if asset.gzipped is not None and _accepts_gzip(request.headers.get("Accept-Encoding", "")):
        body = asset.gzipped
        headers["Content-Encoding"] = "gzip"
    headers["Content-Type"] = asset.content_type
    return web.Response(body=body, headers=headers)


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


def _accepts_gzip(header: str) -> bool:
    for part in header.split(","):
        coding, _, params = part.partition(";")
        if coding.strip().lower() == "gzip":
            q = params.strip()
            return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
    return False
