"""A fake OpenAI-compatible LLM server, used by swapd's tests, demos and benchmarks.

Run it as ``python -m swapd.fake_backend --port N [options]``.  It is a real HTTP
server process (aiohttp) and deliberately imports nothing else from swapd, so it
can be started standalone.  See ``--help`` for the knobs that simulate slow
loads, slow/crashing streams, stubborn processes and orphaned children.

Endpoints:
  GET  /health                 503 {"status":"loading"} during --load-delay, then 200 {"status":"ok"}
  POST /v1/chat/completions    OpenAI chat completion (streaming with "stream": true)
  POST /v1/completions         OpenAI text completion (streaming with "stream": true)
  POST /v1/embeddings          8 deterministic floats per input
  GET  /v1/models              the --model-id
  GET  /x/headers              the request headers as a JSON object
  GET  /x/pid                  {"pid": ...}
  GET  /x/argv                 {"argv": [...]}: the arguments it was started with (after the program)
  GET  /x/fds                  {"fds": {"0": "/dev/null", "3": "socket:[...]", ...}}: this process's open fds
  GET  /x/stats                stream / request counters
  GET  /x/last                 the last JSON request: {"path": ..., "body": ...} (bodies up to 1 MiB)
  GET|POST /v1/audio/voices    {"voices": [...], "model": ..., "x_method": ..., "x_path": ...} (model from the
                               query, or from the JSON body of a POST)
  GET  /ws                     a websocket (subprotocols echo.v2, echo.v1; permessage-deflate if offered):
                               text and binary messages are echoed; pings are answered with the same payload;
                               a pong is reported as the text "pong:<payload>"; the text commands
                               "x_push N" (N server-initiated texts "push i"), "x_ping" (a ping "from-backend"),
                               "x_info" (JSON: protocol, compress, request headers) and "x_close CODE" (close
                               with CODE, reason "bye"); ?push=N sends N texts right after the handshake;
                               ?refuse=STATUS answers STATUS with a JSON error instead of upgrading
  anything else                404 {"error": {"message": ..., "type": "not_found"}, "x_raw_path": ...}

Extra request-body fields: "x_sleep" (seconds to sleep before answering),
"x_echo" (non-streaming: content is the raw body length, plus "x_body_bytes" and
"x_body_sha256"; streaming: the final chunk carries "x_headers", the request headers),
"max_tokens" (overrides --chunks).

A chat request with "tools" whose last message's content starts with "x_tool_call"
is answered with a call to the first tool, arguments {"city": "Paris", "days": 3},
streamed in pieces as OpenAI-compatible servers do (finish_reason "tool_calls").
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import uuid
from typing import Any

from aiohttp import BodyPartReader, WSMsgType, web

# Large enough for a 200 MB (and more) request body.
CLIENT_MAX_SIZE = 1024 * 1024 * 1024

_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _timings(prompt_n: int, predicted_n: int) -> dict[str, Any]:
    """llama-server's timings block, with fixed rates (100 prompt tokens/s, 25 generated tokens/s)."""
    return {
        "cache_n": 0,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_n * 10.0,
        "prompt_per_token_ms": 10.0,
        "prompt_per_second": 100.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_n * 40.0,
        "predicted_per_token_ms": 40.0,
        "predicted_per_second": 25.0,
    }


