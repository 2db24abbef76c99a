"""The swapd command itself: --help, and starting on a config without models."""

from __future__ import annotations

import os
import subprocess

from helpers import PY, ROOT, model


def _swapd(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([PY, "-m", "swapd", *args], capture_output=True, text=True, env=env, timeout=60)


def test_help_lists_the_subcommands():
    r = _swapd("--help")
    assert r.returncode == 0, r.stderr
    assert "swapd setup" in r.stdout and "swapd doctor" in r.stdout
    assert "--config" in r.stdout  # and still the server's own flags


def test_subcommands_named_in_help_answer_their_own_help():
    for sub in ("setup", "doctor"):
        r = _swapd(sub, "--help")
        assert r.returncode == 0, r.stderr
        assert f"swapd {sub}" in r.stdout


def test_empty_config_starts_and_warns(swapd):
    s = swapd({})
    assert s.get("/health").status == 200
    warnings = [e for e in s.log_events() if e.get("event") == "config.no_models"]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning", s.log_text()
    assert "no models" in warnings[0]["message"]
    reply = s.chat("anything")
    assert reply.status == 404 and reply.json()["error"]["code"] == "model_not_found"


def test_config_with_models_does_not_warn_about_none(swapd):
    s = swapd({"m1": model()})
    assert s.get("/health").status == 200
    assert "config.no_models" not in s.log_text()
