"""The web UI in a real headless Chromium (Debian's), driven by Playwright, against a real swapd.

Every test opens the page as a user would, clicks what a user would click,
and checks what the page shows against what swapd and the backend processes
really did. Each page's requests are recorded: the UI may call only swapd's
public API (``PUBLIC_API``) and its own files.

``scripts/test.sh`` installs ``chromium``; without it (or Playwright) these
tests skip with the reason.
"""

from __future__ import annotations

import json
import re
import time
from urllib.parse import urlsplit

import psutil
import pytest
from helpers import model, wait_until
from nvml_stub import stub_dir_for, stub_env

KEY = "sk-browser-test"


def _text(locator) -> str:
    """What a user reads in an element, with layout's line breaks folded to spaces."""
    return " ".join(locator.inner_text().split())


def _row(page, model_id: str) -> str:
    return f"tr[data-model='{model_id}']"


def test_models_appear_with_their_names_and_state(swapd, open_page):
    s = swapd(
        {
            "alpha": model(name="Alpha model", description="the first one", aliases=["a1"]),
            "beta": model(description="the second one"),
            "hidden": model(unlisted=True),
        }
    )
    p = open_page(s.base)
    p.page.goto(s.base + "/")
    assert urlsplit(p.page.url).path == "/ui/"
    p.page.wait_for_selector(_row(p.page, "alpha"))
    rows = p.page.locator("tbody tr[data-model]")
    assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.model)")) == ["alpha", "beta"]
    alpha = p.page.locator(_row(p.page, "alpha"))
    text = alpha.inner_text()
    assert "Alpha model" in text and "the first one" in text and "a1" in text
    assert alpha.get_attribute("data-state") == "stopped"
    assert alpha.locator("[data-testid=load]").is_enabled()


def test_load_makes_a_model_ready_and_unload_stops_its_process(swapd, open_page):
    s = swapd({"alpha": model("--load-delay", "1"), "beta": model()}, globalTTL=120)
    p = open_page(s.base)
    p.page.goto(s.base + "/ui/")
    row = p.page.locator(_row(p.page, "alpha"))
    row.locator("[data-testid=load]").click()
    # the state changes arrive live over /api/events: starting, then ready, with no reload
    p.page.wait_for_selector(_row(p.page, "alpha") + "[data-state=starting]")
    p.page.wait_for_selector(_row(p.page, "alpha") + "[data-state=ready]")
    running = s.running()
    assert running["alpha"]["state"] == "ready"
    pid = running["alpha"]["pid"]
    assert psutil.pid_exists(pid)
    # the TTL counts down in the page
    ttl = row.locator("[data-testid=ttl]")
    wait_until(lambda: re.fullmatch(r"1m \d\ds|\d+\.\d s", ttl.inner_text()), timeout=10, message="a TTL countdown")
    first = ttl.inner_text()
    wait_until(lambda: ttl.inner_text() != first, timeout=5, message="the countdown to move")
    assert p.page.locator(_row(p.page, "beta")).get_attribute("data-state") == "stopped"

    row.locator("[data-testid=unload]").click()
    p.page.wait_for_selector(_row(p.page, "alpha") + "[data-state=stopped]")
    assert "alpha" not in s.running()
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
               timeout=10, message="the backend process to exit")
    methods = [(m, urlsplit(u).path) for m, u, _ in p.requests]
    assert ("GET", "/upstream/alpha/health") in methods and ("POST", "/api/models/unload/alpha") in methods


def test_playground_streams_the_reply_token_by_token(swapd, open_page):
    s = swapd({"chat": model("--chunks", "16", "--interval", "0.12")})
    p = open_page(s.base)
    p.page.goto(s.base + "/ui/#/playground")
    p.page.wait_for_function("() => document.querySelector('[data-testid=pg-model]')?.value === 'chat'")
    # record the reply's text each time the page changes it
    p.page.evaluate(
        """() => {
        window.__seen = [];
        new MutationObserver(() => {
          const el = document.querySelector('[data-testid=pg-reply]');
          if (el) window.__seen.push([performance.now(), el.textContent.replace('▍', '')]);
        }).observe(document.querySelector('[data-testid=pg-chat]'),
                   {subtree: true, childList: true, characterData: true});
      }"""
    )
    p.page.fill("[data-testid=pg-input]", "Say something.")
    p.page.click("[data-testid=pg-send]")
    p.page.wait_for_selector("[data-testid=pg-stats]", timeout=30000)
    final = p.page.locator("[data-testid=pg-assistant] .text").inner_text()
    assert final.split() == [f"tok{i}" for i in range(16)]
    seen = p.page.evaluate("window.__seen")
    partial = {text for _, text in seen if text and text != final}
    assert len(partial) >= 8, f"the reply did not grow piece by piece: {sorted(partial, key=len)}"
    lengths = [len(text) for _, text in seen if text]
    assert lengths == sorted(lengths)  # only ever appended to
    spread = seen[-1][0] - next(t for t, text in seen if text)
    assert spread > 1000, f"all pieces arrived within {spread:.0f} ms"
    stats = p.page.locator("[data-testid=pg-stats]").inner_text()
    assert re.search(r"first token \d+ ms · [\d.]+ tokens/s · 16 tokens", stats), stats
    assert p.page.locator("[data-testid=pg-user]").inner_text().endswith("Say something.")