def _out(line: str) -> None:
    """Print one line to stdout and flush it at once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _wants_tool_call(body: dict[str, Any]) -> bool:
    messages = body.get("messages") or []
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    content = last.get("content")
    if isinstance(content, list):  # content parts
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return isinstance(content, str) and content.startswith("x_tool_call")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(data).encode(), status=status, content_type="application/json")


def _error(message: str, status: int, type_: str) -> web.Response:
    return _json({"error": {"message": message, "type": type_}}, status=status)


class FakeBackend:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model_id: str = args.model_id
        self.started = time.monotonic()
        self.ready_at = self.started + max(0.0, args.load_delay)
        self.quiet: bool = args.quiet
        self.stats = {
            "streams_started": 0,
            "streams_completed": 0,
            "streams_cancelled": 0,
            "requests": 0,
            "in_flight": 0,
            "connections": 0,  # distinct client connections seen (keep-alive reuse shows here)
            "ws_open": 0,  # websockets open now
            "ws_total": 0,
        }
        self.ws_close_codes: list[int | None] = []  # each ended websocket's close code (in /x/stats)
        self._peers: set = set()
        self.last: dict[str, Any] = {}

    # -- plumbing -------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=CLIENT_MAX_SIZE, middlewares=[self._middleware])
        r = app.router
        r.add_get("/health", self.health)
        r.add_post("/v1/chat/completions", self.chat_completions)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/embeddings", self.embeddings)
        # llama-server also serves the OpenAI routes without the /v1 prefix
        r.add_post("/chat/completions", self.chat_completions)
        r.add_post("/completions", self.completions)
        r.add_post("/embeddings", self.embeddings)
        r.add_post("/v1/audio/transcriptions", self.multipart_echo)
        r.add_post("/v1/images/edits", self.multipart_echo)
        r.add_get("/v1/models", self.models)
        r.add_get("/x/headers", self.x_headers)
        r.add_get("/x/pid", self.x_pid)
        r.add_get("/x/argv", self.x_argv)
        r.add_get("/x/fds", self.x_fds)
        r.add_get("/x/stats", self.x_stats)
        r.add_get("/x/last", self.x_last)
        r.add_route("*", "/v1/audio/voices", self.voices)
        r.add_get("/ws", self.websocket)
        r.add_route("*", "/{tail:.*}", self.not_found)
        if self.args.cors_echo:
            app.on_response_prepare.append(self._cors_echo)
        return app

    @staticmethod
    async def _cors_echo(request: web.Request, response: web.StreamResponse) -> None:
        """llama-server's CORS headers on every answer: the Origin echoed (empty when none was sent)."""
        response.headers["Access-Control-Allow-Origin"] = request.headers.get("Origin", "")
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Access-Control-Allow-Methods"] = "GET, POST"
        response.headers["Access-Control-Allow-Headers"] = "*"

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        stats = self.stats
        stats["requests"] += 1
        stats["in_flight"] += 1
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if peer is not None and peer not in self._peers:
            self._peers.add(peer)
            stats["connections"] = len(self._peers)
        if not self.quiet:
            _out(f"fake_backend: request {request.method} {request.path}")
        key = self.args.api_key
        if key and request.path.startswith("/v1/") and request.headers.get("Authorization") != f"Bearer {key}":
            stats["in_flight"] -= 1
            return _error("invalid api key", 401, "authentication_error")
        try:
            return await handler(request)
        finally:
            stats["in_flight"] -= 1

    async def _read_body(self, request: web.Request) -> tuple[bytes, dict[str, Any]] | web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError as e:
            return _error(f"invalid JSON body: {e}", 400, "invalid_request_error")
        if not isinstance(body, dict):
            return _error("request body must be a JSON object", 400, "invalid_request_error")
        if len(raw) <= 1024 * 1024:
            self.last = {"path": request.path, "body": body}
        sleep = body.get("x_sleep")
        if sleep:
            await asyncio.sleep(float(sleep))
        return raw, body

    def _model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        return model if isinstance(model, str) and model else self.model_id

    def _n_tokens(self, body: dict[str, Any]) -> int:
        for key in ("max_tokens", "max_completion_tokens"):
            v = body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                return v
        return self.args.chunks

    # -- endpoints ------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        if time.monotonic() < self.ready_at:
            return _json({"status": "loading"}, status=503)
        return _json({"status": "ok"})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, chat=False)

    async def _completion(self, request: web.Request, chat: bool) -> web.StreamResponse:
        """A completion; ``"x_timings": true`` in a streamed request adds llama-server's ``timings``."""
        got = await self._read_body(request)
        if isinstance(got, web.Response):
            return got
        raw, body = got
        model = self._model(body)
        n = self._n_tokens(body)
        if chat and body.get("tools") and _wants_tool_call(body):
            return await self._tool_call(request, body, model)
        if body.get("stream") is True:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            timings = body.get("x_timings") is True
            echo = dict(request.headers) if body.get("x_echo") is True else None
            return await self._stream(request, chat, model, n, include_usage, timings, max(1, len(raw) // 4), echo)

        content = "".join(f"tok{i} " for i in range(n))
        prompt_tokens = max(1, len(raw) // 4)
        extra: dict[str, Any] = {}
        if body.get("x_echo") is True:
            content = str(len(raw))
            extra = {"x_body_bytes": len(raw), "x_body_sha256": hashlib.sha256(raw).hexdigest()}
            if len(raw) <= 1024 * 1024:  # small bodies come back whole, to check rewrites
                extra["x_body_json"] = body
                extra["x_headers"] = dict(request.headers)
                extra["x_path"] = request.path_qs
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        else:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": "stop"}
        return _json(
            {
                "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": n,
                    "total_tokens": prompt_tokens + n,
                },
                **extra,
            }
        )

    async def _stream(
        self,
        request: web.Request,
        chat: bool,
        model: str,
        n: int,
        include_usage: bool,
        timings: bool = False,
        prompt_n: int = 1,
        echo_headers: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        stats = self.stats
        interval = self.args.interval
        crash_after = self.args.crash_after_chunks
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        stats["streams_started"] += 1

        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())
        sent = 0

        def chunk(choice: dict[str, Any], **extra: Any) -> bytes:
            return (
                b"data: "
                + _dumps(
                    {
                        "id": cid,
                        "object": obj,
                        "created": created,
                        "model": model,
                        "choices": [choice],
                        "x_sent_at": time.time(),
                        **extra,
                    }
                ).encode()
                + b"\n\n"
            )

        try:
            if crash_after is not None and crash_after <= 0:
                os._exit(3)
            for i in range(n):
                if i and interval > 0:
                    await asyncio.sleep(interval)
                tok = f"tok{i} "
                if chat:
                    choice = {"index": 0, "delta": {"content": tok}, "finish_reason": None}
                    if i == 0:
                        choice["delta"] = {"role": "assistant", "content": tok}
                else:
                    choice = {"index": 0, "text": tok, "finish_reason": None}
                await resp.write(chunk(choice))
                sent += 1
                if crash_after is not None and sent >= crash_after:
                    await resp.drain()
                    os._exit(3)
            final = (
                {"index": 0, "delta": {}, "finish_reason": "stop"}
                if chat
                else {"index": 0, "text": "", "finish_reason": "stop"}
            )
            extra: dict[str, Any] = {"x_headers": echo_headers} if echo_headers is not None else {}
            if timings:  # llama-server's final chunk carries its timings
                extra["timings"] = _timings(prompt_n, n)
            await resp.write(chunk(final, **extra))
            if include_usage:
                await resp.write(
                    b"data: "
                    + _dumps(
                        {
                            "id": cid,
                            "object": obj,
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
                        }
                    ).encode()
                    + b"\n\n"
                )
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except asyncio.CancelledError:
            # Client went away mid-stream: aiohttp cancels the handler.
            stats["streams_cancelled"] += 1
            _out(f"fake_backend: stream cancelled after {sent} chunks")
            raise
        except ConnectionError:
            # Client went away and a write noticed first; aiohttp ignores the dead connection.
            stats["streams_cancelled"] += 1
            _out(f"fake_backend: stream cancelled after {sent} chunks")
            return resp
        stats["streams_completed"] += 1
        return resp

    async def _tool_call(self, request: web.Request, body: dict[str, Any], model: str) -> web.StreamResponse:
        """A call to the first tool: whole, or streamed in pieces (name, then the arguments in three parts)."""
        name = ((body["tools"][0] or {}).get("function") or {}).get("name", "tool")
        args = json.dumps({"city": "Paris", "days": 3})
        call = {"id": "call_fake0", "type": "function", "function": {"name": name, "arguments": args}}
        usage = {"prompt_tokens": 1, "completion_tokens": 9, "total_tokens": 10}
        if body.get("stream") is not True:
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            return _json(
                {
                    "id": "chatcmpl-tool",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        cut = [args[:5], args[5:17], args[17:]]
        deltas = [
            {"role": "assistant", "tool_calls": [{"index": 0, **call, "function": {"name": name, "arguments": ""}}]}
        ]
        deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} for piece in cut]
        for i, delta in enumerate(deltas):
            last = i == len(deltas) - 1
            event = {
                "id": "chatcmpl-tool",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            }
            await resp.write(b"data: " + _dumps(event).encode() + b"\n\n")
            if last:
                event["choices"] = [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]
                await resp.write(b"data: " + _dumps(event).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            done = {
                "id": "chatcmpl-tool",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [],
                "usage": usage,
            }
            await resp.write(b"data: " + _dumps(done).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        got = await self._read_body(request)
        if isinstance(got, web.Response):
            return got
        _, body = got
        inp = body.get("input", "")
        inputs = [inp] if isinstance(inp, str) else list(inp) if isinstance(inp, list) else [inp]
        data = []
        tokens = 0
        for i, item in enumerate(inputs):
            text = item if isinstance(item, str) else _dumps(item)
            tokens += max(1, len(text.split()))
            digest = hashlib.sha256(text.encode()).digest()
            # 8 deterministic floats in [-1, 1) from the input's digest.
            vec = [v / 2147483648.0 for v in struct.unpack("<8i", digest)]
            data.append({"object": "embedding", "index": i, "embedding": vec})
        return _json(
            {
                "object": "list",
                "data": data,
                "model": self._model(body),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def multipart_echo(self, request: web.Request) -> web.Response:
        """Describe a multipart upload: its text fields, and size and sha256 of each file."""
        fields: dict[str, Any] = {}
        files: dict[str, Any] = {}
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):  # a nested multipart: not something clients send
                continue
            if part.filename is None:
                fields[part.name or ""] = (await part.read()).decode("utf-8", "replace")
                continue
            digest, size = hashlib.sha256(), 0
            while chunk := await part.read_chunk(1 << 20):
                digest.update(chunk)
                size += len(chunk)
            files[part.name or ""] = {"filename": part.filename, "bytes": size, "sha256": digest.hexdigest()}
        return _json(
            {
                "text": "ok",
                "model": fields.get("model"),
                "fields": fields,
                "files": files,
                "content_length": request.content_length,
            }
        )

    async def models(self, request: web.Request) -> web.Response:
        return _json(
            {
                "object": "list",
                "data": [{"id": self.model_id, "object": "model", "created": 0, "owned_by": "fake_backend"}],
            }
        )

    async def x_headers(self, request: web.Request) -> web.Response:
        # Original-case names; repeated headers are joined with ", ".
        out: dict[str, str] = {}
        for k, v in request.headers.items():
            out[k] = f"{out[k]}, {v}" if k in out else v
        return _json(out)

    async def x_fds(self, request: web.Request) -> web.Response:
        fds = {}
        for name in os.listdir("/proc/self/fd"):
            try:
                fds[name] = os.readlink(f"/proc/self/fd/{name}")
            except OSError:  # the listing's own fd, closed by now
                pass
        return _json({"fds": fds})

    async def x_pid(self, request: web.Request) -> web.Response:
        return _json({"pid": os.getpid()})

    async def x_argv(self, request: web.Request) -> web.Response:
        return _json({"argv": sys.argv[1:]})

    async def x_last(self, request: web.Request) -> web.Response:
        return _json(self.last)

    async def x_stats(self, request: web.Request) -> web.Response:
        s = dict(self.stats)
        s["in_flight"] -= 1  # don't count this /x/stats request itself
        return _json({**s, "ws_close_codes": self.ws_close_codes})

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        refuse = request.query.get("refuse")
        if refuse:
            response = _error(f"websocket refused with {refuse}", int(refuse), "refused")
            response.headers["X-Refused"] = "yes"
            return response
        ws = web.WebSocketResponse(protocols=("echo.v2", "echo.v1"), autoping=False, compress=True, max_msg_size=0)
        await ws.prepare(request)
        stats = self.stats
        stats["ws_open"] += 1
        stats["ws_total"] += 1
        try:
            for i in range(int(request.query.get("push", "0"))):
                await ws.send_str(f"push {i}")
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    text = msg.data
                    if text.startswith("x_close "):
                        await ws.close(code=int(text.split()[1]), message=b"bye")
                        break
                    if text.startswith("x_push "):
                        for i in range(int(text.split()[1])):
                            await ws.send_str(f"push {i}")
                    elif text == "x_ping":
                        await ws.ping(b"from-backend")
                    elif text == "x_info":
                        info = {"protocol": ws.ws_protocol, "compress": ws.compress, "headers": dict(request.headers)}
                        await ws.send_str(_dumps(info))
                    else:
                        await ws.send_str(text)
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
                elif msg.type == WSMsgType.PING:
                    await ws.pong(msg.data)
                elif msg.type == WSMsgType.PONG:
                    await ws.send_str("pong:" + msg.data.decode("utf-8", "replace"))
        finally:
            stats["ws_open"] -= 1
            self.ws_close_codes.append(ws.close_code)
        return ws

    async def voices(self, request: web.Request) -> web.Response:
        """A TTS server's voice list (as kokoro-fastapi and speaches answer it), saying how it was asked."""
        model = request.query.get("model")
        if request.method == "POST":
            got = await self._read_body(request)
            if isinstance(got, web.Response):
                return got
            model = got[1].get("model", model)
        return _json(
            {"voices": ["alloy", "echo"], "model": model, "x_method": request.method, "x_path": request.path_qs}
        )

    async def not_found(self, request: web.Request) -> web.Response:
        error = {"message": f"no route for {request.method} {request.path}", "type": "not_found"}
        # x_raw_path: the target as it came, still percent-encoded
        return _json({"error": error, "x_raw_path": request.raw_path}, status=404)


# -- process-level behaviours ---------------------------------------------------


def _write_vram_state(pid: int, mib: int, devices: list[int] | None = None) -> None:
    """Claim ``mib`` on each GPU in ``devices`` (default GPU 0) in the NVML stub's state."""
    state_dir = os.environ.get("SWAPD_STUB_NVML_STATE")
    if not state_dir or mib <= 0:
        return
    os.makedirs(state_dir, exist_ok=True)
    for device in devices or [0]:
        path = os.path.join(state_dir, str(pid) if device == 0 else f"{pid}@{device}")
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(str(mib))
        os.replace(tmp, path)


def _fork_child(setsid: bool) -> int:
    """Start a long-sleeping child that outlives us (no death signal is set).

    It inherits stdout/stderr (like a real server's helper process would), so it
    keeps any output pipe open after this process dies.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(100000)"],
        stdin=subprocess.DEVNULL,
        start_new_session=setsid,  # setsid() in the child before exec
    )
    return child.pid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m swapd.fake_backend", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model-id", default="fake", help="model name echoed when the request has none")
    p.add_argument("--load-delay", type=float, default=0.0, help="seconds /health answers 503 after start")
    p.add_argument("--chunks", type=int, default=5, help="content chunks per response (max_tokens overrides)")
    p.add_argument("--interval", type=float, default=0.0, help="seconds between streaming chunks")
    p.add_argument("--ignore-sigterm", action="store_true", help="ignore SIGTERM (needs SIGKILL)")
    p.add_argument("--crash-after-chunks", type=int, default=None, help="os._exit(3) after N streamed chunks")
    p.add_argument("--exit-at-start", type=int, default=None, metavar="CODE", help="exit with CODE before listening")
    p.add_argument("--fork-child", action="store_true", help="start a child process that outlives this one")
    p.add_argument("--fork-child-setsid", action="store_true", help="the forked child runs in its own session")
    p.add_argument("--log-lines", type=int, default=0, help="print N lines to stdout at startup")
    p.add_argument("--exit-after", type=float, default=None, help="exit with code 4 after SECONDS")
    p.add_argument("--vram-mib", type=int, default=0, help="VRAM (MiB) reported via $SWAPD_STUB_NVML_STATE")
    p.add_argument(
        "--vram-device",
        type=int,
        action="append",
        default=None,
        help="GPU of that memory (repeatable; default 0)",
    )
    p.add_argument("--vram-grow-mib", type=int, default=0, help="claim this much more VRAM after --vram-grow-after")
    p.add_argument("--vram-grow-after", type=float, default=1.0, help="seconds after listening (see --vram-grow-mib)")
    p.add_argument("--quiet", action="store_true", help="don't log each request")
    p.add_argument(
        "--cors-echo", action="store_true", help="send llama-server's CORS headers (Origin echoed) on every answer"
    )
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes, like llama-server"
    )
    # llama-server's model flags, accepted (and shown by /x/argv) so a modelsDir cmd can run this server
    p.add_argument("-m", "--model", default=None, metavar="PATH", help="a model file, as llama-server's (unread)")
    p.add_argument("--mmproj", default=None, metavar="PATH", help="a projector file, as llama-server's (unread)")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    backend = FakeBackend(args)
    runner = web.AppRunner(backend.make_app(), access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    _out(f"fake_backend: listening on {args.host}:{args.port} pid {os.getpid()}")
    if args.vram_grow_mib > 0:
        grown = args.vram_mib + args.vram_grow_mib
        asyncio.get_running_loop().call_later(
            args.vram_grow_after, _write_vram_state, os.getpid(), grown, args.vram_device
        )

    if args.exit_after is not None:

        def _exit_now() -> None:
            _out(f"fake_backend: exiting after {args.exit_after}s with code 4")
            os._exit(4)

        asyncio.get_running_loop().call_later(max(0.0, args.exit_after), _exit_now)

    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.exit_at_start is not None:
        sys.stderr.write(f"fake_backend: exiting at startup with code {args.exit_at_start}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(args.exit_at_start)
    if args.log_lines > 0:
        sys.stdout.write("".join(f"fake_backend: log line {i}\n" for i in range(args.log_lines)))
        sys.stdout.flush()
    _write_vram_state(os.getpid(), args.vram_mib, args.vram_device)
    if args.fork_child or args.fork_child_setsid:
        # Before SIG_IGN below, so the child keeps default signal dispositions.
        child_pid = _fork_child(args.fork_child_setsid)
        _write_vram_state(child_pid, args.vram_mib, args.vram_device)
        _out(f"fake_backend: child pid {child_pid}")
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
