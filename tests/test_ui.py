"""The web UI's files as HTTP serves them: redirects, caching, compression, CSP, keys.

What the UI does in a browser is in tests/test_ui_browser.py; these tests hold
the server side to its promises with plain requests against a real swapd.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re

from helpers import model

from swapd.server.ui import UI_DIR, load_assets

KEY = "sk-ui-test-key"


def test_root_and_ui_redirect_relatively(swapd):
    s = swapd({"a": model()})
    for path in ("/", "/ui", "/?x=1"):
        r = s.get(path)
        assert r.status == 302, (path, r.status)
        # relative, so a proxy's sub-path survives: /swapd/ -> /swapd/ui/
        assert r.headers["location"].startswith("ui/"), r.headers
    assert s.get("/?x=1").headers["location"] == "ui/?x=1"


def test_index_and_every_file_it_loads_are_served(swapd):
    s = swapd({"a": model()})
    r = s.get("/ui/")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/html")
    page = r.body.decode()
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    imports = json.loads(re.search(r'<script type="importmap">(.*?)</script>', page, re.S).group(1))["imports"]
    refs += list(imports.values())
    assert "app.js" in refs and "style.css" in refs
    for ref in refs:
        assert not ref.startswith("/") and "://" not in ref, f"{ref}: every URL in the page must be relative"
        got = s.get("/ui/" + ref.removeprefix("./"))
        assert got.status == 200, ref
    # the vendored modules are JavaScript to a browser (a module with another type is refused)
    for name in imports.values():
        assert s.get("/ui/" + name.removeprefix("./")).headers["content-type"].startswith("text/javascript")


def test_api_urls_in_the_app_are_relative():
    source = (UI_DIR / "app.js").read_text()
    # every fetch goes through url(), which resolves against swapd's root, never the host's
    assert 'fetch("/' not in source and "fetch('/" not in source and "fetch(`/" not in source
    for path in re.findall(r'(?:api|getJSON)\(\s*[`"]([^`"]+)', source):
        assert not path.startswith("/"), path


def test_etag_revalidation_and_gzip(swapd):
    s = swapd({"a": model()})
    plain = s.get("/ui/app.js")
    assert plain.status == 200 and plain.headers["cache-control"] == "no-cache"
    etag = plain.headers["etag"]
    assert s.get("/ui/app.js", headers={"If-None-Match": etag}).status == 304
    assert s.get("/ui/app.js", headers={"If-None-Match": '"other"'}).status == 200
    packed = s.get("/ui/app.js", headers={"Accept-Encoding": "gzip, br"})
    assert packed.headers["content-encoding"] == "gzip"
    assert gzip.decompress(packed.body) == plain.body
    assert len(packed.body) < len(plain.body) / 2
    refused = s.get("/ui/app.js", headers={"Accept-Encoding": "gzip;q=0"})
    assert "content-encoding" not in refused.headers and refused.body == plain.body


def test_first_load_fits_the_budget():
    """Everything the page loads, as sent to a browser that accepts gzip, is under 300 kB."""
    assets = load_assets()
    page = assets["index.html"].body.decode()
    names = ["index.html", "app.js", "style.css", "icon.svg"]
    names += [v.removeprefix("./") for v in json.loads(
        re.search(r'<script type="importmap">(.*?)</script>', page, re.S).group(1))["imports"].values()]
    sent = sum(len(assets[n].gzipped or assets[n].body) for n in names)
    raw = sum(len(assets[n].body) for n in names)
    assert raw < 300_000, raw  # even uncompressed
    assert sent < 100_000, sent


def test_csp_allows_exactly_the_inline_import_map(swapd):
    s = swapd({"a": model()})
    r = s.get("/ui/")
    csp = r.headers["content-security-policy"]
    inline = re.search(rb'<script type="importmap">(.*?)</script>', r.body, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(inline).digest()).decode()
    assert f"script-src 'self' 'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"


def test_unknown_files_are_404_and_paths_cannot_escape(swapd):
    s = swapd({"a": model()})
    for path in ("/ui/nope.js", "/ui/../swapd/cli.py", "/ui/%2e%2e/%2e%2e/etc/passwd", "/ui/vendor/../../server/ui.py",
                 "/ui/vendor/README.md"):
        r = s.get(path)
        assert r.status == 404, (path, r.status)
        assert r.json()["error"]["code"] == "not_found"
    # a client-side route gets the app itself
    r = s.get("/ui/models")
    assert r.status == 200 and b'<div id="app">' in r.body


def test_with_api_keys_the_files_load_and_no_data_does(swapd):
    s = swapd({"secret-model-name": model()}, apiKeys=[KEY])
    for path in ("/", "/ui", "/ui/", "/ui/app.js", "/ui/vendor/preact.mjs", "/ui/style.css"):
        r = s.get(path)
        assert r.status in (200, 302), (path, r.status)
        assert b"secret-model-name" not in r.body
    for path in ("/v1/models", "/running", "/api/gpus", "/api/events", "/logs/stream", "/api/metrics/activity",
                 "/upstream/secret-model-name/health"):
        r = s.get(path)
        assert r.status == 401, path
        assert b"secret-model-name" not in r.body
    assert s.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status == 200


def test_a_page_fetch_gets_no_basic_challenge(swapd):
    """A browser answers WWW-Authenticate: Basic with its own login dialog, over the UI's key prompt."""
    s = swapd({"a": model()}, apiKeys=[KEY])
    assert s.get("/v1/models").headers["www-authenticate"] == 'Basic realm="swapd"'  # curl, SDKs: as llama-swap
    nav = s.get("/v1/models", headers={"Sec-Fetch-Mode": "navigate"})
    assert nav.headers["www-authenticate"] == 'Basic realm="swapd"'  # a page load: the browser may ask
    for mode in ("cors", "same-origin", "no-cors"):
        r = s.get("/running", headers={"Sec-Fetch-Mode": mode, "Authorization": "Bearer wrong"})
        assert r.status == 401
        assert "www-authenticate" not in r.headers, mode
        assert r.json()["error"]["code"] == "invalid_api_key"


def test_the_wheel_ships_the_ui(tmp_path):
    """An installed swapd (not this checkout) has every file the page loads, and the licences."""
    import subprocess
    import sys
    import zipfile

    from helpers import ROOT

    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check", str(ROOT),
         "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("swapd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in load_assets():
        assert f"swapd/ui/{name}" in names, name
    assert {"swapd/ui/vendor/LICENSE-preact.txt", "swapd/ui/vendor/LICENSE-htm.txt"} <= names