def test_activity_fills_in_live_after_a_request(swapd, open_page):
    s = swapd({"alpha": model("--chunks", "5"), "beta": model()})
    p = open_page(s.base)
    p.page.goto(s.base + "/ui/#/activity")
    p.page.wait_for_selector("text=No requests yet.")
    status, _, events = s.stream("alpha", x_timings=True)  # a cold start, from outside the page
    assert status == 200 and events[-1][1] == "[DONE]"
    assert s.chat("beta").status == 200
    p.page.wait_for_selector("[data-testid=activity-row][data-model=alpha]")
    p.page.wait_for_selector("[data-testid=activity-row][data-model=beta]")
    row = p.page.locator("[data-testid=activity-row][data-model=alpha]").inner_text()
    cells = row.split("\t")
    assert "/v1/chat/completions" in cells and "200" in cells
    assert any(c.startswith("cold start ") for c in cells), cells
    assert "25.0" in cells  # the fake backend's llama-server timings: 25 generated tokens/s
    # the charts draw what the rows say: one speed point, one cold start per model
    assert p.page.locator("figure.chart circle.pt").count() == 1
    assert p.page.locator("figure.chart rect.binbar").count() >= 1
    # the filter shows one model's rows only
    p.page.select_option("[data-testid=activity-model]", "beta")
    wait_until(lambda: p.page.locator("[data-testid=activity-row]").count() == 1, timeout=10, message="filter")
    assert p.page.locator("[data-testid=activity-row]").get_attribute("data-model") == "beta"
    assert any("model=beta" in u for _, u, _ in p.requests)


def test_logs_are_live_and_pause_holds_them(swapd, open_page):
    s = swapd({"alpha": model("--log-lines", "2")})
    p = open_page(s.base)
    p.page.goto(s.base + "/ui/#/logs")
    log = p.page.locator("[data-testid=log-text]")
    wait_until(lambda: "swapd.listening" in log.inner_text(), timeout=10, message="swapd's own log lines")
    assert s.chat("alpha").status == 200
    wait_until(lambda: "backend.ready" in log.inner_text(), timeout=10, message="a line that came after the page")
    requests = lambda: log.inner_text().count('"event": "request"')  # noqa: E731
    wait_until(lambda: requests() == 1, timeout=10, message="the request's line")

    p.page.click("[data-testid=log-pause]")
    assert s.chat("alpha").status == 200
    wait_until(lambda: "new lines held" in p.page.inner_text("[data-testid=log-pause]"), timeout=10,
               message="the pause button to say lines are held")
    assert requests() == 1
    p.page.click("[data-testid=log-pause]")
    wait_until(lambda: requests() == 2, timeout=10, message="held lines to show on resume")
    assert s.chat("alpha").status == 200  # and live again
    wait_until(lambda: requests() == 3, timeout=10, message="a live line after resuming")

    # one model's own output
    p.page.select_option("[data-testid=log-source]", "alpha")
    wait_until(lambda: "fake_backend: log line 1" in log.inner_text(), timeout=10, message="the model's output")
    assert "swapd.listening" not in log.inner_text()


@pytest.fixture(scope="module")
def stub_lib(request, tmp_path_factory):
    return stub_dir_for(request, tmp_path_factory)


def test_gpus_show_memory_by_model_and_verified_stops(swapd, open_page, stub_lib, tmp_path):
    state = tmp_path / "nvml"
    state.mkdir()
    (state / "sensors").write_text("63 40 10")
    (state / "power").write_text("210 300")
    s = swapd({"alpha": model("--vram-mib", "3000"), "beta": model("--vram-mib", "500")}, env=stub_env(stub_lib, state))
    assert s.chat("alpha").status == 200
    p = open_page(s.base)
    p.page.goto(s.base + "/ui/#/gpus")
    card = p.page.locator("[data-testid=gpu]")
    wait_until(lambda: "alpha 2.9 GiB" in _text(card), timeout=10, message="alpha's memory in the bar legend")
    text = _text(card)
    assert "Stub GPU 0" in text and "63 °C" in text and "210 W / 300 W" in text and "40 %" in text
    assert card.locator(".bar .seg").count() >= 2  # alpha, and the driver's own share
    assert "No model has been stopped yet." in p.page.inner_text("main")

    # a swap stops alpha for beta; the verified stop appears in the history without a reload
    assert s.chat("beta").status == 200
    stop = p.page.locator("[data-testid=stop][data-outcome=freed]")
    stop.wait_for()
    row = _text(stop)
    assert "alpha" in row and "vram.freed" in row and "2.9 GiB" in row
    wait_until(lambda: "beta 500 MiB" in _text(card), timeout=10, message="beta in the bar")


