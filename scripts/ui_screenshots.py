"""Screenshots of the web UI for docs/ui.md, from a real swapd with fake backends and the stub NVML.

    python scripts/ui_screenshots.py [OUT_DIR]     # default docs/ui/

It starts swapd on a scratch directory, makes some traffic (cold starts, a
swap, streamed requests with llama-server timings, one stop whose memory
does not come back), then photographs every view in headless Chromium at
desktop size (light and dark) and at phone size. Needs Debian's chromium,
Playwright and a C compiler (for the stub NVML), as the tests do.
"""

from __future__ import annotations

import shutil
import sys
import threading
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from browser_util import CHROMIUM_ARGS, chromium_path  # noqa: E402
from helpers import free_port, model, start_swapd, wait_until  # noqa: E402
from nvml_stub import build_stub, stub_env  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402


def traffic(s, state: Path) -> None:
    for _ in range(3):
        assert s.stream("qwen-7b", x_timings=True)[0] == 200
    assert s.stream("llama-8b", x_timings=True, max_tokens=40)[0] == 200  # a swap: qwen-7b stops
    (state / "leak_dead").write_text("")  # the next stop leaves its memory behind
    assert s.stream("qwen-7b", x_timings=True)[0] == 200  # swap back: llama-8b's stop is not freed
    wait_until(lambda: any(e.get("event") == "vram.not_freed" for e in s.log_events()), timeout=30,
               message="the not_freed verdict")
    (state / "leak_dead").unlink()
    assert s.chat("embed").status == 200
    for _ in range(2):
        assert s.stream("qwen-7b", x_timings=True, max_tokens=30)[0] == 200


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "ui"
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="swapd-shots-"))
    state = tmp / "nvml"
    state.mkdir()
    (state / "sensors").write_text("61 87 54")
    (state / "power").write_text("246 350")
    (state / "total_mib").write_text("24576")
    lib = build_stub(tmp / "stub")
    # memory held by a process swapd does not manage (a desktop session, say)
    other = __import__("subprocess").Popen(["sleep", "600"])
    (state / f"g{other.pid}").write_text("1200")
    # a server swapd did not start, for a remote model (proxy, no cmd)
    cloud_port = free_port()
    cloud = __import__("subprocess").Popen(
        [sys.executable, "-m", "swapd.fake_backend", "--port", str(cloud_port), "--quiet", "--chunks", "12"],
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    s = start_swapd(
        tmp,
        {
            "qwen-7b": model("--vram-mib", "6100", "--load-delay", "1.2", "--chunks", "48", "--interval", "0.01",
                             name="Qwen2.5 7B Instruct", description="Q4_K_M, 16k context"),
            "llama-8b": model("--vram-mib", "7300", "--load-delay", "1.6", name="Llama 3.1 8B Instruct",
                              description="Q5_K_M, 32k context"),
            "embed": model("--vram-mib", "900", name="nomic-embed-text v1.5", description="embeddings", ttl=600),
            "cloud-70b": {"proxy": f"http://127.0.0.1:{cloud_port}/v1", "name": "Llama 3.3 70B (LAN box)",
                          "description": "remote: another machine's llama-server"},
        },
        env=stub_env(lib, state),
        groups={"chat": {"swap": True, "members": ["qwen-7b", "llama-8b"]}, "aux": {"persistent": True,
                                                                                  "members": ["embed"]}},
        globalTTL=900,
    )
    try:
        wait_until(lambda: s.chat("cloud-70b").status == 200, timeout=15, message="the remote endpoint")
        traffic(s, state)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            for scheme, size, suffix in (("light", (1280, 800), ""), ("dark", (1280, 800), "-dark"),
                                         ("light", (390, 844), "-phone")):
                ctx = browser.new_context(viewport={"width": size[0], "height": size[1]}, color_scheme=scheme,
                                          device_scale_factor=1 if size[0] > 800 else 2, is_mobile=size[0] < 800)
                page = ctx.new_page()
                page.goto(s.base + "/ui/")
                page.wait_for_selector("tr[data-model]")
                for tab in ("models", "gpus", "activity", "logs", "playground"):
                    if suffix and tab not in ("models", "gpus", "playground"):
                        continue
                    page.click(f"[data-tab={tab}]")
                    page.wait_for_selector(f"[data-testid=view-{tab}]")
                    if tab == "gpus":
                        page.wait_for_selector("[data-testid=stop]")
                    if tab == "activity":
                        # one request in flight while the picture is taken (the In flight table, with Cancel)
                        held = threading.Thread(target=s.chat, args=("embed",), kwargs={"x_sleep": 4}, daemon=True)
                        held.start()
                        page.wait_for_selector("[data-testid=inflight-row]")
                        page.wait_for_selector("[data-testid=activity-row]")
                    if tab == "logs":
                        page.select_option("[data-testid=log-source]", "upstream")
                        time.sleep(1.0)
                    if tab == "playground":
                        page.select_option("[data-testid=pg-model]", "qwen-7b")
                        page.fill("[data-testid=pg-input]", "Name three uses for a swap file.")
                        page.click("[data-testid=pg-send]")
                        page.wait_for_selector("[data-testid=pg-stats]", timeout=30000)
                    time.sleep(0.6)
                    page.screenshot(path=str(out / f"{tab}{suffix}.png"), full_page=tab != "logs")
                ctx.close()
            browser.close()
    finally:
        s.terminate()
        other.kill()
        cloud.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"screenshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
