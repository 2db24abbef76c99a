"""The aiohttp application: routes, middleware and the model-routed handlers."""

from __future__ import annotations

import asyncio
import shlex
import time

import aiohttp
import psutil
from aiohttp import web

from swapd import modelinfo
from swapd.backend import StartError, State
from swapd.config import Config
from swapd.logging import get_logger
from swapd.redact import redact_argv, redact_url
from swapd.scheduler import SchedulerError
from swapd.server import (
    activity_api,
    capabilities,
    comfyui,
    cors,
    gpu_api,
    inflight,
    metrics_api,
    observe,
    ollama,
    perf_api,
    profiles,
    selectors,
    ui,
    websocket,
)
from swapd.server.auth import access_middleware
from swapd.server.bodies import BodyBudget
from swapd.server.errors import ClientError, error_response
from swapd.server.keys import BODY_BUDGET, RUNTIME
from swapd.server.relay import UpstreamError
from swapd.server.routing import (
    handle_json_model,
    handle_multipart_model,
    handle_query_model,
    handle_upstream,
)
from swapd.server.runtime import Runtime
from swapd.server.slowclient import HeaderDeadline
from swapd.telemetry.otel import make_tracer

log = get_logger("swapd.server")

# Request bodies carry base64 images and audio; 100 MB must pass, so the cap
# is generous and only there to stop a runaway client.
MAX_BODY_BYTES = 512 * 1024 * 1024

# POST endpoints whose JSON body names the model (llama-swap's list).
JSON_MODEL_ROUTES = (
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/completions",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/embeddings",
    "/reranking",
    "/rerank",
    "/v1/rerank",
    "/v1/reranking",
    "/infill",
    "/completion",
    "/v1/audio/speech",
    "/v1/audio/voices",
    "/v1/images/generations",
    "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img",
)
# audio.cpp's generic task API: JSON with a model, forwarded without the /audioapi prefix (llama-swap's)
AUDIOAPI_ROUTES = ("/audioapi/v1/tasks/run",)
# GET endpoints that name the model in the query string.
QUERY_MODEL_ROUTES = ("/v1/audio/voices", "/sdapi/v1/loras", "/props")
# POST endpoints whose multipart form names the model.
MULTIPART_MODEL_ROUTES = ("/v1/audio/transcriptions", "/v1/images/edits")


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every failure a client can see becomes an OpenAI-shaped error, never a traceback.

    The first middleware, so it also ends the connection's header deadline
    (aiohttp has parsed the headers once a request reaches it) and logs a
    ``request`` line for every refusal that the relay did not log itself.
    """
    deadline = HeaderDeadline.of(request)
    if deadline is not None:
        deadline.request_started()
    answered: web.StreamResponse | None = None
    try:
        answered = await handler(request)
        return answered
    except ClientError as exc:
        response = error_response(request, exc.status, exc.message, exc.code, exc.headers)
        if exc.close:
            response.force_close()
        return _refused(request, response, exc.message)
    except SchedulerError as exc:
        return _refused(request, error_response(request, exc.status, exc.message, exc.code, exc.headers), exc.message)
    except StartError as exc:
        return _refused(request, error_response(request, 502, exc.detail(), "backend_start_failed"), str(exc))
    except UpstreamError as exc:
        return _refused(request, error_response(request, exc.status, str(exc), exc.code), str(exc))
    except web.HTTPRequestEntityTooLarge:
        message = f"request body too large (limit {MAX_BODY_BYTES} bytes)"
        response = error_response(request, 413, message)
        response.force_close()
        return _refused(request, response, message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _refused(
            request, error_response(request, exc.status, exc.reason or "error", headers=_allow_header(exc)), exc.reason
        )
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        raise
    except Exception:
        log.exception("request.unhandled", path=request.path, method=request.method)
        return _refused(
            request,
            error_response(request, 500, "internal error in swapd; see its log", "internal_error"),
            "internal_error",
        )
    finally:
        if deadline is not None:
            deadline.request_finished()
        record = request.get("swapd.record")
        if record is not None:
            _finish_record(request, record, answered)


def _finish_record(request: web.Request, record, answered: web.StreamResponse | None) -> None:
    """Hand a proxied request's telemetry record over, whatever way it ended."""
    refused = request.get("swapd.refused")
    if refused is not None:  # an error answer from swapd itself (429, 503, a failed start, ...)
        record.status, record.error = refused
    elif answered is not None:
        record.status = record.status or answered.status
        error = answered.get("swapd.error")
        if error:
            record.error = error
    else:  # cancelled: the client went away
        record.status = record.status or 499
        record.error = record.error or "client_disconnected"
    if not record.end:
        record.end = time.monotonic()
    # After this step: aiohttp writes a whole answer when the handler returns, so the sinks
    # (the tail search, Prometheus, the activity row, the span) must not run before that write.
    asyncio.get_running_loop().call_soon(request.app[RUNTIME].telemetry.finish, record)