def test_with_api_keys_nothing_shows_before_the_key(swapd, open_page):
    s = swapd({"secret-alpha": model(name="Secret Alpha")}, apiKeys=[KEY])
    p = open_page(s.base)
    p.page.goto(s.base + "/")
    p.page.wait_for_selector("[data-testid=key-form]")
    time.sleep(0.5)  # let any stray request go out
    html = p.page.content()
    assert "secret-alpha" not in html and "Secret Alpha" not in html
    for url, status, body in p.responses:
        path = urlsplit(url).path
        if not path.startswith("/ui/") and path != "/":
            assert status == 401, (url, status)
        assert b"secret-alpha" not in (body or b""), url
    assert p.page.locator("nav").count() == 0  # no tabs, no views: the prompt only

    p.page.fill("#key", "wrong-key")
    p.page.click("button[type=submit]")
    assert "not accepted" in p.page.locator("[data-testid=key-error]").inner_text()
    assert "secret-alpha" not in p.page.content()

    p.page.fill("#key", KEY)
    p.page.click("button[type=submit]")
    p.page.wait_for_selector("tr[data-model='secret-alpha']")
    assert p.page.evaluate("sessionStorage.getItem('swapd.apiKey')") == KEY
    sent = [h.get("authorization") for _, u, h in p.requests if urlsplit(u).path in ("/running", "/api/events")]
    assert sent and all(a == f"Bearer {KEY}" for a in sent)
    # every view works with the key, live stream included
    p.page.click("[data-tab=logs]")
    wait_until(lambda: "swapd.listening" in p.page.inner_text("[data-testid=log-text]"), timeout=10, message="logs")
    # a reload keeps the key for this tab; Lock forgets it
    p.page.reload()
    p.page.wait_for_selector("nav")
    p.page.click("text=Lock")
    p.page.wait_for_selector("[data-testid=key-form]")
    assert p.page.evaluate("sessionStorage.getItem('swapd.apiKey')") is None
    assert "secret-alpha" not in p.page.content()


def test_first_load_transfers_under_300_kb(swapd, browser):
    s = swapd({"alpha": model()})
    context = browser.new_context()
    page = context.new_page()
    cdp = context.new_cdp_session(page)
    cdp.send("Network.enable")
    urls: dict[str, str] = {}
    sizes: dict[str, float] = {}
    cdp.on("Network.requestWillBeSent", lambda e: urls.__setitem__(e["requestId"], e["request"]["url"]))
    cdp.on("Network.loadingFinished", lambda e: sizes.__setitem__(e["requestId"], e["encodedDataLength"]))
    page.goto(s.base + "/ui/")
    page.wait_for_selector("tr[data-model=alpha]")
    page.wait_for_timeout(500)
    ui = {urls[r]: n for r, n in sizes.items() if urlsplit(urls.get(r, "")).path.startswith("/ui/")}
    context.close()
    assert {"/ui/", "/ui/app.js", "/ui/style.css", "/ui/vendor/preact.mjs"} <= {urlsplit(u).path for u in ui}
    total = sum(ui.values())
    assert total < 300_000, f"first load transferred {total} bytes: {json.dumps(ui, indent=1)}"


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_phone_screen_in_both_colour_schemes(swapd, open_page, scheme):
    s = swapd({"a-model-with-a-rather-long-name": model(description="a description that goes on for a while")})
    p = open_page(s.base, viewport={"width": 390, "height": 844}, color_scheme=scheme, is_mobile=True,
                  device_scale_factor=2)
    p.page.goto(s.base + "/ui/")
    p.page.wait_for_selector("tr[data-model]")
    background = p.page.evaluate("getComputedStyle(document.body).backgroundColor")
    rgb = [int(x) for x in re.findall(r"\d+", background)[:3]]
    assert (sum(rgb) / 3 < 60) if scheme == "dark" else (sum(rgb) / 3 > 200), background
    for tab in ("models", "gpus", "activity", "logs", "playground"):
        p.page.click(f"[data-tab={tab}]")
        p.page.wait_for_selector(f"[data-testid=view-{tab}]")
        overflow = p.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"{tab}: the page is {overflow}px wider than a phone screen"
        if tab == "models":  # every model's Load button is on screen, not behind a sideways scroll
            for box in p.page.locator("[data-testid=load]").evaluate_all(
                    "bs => bs.map(b => b.getBoundingClientRect().right)"):
                assert box <= 390, box
