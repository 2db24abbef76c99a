"""aiohttp app keys shared by the server modules."""

from aiohttp import web

# The swapd.server.app.Runtime holding config, scheduler, backends and session.
RUNTIME: web.AppKey = web.AppKey("runtime", object)
