"""Fixtures for the end-to-end tests: real llama-server, nginx and LiteLLM.

Each tool is found, or made, once per session. A test is skipped only when a
tool is absent *and* cannot be had here, and the skip says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import ROOT, start_swapd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_util import stop_swapd  # noqa: E402

LITELLM_VERSION = os.environ.get("SWAPD_LITELLM_VERSION", "1.100.5")


# -- swapd instances that outlive one test ------------------------------------------


@pytest.fixture(scope="module")
def module_swapd(tmp_path_factory):
    """Like the ``swapd`` fixture, but the instances live for the whole module."""
    started = []

    def start(models: dict, **kw):
        instance = start_swapd(tmp_path_factory.mktemp("swapd"), models, **kw)
        started.append(instance)
        return instance

    yield start
    problems = []
    for instance in started:
        problems += stop_swapd(instance)
    if problems:
        pytest.fail("\n".join(problems))


# -- llama-server and the model ------------------------------------------------------


@dataclass(frozen=True)
class Llama:
    server: Path
    model: Path
    help: str

    def has(self, flag: str) -> bool:
        return flag in self.help


@pytest.fixture(scope="session")
def llama() -> Llama:
    """A real llama-server and SmolLM2's GGUF, through `swapd setup`'s own code.

    On a fresh machine this builds llama-server (minutes); afterwards both
    come from the cache at once.
    """
    from swapd import setup

    try:
        server = setup.ensure_llama_server()
        model = setup.ensure_model()
    except setup.MissingTools as exc:
        pytest.skip(f"llama-server is not installed and cannot be built here: {exc}")
    out = subprocess.run([str(server), "--help"], capture_output=True, text=True, timeout=60)
    return Llama(server, model, out.stdout + out.stderr)


# -- nginx ----------------------------------------------------------------------------


def _find_nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


@pytest.fixture(scope="session")
def nginx_bin() -> str:
    found = _find_nginx()
    if found:
        return found
    why = "nginx is not installed"
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-q", "nginx-light"]
        r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:  # maybe the package lists are missing or stale
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=900)
            r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        found = _find_nginx()
        if found:
            return found
        why = f"nginx is not installed and `{' '.join(install)}` failed: {(r.stderr or r.stdout).strip()[-300:]}"
    else:
        why += " and this user cannot install it (as root: apt-get install nginx-light)"
    pytest.skip(why)


# -- LiteLLM ------------------------------------------------------------------------


def _litellm_venv() -> Path:
    return Path(os.environ.get("SWAPD_LITELLM_VENV") or ROOT / ".venv-litellm")


@pytest.fixture(scope="session")
def litellm_bin() -> Path:
    """The `litellm` proxy command from its own virtualenv (made here when missing)."""
    venv = _litellm_venv()
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
        r = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"],
            capture_output=True, text=True, timeout=1500,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"no LiteLLM virtualenv at {venv}, and making one failed: {exc}")
    if r.returncode != 0 or not exe.exists():
        pytest.skip(f"no LiteLLM virtualenv at {venv}, and `pip install litellm[proxy]=={LITELLM_VERSION}` failed: {r.stderr.strip()[-400:]}")
    return exe
