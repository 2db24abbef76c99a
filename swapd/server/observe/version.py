"""``/api/version``: swapd's version, commit and build."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from aiohttp import web

from swapd import __version__
from swapd.logging import get_logger

log = get_logger("swapd.observe")


def _git_commit(root: Path) -> str | None:
    """The short commit of the source checkout at ``root``, read without running git."""
    try:
        git = root / ".git"
        if git.is_file():  # a linked worktree: "gitdir: <path>"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head[:7] or None
        ref = head.split(":", 1)[1].strip()
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        for base in dict.fromkeys((git, common)):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()[:7] or None
            if (base / "packed-refs").is_file():
                for line in (base / "packed-refs").read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split(" ", 1)[0][:7]
    except (OSError, IndexError, ValueError):
        return None
    return None


@functools.lru_cache(maxsize=1)
def build_info() -> dict[str, str]:
    """llama-swap's ``/api/version`` fields with swapd's values.

    ``SWAPD_COMMIT`` / ``SWAPD_BUILD_DATE`` (set by a packager) win; otherwise
    the commit comes from the source checkout swapd runs from, and the build
    date is "unknown", as in an unstamped llama-swap build.
    """
    root = Path(__file__).resolve().parent.parent.parent
    return {
        "version": __version__,
        "commit": os.environ.get("SWAPD_COMMIT") or _git_commit(root) or "unknown",
        "build_date": os.environ.get("SWAPD_BUILD_DATE") or "unknown",
    }


async def handle_version(request: web.Request) -> web.Response:
    return web.json_response(build_info())
