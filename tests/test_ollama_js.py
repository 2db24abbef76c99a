"""The official ``ollama`` JavaScript library (npm) against swapd's Ollama API, run by Node.

``scripts/test.sh`` installs it with ``npm ci`` in ``tests/js`` (the version is
pinned in its package-lock.json); without Node or the package the test skips
with the reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import model

JS = Path(__file__).resolve().parent / "js"


def test_the_javascript_client(swapd):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (JS / "node_modules" / "ollama").is_dir():
        pytest.skip("the ollama npm package is not installed (cd tests/js && npm ci; scripts/test.sh does it)")
    s = swapd({"chat": model("--chunks", "4"), "other": model()})
    run = subprocess.run([node, str(JS / "ollama_client.mjs"), s.base, "chat"], capture_output=True, text=True,
                         timeout=60, cwd=JS)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen["list"] == ["chat", "other"]
    assert seen["whole"] == {"content": "tok0 tok1 tok2 tok3 ", "done": True, "eval_count": 4}
    assert [p["content"] for p in seen["pieces"]] == ["tok0 ", "tok1 ", "tok2 ", "tok3 ", ""]
    assert [p["done"] for p in seen["pieces"]] == [False] * 4 + [True]
    assert seen["pieces"][-1]["eval_count"] == 4
    assert seen["generate"] == "tok0 tok1 tok2 tok3 "
    assert seen["ps"] == ["chat"]
    assert seen["error"]["status"] == 404 and "no-such-model" in seen["error"]["message"]