def _refused(request: web.Request, response: web.Response, outcome: str) -> web.Response:
    """Log one ``request`` line for an error answer, unless the relay already logged this request."""
    request["swapd.refused"] = (response.status, outcome or "error")
    if not request.get("swapd.logged"):
        log.info("request", method=request.method, path=request.path, status=response.status, outcome=outcome)
    return response


def _allow_header(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None


# -- management ------------------------------------------------------------


async def handle_health(request: web.Request) -> web.Response:
    return web.Response(text="OK")


async def handle_models(request: web.Request) -> web.Response:
    """llama-swap's ``/v1/models``: records in its field order, capabilities rendered as it does.

    Never starts a model. Capabilities come from each model's ``capabilities``
    key, or else from its GGUF (swapd.server.capabilities); the GGUFs are looked
    at in one thread per request (a ``stat`` each once read: swapd.modelinfo
    caches per file version), so a replaced file shows at once.
    """
    config = request.app[RUNTIME].config
    backends = request.app[RUNTIME].backends
    created = int(time.time())
    include_aliases = config.include_aliases_in_list
    data = []
    usage = await gpu_api.model_usage(request.app)
    facts = await _listed_facts(config)
    for model_id in config.models:
        mc = config.models[model_id]
        if mc.unlisted:
            continue
        fields = capabilities.model_fields(mc, facts.get(model_id))
        meta = {**capabilities.filter_metadata(mc.metadata or {}, fields), "type": "model"}
        if mc.aliases:
            meta["aliases"] = list(mc.aliases)
        if mc.remote:  # runs elsewhere, always ready: a status of its own, and where it is (no credentials)
            status = "remote"
            meta["remote"] = redact_url(mc.proxy)
        else:
            state = backends[model_id].state
            status = "loaded" if state in (State.READY, State.STARTING) else "unloaded"
            meta["vram_mib"] = usage.get(model_id, {}).get("vram_mib")
            meta["pids"] = backends[model_id].tracked_pids()
        data.append(_model_record(model_id, created, mc.name, mc.description, fields, meta, status))
        if include_aliases:
            for alias in mc.aliases:
                alias_meta = {"type": "alias", "modelID": model_id}
                data.append(_model_record(alias, created, mc.name, mc.description, fields, alias_meta, status))
    for peer in config.peers.values():
        for peer_model in peer.models:
            peer_meta = {"type": "peer", "peerID": peer.id}
            data.append(
                _model_record(
                    f"{peer.id}/{peer_model}", created, f"{peer.id}: {peer_model}", "", {}, peer_meta, "unloaded"
                )
            )
    for entry_id, name, description, meta, status in selectors.listing(request.app[RUNTIME]):
        data.append(_model_record(entry_id, created, name, description, {}, meta, status))  # selectors, pins
    data.sort(key=lambda r: r["id"])
    return web.json_response({"object": "list", "data": data})  # CORS: swapd.server.cors, as on every answer


def _model_record(
    model_id: str, created: int, name: str, description: str, fields: dict, llamaswap: dict, status: str
) -> dict:
    """One /v1/models record, its keys in llama-swap's order (modelRecord); empty name/description left out."""
    record: dict = {"id": model_id, "object": "model", "created": created, "owned_by": "swapd"}
    if name.strip():
        record["name"] = name.strip()
    if description.strip():
        record["description"] = description.strip()
    record.update(fields)
    meta: dict = {"llamaswap": llamaswap}
    if fields.get("context_length"):
        meta["n_ctx"] = fields["context_length"]
    record["meta"] = meta
    record["status"] = {"value": status}
    return record


async def _listed_facts(config: Config) -> dict[str, modelinfo.ModelFacts]:
    """What the GGUFs of the listed models without a ``capabilities`` key say, read in one thread."""
    todo = [mc for mc in config.models.values() if not mc.unlisted and capabilities.needs_facts(mc)]
    if not todo:
        return {}
    return await asyncio.to_thread(lambda: {mc.id: modelinfo.facts(mc) for mc in todo})


async def handle_running(request: web.Request) -> web.Response:
    backends = request.app[RUNTIME].backends
    scheduler = request.app[RUNTIME].scheduler
    running = []
    usage = await gpu_api.model_usage(request.app)
    for model_id in sorted(backends):
        backend = backends[model_id]
        if backend.state is State.STOPPED:
            continue
        mc = backend.model
        ttl_left = scheduler.ttl_remaining(model_id)
        running.append(
            {
                "model": model_id,
                "state": backend.state.value,
                "cmd": shlex.join(redact_argv(mc.cmd)),
                "proxy": redact_url(mc.proxy),
                "ttl": mc.ttl,
                "name": mc.name,
                "description": mc.description,
                "pid": backend.pid,
                "pids": backend.tracked_pids(),
                "vram_mib": usage.get(model_id, {}).get("vram_mib"),
                "footprint": scheduler.footprints.footprint(mc).as_json(),
                "in_flight": scheduler.in_flight(model_id),
                "ttl_remaining": None if ttl_left is None else round(ttl_left, 1),
            }
        )
    body: dict = {"running": running}
    budget = scheduler.memory_budget()  # the vram router's view, per GPU (empty under groups or matrix)
    if budget:
        body["gpus"] = {str(d): b for d, b in budget.items()}
    return web.json_response(body)


async def handle_unload(request: web.Request) -> web.Response:
    await request.app[RUNTIME].scheduler.unload()
    return web.Response(text="OK")


async def handle_api_unload_model(request: web.Request) -> web.Response:
    config = request.app[RUNTIME].config
    name = request.match_info["model"]
    model = config.resolve(name)
    if model is None:
        raise ClientError(404, "model not found", "model_not_found")
    await request.app[RUNTIME].scheduler.unload([model.id])
    return web.json_response({"msg": "ok"})


async def handle_api_unload_all(request: web.Request) -> web.Response:
    await request.app[RUNTIME].scheduler.unload()
    return web.json_response({"msg": "ok"})


async def handle_logs(request: web.Request) -> web.Response:
    return await observe.handle_logs(request)


async def handle_version(request: web.Request) -> web.Response:
    return await observe.handle_version(request)


async def handle_status(request: web.Request) -> web.Response:
    """swapd's own resources, for leak checks and soak tests: tasks, fds, children, memory."""
    from swapd.backend import CHILDREN

    proc = psutil.Process()
    rt = request.app[RUNTIME]
    return web.json_response(
        {
            "pid": proc.pid,
            "event_loop": "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio",
            "tasks": len(asyncio.all_tasks()),
            "fds": proc.num_fds(),
            "children": sorted(c.pid for c in proc.children()),
            "guardian": CHILDREN.guardian.pid if CHILDREN.guardian is not None else None,
            "rss_bytes": proc.memory_info().rss,
            "cpu_seconds": round(sum(proc.cpu_times()[:2]), 3),
            "swaps": rt.scheduler.swap_count,
            "queued": len(rt.scheduler.queued()),
            "admitted": rt.scheduler.admitted(),
        }
    )


async def handle_not_found(request: web.Request) -> web.Response:
    raise ClientError(404, f"no route for {request.method} {request.path}", "not_found")


# -- app factory -------------------------------------------------------------


async def _preload(rt: Runtime) -> None:
    """hooks.on_startup.preload: load these models once, in order, at startup."""
    for model_id in rt.config.preload:
        t0 = time.monotonic()
        try:
            lease = await rt.scheduler.acquire(model_id)
        except (SchedulerError, StartError) as exc:
            log.error("preload.failed", model=model_id, error=str(exc))
            continue
        lease.release()
        log.info("preload.done", model=model_id, seconds=round(time.monotonic() - t0, 3))


async def _tracing(app: web.Application):
    """OpenTelemetry traces when the config or the OTEL_* environment asks (swapd.telemetry.otel)."""
    rt = app[RUNTIME]
    tracer = rt.telemetry.tracer = make_tracer(rt.config)
    yield
    if tracer is not None:
        rt.telemetry.tracer = None
        await tracer.close()


def create_app(config: Config) -> web.Application:
    # Outermost first: errors are rendered for everything, preflights need no key.
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[error_middleware, access_middleware])
    rt = app[RUNTIME] = Runtime(config)
    app[BODY_BUDGET] = BodyBudget()

    async def lifecycle(app: web.Application):
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
        session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        rt.start(session)
        preload = asyncio.get_running_loop().create_task(_preload(rt)) if config.preload else None
        yield
        if preload is not None:
            preload.cancel()
            await asyncio.gather(preload, return_exceptions=True)
        await rt.scheduler.close()
        await rt.pool.close()
        await rt.session.close()

    app.cleanup_ctx.append(lifecycle)

    async def begin_shutdown(app: web.Application) -> None:
        # Runs after the listener closes and before in-flight requests are
        # awaited: new requests on open connections get 503, streams finish.
        rt.scheduler.drain()

    app.on_shutdown.append(begin_shutdown)

    r = app.router
    json_paths = list(JSON_MODEL_ROUTES)
    json_paths += ["/v" + path[3:] for path in JSON_MODEL_ROUTES if path.startswith("/v1/")]  # versionless aliases
    json_paths += AUDIOAPI_ROUTES
    for path in json_paths:
        r.add_post(path, handle_json_model)
    for path in QUERY_MODEL_ROUTES:
        r.add_get(path, handle_query_model)
    for path in MULTIPART_MODEL_ROUTES:
        r.add_post(path, handle_multipart_model)
    inflight.install(app, post_paths=[*json_paths, *MULTIPART_MODEL_ROUTES], get_paths=QUERY_MODEL_ROUTES)
    r.add_route("*", "/upstream/{tail:.+}", handle_upstream)
    r.add_get("/health", handle_health)
    r.add_get("/wol-health", handle_health)
    r.add_get("/v1/models", handle_models)
    r.add_get("/models", handle_models)
    r.add_get("/running", handle_running)
    r.add_get("/unload", handle_unload)
    r.add_post("/api/models/unload", handle_api_unload_all)
    r.add_post("/api/models/unload/{model:.+}", handle_api_unload_model)
    r.add_get("/logs", handle_logs)
    r.add_get("/api/version", handle_version)
    r.add_get("/api/status", handle_status)
    r.add_get("/logs/stream", observe.handle_log_stream)
    r.add_get("/logs/stream/{monitor:.+}", observe.handle_log_stream)
    r.add_get("/api/events", observe.handle_events)
    activity_api.install(app)
    gpu_api.install(app)
    metrics_api.install(app)
    perf_api.install(app)
    ui.install(app)
    cors.install(app)
    websocket.install(app)
    ollama.install(app)
    profiles.install(app)
    comfyui.install(app)
    app.cleanup_ctx.append(_tracing)
    r.add_route("*", "/{tail:.*}", handle_not_found)
    return app
