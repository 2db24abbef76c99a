"""llama-swap's ComfyUI passthrough: ``/comfyui/...`` goes to the model named ``comfyui_auto``.

- ``/comfyui`` (any method) redirects to ``/comfyui/`` with the query kept:
  301 for GET and HEAD, 308 otherwise, as llama-swap answers.
- ``/comfyui/<path>`` is relayed to the model as ``/<path>``, the path still
  percent-encoded as the client sent it and the query byte for byte, like
  ``/upstream/comfyui_auto/<path>``; a websocket (ComfyUI's ``/ws``) is
  spliced through as there.
- Only ``/comfyui/`` itself may start the model. Any other path answers 409
  unless the model is ready, so a browser tab still polling ComfyUI's API or
  assets after the model was unloaded does not load it again.
- ``comfyui_auto`` must be a model of this swapd (a peer's does not count):
  404 otherwise. The config loader gives it llama-swap's settings: a
  ``concurrencyLimit`` of at least 50 and ``compat.ignoreWebsockets``.

The routes sit behind ``apiKeys`` like every API route; requests are not
listed as in flight (llama-swap does not list them either).
"""

from __future__ import annotations

from urllib.parse import unquote

from aiohttp import web
from yarl import URL

from swapd.backend import State
from swapd.config._keys import COMFYUI_MODEL_ID
from swapd.server import websocket
from swapd.server.errors import ClientError
from swapd.server.keys import RUNTIME
from swapd.server.routing import forward_local
from swapd.server.slowclient import check_declared_length, stream_body

PREFIX = "/comfyui"


def install(app: web.Application) -> None:
    app.router.add_route("*", PREFIX, handle_redirect)
    app.router.add_route("*", PREFIX + "/{tail:.*}", handle_comfyui)


async def handle_redirect(request: web.Request) -> web.Response:
    location = PREFIX + "/"
    query = request.raw_path.partition("?")[2]
    if query:
        location += "?" + query
    cls = web.HTTPMovedPermanently if request.method in ("GET", "HEAD") else web.HTTPPermanentRedirect
    raise cls(location=URL(location, encoded=True))


async def handle_comfyui(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    model = rt.config.models.get(COMFYUI_MODEL_ID)
    if model is None:
        raise ClientError(404, f"local model {COMFYUI_MODEL_ID} not found", "model_not_found")
    raw_path, _, raw_query = request.raw_path.partition("?")
    rest = raw_path[len(PREFIX) :] or "/"  # still percent-encoded, as the client sent it
    if any(part in ("..", ".") for part in unquote(rest).split("/")):
        raise ClientError(400, "path traversal is not allowed in /comfyui paths", "invalid_path")
    if rest != "/" and not model.remote:
        backend = rt.backends.get(model.id)
        if backend is None or backend.state is not State.READY:
            raise ClientError(
                409, f"model {COMFYUI_MODEL_ID} is not loaded; only /comfyui/ can start it", "model_not_loaded"
            )
    path_qs = rest + ("?" + raw_query if raw_query else "")
    if websocket.is_websocket_upgrade(request):
        return await websocket.relay(request, model, path_qs)
    body = None
    if request.can_read_body:
        limits = rt.config.client_limits
        check_declared_length(request, limits.max_body_bytes)
        body = stream_body(request, limits.body_idle_timeout, limits.max_body_bytes)
    return await forward_local(request, model, path_qs, body, content_length=request.content_length)
