"""Real headless Chromium for the UI tests: Debian's browser, driven by Playwright.

``browser`` launches the system Chromium once per module (skipping with the
reason when it or Playwright is missing); ``open_page`` gives a fresh context
whose requests are recorded, and checks at teardown that the page called only
swapd's public API and logged no script errors.
"""

from __future__ import annotations

import os
import re
import shutil
from urllib.parse import urlsplit

import pytest

CHROMIUM_ARGS = [
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # no calls home: this machine's network is closed
    "--disable-component-update",
    "--disable-sync",
]
# The routes the UI may call, as the issue names them (plus /api/version for the header).
PUBLIC_API = re.compile(
    r"^/(|ui/.*|api/events|running|api/gpus|api/version|api/metrics/(activity|stats)|logs/stream(/.+)?|v1/models"
    r"|v1/chat/completions|upstream/.+|api/models/unload(/.+)?|api/inflight/[^/]+/cancel)$"
)


def chromium_path() -> str | None:
    return os.environ.get("SWAPD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; scripts/test.sh does it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[test]')")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class Page:
    """A fresh browser context and page, with its requests and errors recorded."""

    def __init__(self, browser, base: str, **context):
        self.base = base
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.page.set_default_timeout(15000)
        self.requests: list[tuple[str, str, dict]] = []
        self.responses: list[tuple[str, int, bytes | None]] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append((r.method, r.url, r.headers)))
        self.page.on("response", self._response)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)

    def _response(self, response):
        body = None
        if not response.headers.get("content-type", "").startswith(("text/event-stream", "text/plain")):
            try:
                body = response.body()
            except Exception:  # a stream still open, or a redirect
                body = None
        self.responses.append((response.url, response.status, body))

    def paths(self) -> list[str]:
        return [urlsplit(url).path for _, url, _ in self.requests]

    def check_public_only(self, prefix: str = ""):
        for path in self.paths():
            if path.endswith("favicon.ico"):
                continue
            assert path.startswith(prefix), path
            assert PUBLIC_API.match(path[len(prefix):]), f"the UI called a non-public route: {path}"

    def close(self):
        self.context.close()


@pytest.fixture
def open_page(browser):
    pages: list[Page] = []

    def start(base: str, **context) -> Page:
        p = Page(browser, base, **context)
        pages.append(p)
        return p

    yield start
    for p in pages:
        try:
            p.check_public_only(urlsplit(p.base).path.rstrip("/"))
            assert not [e for e in p.errors if "401" not in e], p.errors  # a 401 is logged by the browser itself
        finally:
            p.close()


