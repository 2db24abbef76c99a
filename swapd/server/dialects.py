"""Which client dialect a path speaks, for the error shape (kept apart so errors.py imports nothing heavy)."""

from __future__ import annotations

from aiohttp import web

# the local ports of the --ollama-listen sockets (set by swapd.cli once they are bound)
OLLAMA_PORTS: web.AppKey[set[int]] = web.AppKey("swapd.ollama_ports", set)

# Ollama's routes: its clients expect {"error": "..."} rather than OpenAI's error object.
OLLAMA_PATHS = frozenset(
    {
        "/api/tags",
        "/api/ps",
        "/api/show",
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
        "/api/pull",
        "/api/push",
        "/api/create",
        "/api/copy",
        "/api/delete",
    }
)


def is_ollama_path(path: str) -> bool:
    return path in OLLAMA_PATHS or path.startswith("/api/blobs/")


def on_ollama_listener(request) -> bool:
    """The request came in on ``--ollama-listen``'s socket (where ``GET /`` answers as Ollama does)."""
    ports = request.app.get(OLLAMA_PORTS)
    if not ports or request.transport is None:
        return False
    sockname = request.transport.get_extra_info("sockname")
    return bool(sockname) and sockname[1] in ports
