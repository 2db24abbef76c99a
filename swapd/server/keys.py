"""aiohttp app keys shared by the server modules."""

from aiohttp import web

from swapd.server.bodies import BodyBudget

# The swapd.server.runtime.Runtime holding config, scheduler, backends and session.
RUNTIME: web.AppKey = web.AppKey("runtime", object)

# Bytes of request bodies held at once (clientLimits.maxBodyBytesInFlight).
BODY_BUDGET: web.AppKey[BodyBudget] = web.AppKey("body_budget", BodyBudget)
