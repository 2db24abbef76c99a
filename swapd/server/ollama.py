"""Ollama's API on swapd's OpenAI-compatible backends.

Clients that speak only Ollama (IDE plugins, desktop chat apps, Home
Assistant, the ``ollama`` Python and JS libraries) reach every model swapd
serves, with its swapping and VRAM accounting:

- ``/api/chat``, ``/api/generate``, ``/api/embed`` and ``/api/embeddings``
  are translated into ``/v1/chat/completions``, ``/v1/completions`` and
  ``/v1/embeddings`` requests, and the answers back into Ollama's shapes.
  Streams become NDJSON line by line as the backend's events arrive: nothing
  is held back beyond one event, and a tool call's pieces until it is whole.
- ``/api/tags``, ``/api/ps`` and ``/api/show`` describe the configured
  models from their config and their GGUF files (``swapd.modelinfo``), and
  the running ones from the scheduler and NVML. They never start a model.
- Ollama's model store (pull, push, create, copy, delete, blobs) has no
  meaning here; those routes answer 501 with the reason.

Errors use Ollama's shape, ``{"error": "..."}`` (``swapd.server.errors``
renders it for these paths). Each translated request is one request for
telemetry, under its Ollama path, with tokens read from the backend's own
``usage``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from swapd.backend import State
from swapd.config import ModelConfig, PeerConfig
from swapd.logging import get_logger
from swapd.modelinfo import ModelFacts, capabilities_list, facts
from swapd.server import gpu_api
from swapd.server.dialects import OLLAMA_PORTS
from swapd.server.errors import ClientError
from swapd.server.keys import RUNTIME
from swapd.server.relay import UpstreamError, keep_body_ends, open_upstream
from swapd.server.routing import (
    begin_record,
    lease_model,
    model_headers,
    own_key_headers,
    remote_url,
    resolve,
    rewrite_body,
    trace_headers,
)
from swapd.server.upstream import UpstreamFault

log = get_logger("swapd.ollama")

MIB = 1024 * 1024
# What Ollama's own store would do; swapd serves the models its config names.
STORE_ROUTES = (
    ("POST", "/api/pull"),
    ("POST", "/api/push"),
    ("POST", "/api/create"),
    ("POST", "/api/copy"),
    ("DELETE", "/api/delete"),
    ("HEAD", "/api/blobs/{digest}"),
    ("POST", "/api/blobs/{digest}"),
)
STORE_REFUSAL = (
    "swapd does not manage model files: Ollama's {op} has no meaning here. swapd serves the models its "
    "config names (config.yaml models, or a modelsDir folder of GGUF files); add or change them there"
)
# Ollama's option names that OpenAI-compatible servers (llama-server, vLLM) take under the same name
_SAME_NAME_OPTIONS = (
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "min_p",
    "typical_p",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
    "repeat_last_n",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
)
FOREVER = "9999-12-31T23:59:59Z"  # expires_at of a model with no TTL (Ollama shows a far date too)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# -- small pieces ------------------------------------------------------------


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _rfc3339(epoch: float | None) -> str:
    if epoch is None:
        epoch = time.time()
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _mtime(path: str | None) -> float | None:
    try:
        return os.path.getmtime(path) if path else None
    except OSError:
        return None


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's ``keep_alive``: seconds as a number, or a Go duration ("5m", "1h30m", "-1"). None when absent.

    A negative value keeps the model loaded; 0 stops it once the reply is done.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ClientError(400, f"invalid keep_alive {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        parts = _DURATION.findall(body)
        if parts and "".join(n + u for n, u in parts) == body:
            return sign * sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    raise ClientError(400, f'invalid keep_alive {value!r}: use seconds or a duration such as "5m"')


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def _image_part(data: Any) -> dict[str, Any]:
    """An Ollama base64 image as an OpenAI image content part (a data URL with the sniffed type)."""
    if not isinstance(data, str) or not data:
        raise ClientError(400, "images must be base64 strings")
    text = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        head = base64.b64decode(text[:32] + "=" * (-len(text[:32]) % 4), validate=False)
    except (binascii.Error, ValueError):
        raise ClientError(400, "images must be base64 strings") from None
    mime = "image/png"
    if head.startswith(b"\xff\xd8"):
        mime = "image/jpeg"
    elif head.startswith((b"GIF87a", b"GIF89a")):
        mime = "image/gif"
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        mime = "image/webp"
    elif head.startswith(b"BM"):
        mime = "image/bmp"
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{text}"}}


def _openai_message(msg: Any, calls: dict[str, str]) -> dict[str, Any]:
    if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
        raise ClientError(400, "each message must be an object with a role")
    role = msg["role"]
    content = msg.get("content") or ""
    if not isinstance(content, str):
        raise ClientError(400, "message content must be a string")
    out: dict[str, Any] = {"role": role}
    images = msg.get("images") or []
    if not isinstance(images, list):
        raise ClientError(400, "images must be a list of base64 strings")
    if images:
        out["content"] = [{"type": "text", "text": content}, *map(_image_part, images)]
    else:
        out["content"] = content
    if msg.get("thinking") and role == "assistant":
        out["reasoning_content"] = msg["thinking"]
    tool_calls = msg.get("tool_calls")
    if tool_calls:
        converted = []
        for call in tool_calls:
            fn = (call or {}).get("function") or {}
            call_id = f"call_{len(calls)}"
            calls[fn.get("name", "")] = call_id
            args = fn.get("arguments", {})
            converted.append(
                {
                    "id": call_id,
                    "type": "function",
                    "function": {
                        "name": fn.get("name", ""),
                        "arguments": args if isinstance(args, str) else json.dumps(args),
                    },
                }
            )
        out["tool_calls"] = converted
    if role == "tool":
        name = msg.get("tool_name") or msg.get("name") or ""
        if name:
            out["name"] = name
        out["tool_call_id"] = calls.get(name, "call_0")
    return out


def openai_options(data: dict[str, Any], out: dict[str, Any]) -> None:
    """Ollama's ``options`` and ``format`` onto an OpenAI request body."""
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise ClientError(400, "options must be an object")
    for name in _SAME_NAME_OPTIONS:
        if options.get(name) is not None:
            out[name] = options[name]
    if options.get("stop") is not None:
        out["stop"] = options["stop"]
    num_predict = options.get("num_predict")
    if isinstance(num_predict, int) and not isinstance(num_predict, bool) and num_predict >= 0:
        out["max_tokens"] = num_predict  # -1 (until done) and -2 (fill the context) set no limit
    fmt = data.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise ClientError(400, f'invalid format {fmt!r}: use "json" or a JSON schema')


def chat_body(data: dict[str, Any], stream: bool) -> dict[str, Any]:
    messages = data.get("messages") or []
    if not isinstance(messages, list):
        raise ClientError(400, "messages must be a list")
    calls: dict[str, str] = {}
    out: dict[str, Any] = {"model": data["model"], "messages": [_openai_message(m, calls) for m in messages]}
    if data.get("tools"):
        out["tools"] = data["tools"]
    openai_options(data, out)
    _stream_flags(out, stream)
    return out


def generate_body(data: dict[str, Any], stream: bool) -> tuple[str, dict[str, Any]]:
    """(the OpenAI path, its body) for /api/generate: chat semantics, or a plain completion when ``raw``."""
    prompt = data.get("prompt") or ""
    if not isinstance(prompt, str):
        raise ClientError(400, "prompt must be a string")
    out: dict[str, Any] = {"model": data["model"]}
    if data.get("raw"):
        out["prompt"] = prompt
        path = "/v1/completions"
    else:
        messages: list[dict[str, Any]] = []
        if isinstance(data.get("system"), str) and data["system"]:
            messages.append({"role": "system", "content": data["system"]})
        messages.append(_openai_message({"role": "user", "content": prompt, "images": data.get("images")}, {}))
        out["messages"] = messages
        path = "/v1/chat/completions"
    openai_options(data, out)
    _stream_flags(out, stream)
    return path, out


def _stream_flags(out: dict[str, Any], stream: bool) -> None:
    out["stream"] = stream
    if stream:
        out["stream_options"] = {"include_usage": True}  # eval_count comes from the backend's own count


# -- answers: OpenAI -> Ollama -------------------------------------------------


class Translator:
    """Turns an OpenAI chat or completion answer, whole or streamed, into Ollama's objects.

    ``feed`` takes the backend's body bytes as they arrive and returns the
    NDJSON lines ready to send (possibly none); ``finish`` returns the last
    line, with ``done: true`` and the counts and durations.
    """

    def __init__(self, model: str, kind: str, t0: float, load_s: float) -> None:
        self.model = model
        self.kind = kind  # "chat", "generate" (chat semantics) or "raw" (a plain completion)
        self.t0 = t0
        self.load_s = load_s
        self._buffer = b""
        self.usage: dict[str, Any] | None = None
        self.timings: dict[str, Any] | None = None
        self.finish_reason = ""
        self.error = ""
        self.ended = False
        self._tools: dict[int, dict[str, str]] = {}
        self._first = 0.0
        self._chunks = 0

    # one object per content piece
    def _piece(self, content: str = "", thinking: str = "", tool_calls: list | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": now_rfc3339()}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            out["message"] = message
        else:
            out["response"] = content
            if thinking:
                out["thinking"] = thinking
        out["done"] = False
        return out

    def feed(self, data: bytes) -> list[bytes]:
        """Lines for the stream's events in ``data`` (a partial event waits for the rest)."""
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        out: list[bytes] = []
        for raw in lines:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.ended = True
                continue
            try:
                event = json.loads(payload)
            except ValueError:
                continue
            obj = self.event(event)
            if obj is not None:
                out.append(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        return out

    def event(self, event: Any) -> dict[str, Any] | None:
        """One streamed event; the Ollama object to send for it, if any."""
        if not isinstance(event, dict):
            return None
        if event.get("error"):
            err = event["error"]
            self.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            return None
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        if isinstance(event.get("timings"), dict):
            self.timings = event["timings"]
        choices = event.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            return None
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        if self.kind == "raw":
            content, thinking = choice.get("text") or "", ""
        else:
            delta = choice.get("delta") or {}
            content = delta.get("content") or ""
            thinking = delta.get("reasoning_content") or delta.get("reasoning") or ""
            for call in delta.get("tool_calls") or []:
                slot = self._tools.setdefault(call.get("index", len(self._tools)), {"name": "", "arguments": ""})
                fn = call.get("function") or {}
                slot["name"] += fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
        if not content and not thinking:
            return None
        if not self._first:
            self._first = time.monotonic()
        self._chunks += 1
        return self._piece(content, thinking)

    def tool_calls(self) -> list[dict[str, Any]]:
        calls = []
        for _, slot in sorted(self._tools.items()):
            try:
                args = json.loads(slot["arguments"]) if slot["arguments"].strip() else {}
            except ValueError:
                args = {}
                log.warning("ollama.tool_arguments_not_json", model=self.model, arguments=slot["arguments"][:200])
            calls.append({"function": {"name": slot["name"], "arguments": args if isinstance(args, dict) else {}}})
        return calls

    def pending_tools(self) -> bytes:
        """The tool calls, whole, as one line before the final one (Ollama sends them in a message)."""
        calls = self.tool_calls()
        if not calls:
            return b""
        return json.dumps(self._piece(tool_calls=calls), separators=(",", ":")).encode() + b"\n"

    def final(self) -> dict[str, Any]:
        out = self._piece()
        out["done"] = True
        reason = self.finish_reason or "stop"
        out["done_reason"] = "stop" if reason == "tool_calls" else reason
        out.update(self.stats())
        return out

    def stats(self) -> dict[str, Any]:
        total = time.monotonic() - self.t0
        usage = self.usage or {}
        timings = self.timings or {}
        prompt_n = usage.get("prompt_tokens", timings.get("prompt_n"))
        eval_n = usage.get("completion_tokens", timings.get("predicted_n", self._chunks if self._chunks else None))
        out: dict[str, Any] = {"total_duration": _ns(total), "load_duration": _ns(self.load_s)}
        if isinstance(prompt_n, int):
            out["prompt_eval_count"] = prompt_n
        if isinstance(timings.get("prompt_ms"), (int, float)):
            out["prompt_eval_duration"] = _ns(timings["prompt_ms"] / 1000)
        if isinstance(eval_n, int):
            out["eval_count"] = eval_n
        if isinstance(timings.get("predicted_ms"), (int, float)):
            out["eval_duration"] = _ns(timings["predicted_ms"] / 1000)
        elif self._first:
            out["eval_duration"] = _ns(time.monotonic() - self._first)
        return out

    def whole(self, answer: dict[str, Any]) -> dict[str, Any]:
        """A whole (non-streamed) OpenAI answer as one Ollama object."""
        if isinstance(answer.get("usage"), dict):
            self.usage = answer["usage"]
        if isinstance(answer.get("timings"), dict):
            self.timings = answer["timings"]
        choice = (answer.get("choices") or [{}])[0] or {}
        self.finish_reason = choice.get("finish_reason") or ""
        if self.kind == "raw":
            content, thinking, calls = choice.get("text") or "", "", []
        else:
            message = choice.get("message") or {}
            content = message.get("content") or ""
            thinking = message.get("reasoning_content") or ""
            for i, call in enumerate(message.get("tool_calls") or []):
                fn = call.get("function") or {}
                self._tools[i] = {"name": fn.get("name") or "", "arguments": fn.get("arguments") or ""}
            calls = self.tool_calls()
        out = self._piece(content, thinking, calls or None)
        out["done"] = True
        reason = self.finish_reason or "stop"
        out["done_reason"] = "stop" if reason == "tool_calls" else reason
        out.update(self.stats())
        return out


# -- the exchange with a backend ----------------------------------------------


def _read_object(request: web.Request, raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError):
        raise ClientError(400, "invalid JSON in the request body") from None
    if not isinstance(data, dict):
        raise ClientError(400, "the request body must be a JSON object")
    return data


async def _body(request: web.Request) -> dict[str, Any]:
    rt = request.app[RUNTIME]
    limit = rt.config.client_limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ClientError(413, f"request body too large (limit {limit} bytes)")
    raw = await request.read()
    return _read_object(request, raw)


def _target(request: web.Request, data: dict[str, Any], key: str = "model") -> ModelConfig | tuple[PeerConfig, str]:
    name = data.get(key) or (data.get("name") if key == "model" else None)
    if not isinstance(name, str) or not name:
        raise ClientError(400, "model is required")
    data["model"] = name
    try:
        return resolve(request, name)[1]  # the active profile's pin and a selector apply first
    except ClientError as exc:
        if exc.status != 404:
            raise
        raise ClientError(404, f"model '{name}' not found", "model_not_found") from None


def _headers(request: web.Request, extra: dict[str, str] | None) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json", "Accept": "*/*"})
    peer = request.remote
    if peer:
        headers["X-Forwarded-For"] = peer
    if extra:
        headers.update(extra)
    return headers


async def exchange(
    request: web.Request,
    target: ModelConfig | tuple[PeerConfig, str],
    path: str,
    body: dict[str, Any],
    *,
    stream: bool,
    kind: str,
    keep_alive: float | None,
    respond: Callable[..., Any] | None = None,
) -> web.StreamResponse:
    """Send one translated request to the model's backend and answer the client in Ollama's shape.

    ``kind`` is "chat", "generate", "raw" (the two answer shapes) or "embed"
    (``respond`` turns the backend's JSON into the answer).
    """
    rt = request.app[RUNTIME]
    t0 = time.monotonic()
    requested = body.get("model", "")
    name = request.get("swapd.model_name", requested)  # after a pin or a selector (routing.resolve)
    if name != requested:
        body["model"] = name
    lease = None
    if isinstance(target, ModelConfig):
        model_id = label = target.id
        rewrite_body(body, name, target.use_model_name, target.filters)
    else:
        peer, model_name = target
        model_id, label = f"{peer.id}/{model_name}", f"{peer.id} (peer)"
        rewrite_body(body, name, model_name if model_name != name else "", peer.filters)
    payload = json.dumps(body).encode()
    record = begin_record(
        request, rt, model_id, requested, payload, t0, "" if isinstance(target, ModelConfig) else target[0].id
    )
    if record is not None:
        record.client_stream = stream
    status, outcome = 502, "client_disconnected"
    try:
        if isinstance(target, ModelConfig) and target.remote:  # always ready, elsewhere: no lease
            url, timeouts, extra = remote_url(target.proxy, path), target.timeouts, model_headers(target)
        elif isinstance(target, ModelConfig):
            lease = await lease_model(rt, target.id, record, t0)
            backend = lease.backend.model
            url, timeouts = backend.proxy.rstrip("/") + path, backend.timeouts
            extra = model_headers(backend)
        else:
            peer = target[0]
            url, timeouts, extra = peer.proxy + path, None, own_key_headers(peer.api_key)
        load_s = time.monotonic() - t0
        if record is not None:
            extra = trace_headers(rt, record, extra)
        headers = _headers(request, extra)  # built afresh: the client's own credential never goes along
        upstream = await open_upstream(
            rt.pool, rt.session, "POST", url, payload, headers, label, timeouts=timeouts, content_length=len(payload)
        )
        status = upstream.status
        if record is not None:
            record.status = upstream.status
            record.content_type = upstream.headers.get("Content-Type", "")
            record.stream = record.content_type.startswith("text/event-stream")
        response = await _answer(request, upstream, model_id, requested, kind, stream, t0, load_s, record, respond)
        status = response.status
        outcome = response.get("swapd.error", "ok")
        return response
    except UpstreamError as exc:
        outcome, status = str(exc), exc.status
        raise
    except ClientError as exc:
        outcome, status = exc.message, exc.status
        raise
    finally:
        if lease is not None:
            lease.release(keep_alive)
        request["swapd.logged"] = True
        request["swapd.status"] = status
        log.info(
            "request",
            model=model_id,
            method=request.method,
            path=request.path,
            status=status if outcome != "client_disconnected" else 499,
            outcome=outcome,
            total_s=round(time.monotonic() - t0, 4),
        )


async def _answer(
    request, upstream, model_id, requested, kind, stream, t0, load_s, record, respond
) -> web.StreamResponse:
    translator = Translator(requested, kind, t0, load_s)
    first = 0.0
    head = b""
    pieces: list[bytes] = []  # the backend's last pieces, for telemetry's token count
    clean = False
    try:
        if upstream.status >= 400:
            body = await upstream.read()
            clean = True
            raise ClientError(upstream.status, f"model {model_id}: {_upstream_message(body)}", "backend_error")
        event_stream = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        if respond is not None or not stream or not event_stream:
            try:
                body = await upstream.read()
            except UpstreamFault as exc:
                raise UpstreamError(502, f"model {model_id}: backend broke off its response: {exc}") from exc
            clean = True
            first, head, pieces = time.monotonic(), body, [body]
            try:
                answer = json.loads(body)
            except ValueError:
                raise UpstreamError(502, f"model {model_id}: backend answered with something other than JSON") from None
            out = respond(answer, translator) if respond is not None else translator.whole(answer)
            if stream and respond is None:  # the backend answered whole although asked to stream: one line
                line = json.dumps(out, separators=(",", ":")).encode() + b"\n"
                return web.Response(body=line, content_type="application/x-ndjson")
            return web.json_response(out)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        try:
            while chunk := await upstream.read_chunk():
                if not first:
                    first, head = time.monotonic(), chunk
                pieces.append(chunk)
                if len(pieces) > 4:
                    del pieces[0]
                lines = translator.feed(chunk)
                if lines:
                    await response.write(b"".join(lines))
            if translator.error:
                await response.write(json.dumps({"error": translator.error}).encode() + b"\n")
                response["swapd.error"] = f"backend error: {translator.error}"
            else:
                tail = translator.pending_tools() + json.dumps(translator.final(), separators=(",", ":")).encode()
                await response.write(tail + b"\n")
            await response.write_eof()
            clean = True
        except UpstreamFault as exc:
            message = f"model {model_id}: backend failed mid-stream: {exc}"
            try:
                await response.write(json.dumps({"error": message}).encode() + b"\n")
            except (ConnectionError, RuntimeError):
                pass
            if request.transport is not None:
                request.transport.close()
            response["swapd.error"] = message
        return response
    finally:
        if clean and not (record is not None and record.stream):
            upstream.release()
        else:
            upstream.close()  # a cut stream: closing the connection is how the backend learns to stop
        if record is not None:
            keep_body_ends(record, first, head, b"".join(pieces))


def _upstream_message(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body[:500].decode("utf-8", "replace").strip() or "backend error"
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    if err:
        return str(err)
    return json.dumps(doc)[:500]


# -- handlers: inference -------------------------------------------------------


async def handle_chat(request: web.Request) -> web.StreamResponse:
    data = await _body(request)
    target = _target(request, data)
    stream = data.get("stream", True) is not False
    keep_alive = parse_keep_alive(data.get("keep_alive"))
    if not data.get("messages"):
        return await _load_only(request, target, data, "chat", keep_alive)
    return await exchange(
        request,
        target,
        "/v1/chat/completions",
        chat_body(data, stream),
        stream=stream,
        kind="chat",
        keep_alive=keep_alive,
    )


async def handle_generate(request: web.Request) -> web.StreamResponse:
    data = await _body(request)
    target = _target(request, data)
    stream = data.get("stream", True) is not False
    keep_alive = parse_keep_alive(data.get("keep_alive"))
    if not data.get("prompt") and not data.get("images"):
        return await _load_only(request, target, data, "generate", keep_alive)
    path, body = generate_body(data, stream)
    kind = "raw" if data.get("raw") else "generate"
    return await exchange(request, target, path, body, stream=stream, kind=kind, keep_alive=keep_alive)


async def _load_only(request, target, data, kind: str, keep_alive: float | None) -> web.Response:
    """An empty prompt: load the model (or, with keep_alive 0, unload it), as Ollama does."""
    rt = request.app[RUNTIME]
    name = data["model"]
    t0 = time.monotonic()
    if not isinstance(target, ModelConfig) or target.remote:
        reason = "load"  # a peer's or remote model's loading is not swapd's to do
    elif keep_alive == 0:
        await rt.scheduler.unload([target.id])
        reason = "unload"
    else:
        lease = await lease_model(rt, target.id, None, t0)
        lease.release(keep_alive)
        reason = "load"
    out: dict[str, Any] = {"model": name, "created_at": now_rfc3339()}
    if kind == "chat":
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    out.update(done=True, done_reason=reason)
    if reason == "load":
        out["load_duration"] = _ns(time.monotonic() - t0)
    return web.json_response(out)


async def handle_embed(request: web.Request) -> web.StreamResponse:
    data = await _body(request)
    target = _target(request, data)
    legacy = request.path == "/api/embeddings"
    value = data.get("prompt") if legacy else data.get("input")
    if legacy:
        if not isinstance(value, str):
            raise ClientError(400, "prompt must be a string")
    elif not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
        raise ClientError(400, "input must be a string or a list of strings")
    body: dict[str, Any] = {"model": data["model"], "input": value}
    options = data.get("options") or {}
    if isinstance(options, dict) and isinstance(options.get("dimensions"), int):
        body["dimensions"] = options["dimensions"]
    if isinstance(data.get("dimensions"), int):
        body["dimensions"] = data["dimensions"]

    def respond(answer: dict[str, Any], translator: Translator) -> dict[str, Any]:
        rows = sorted(answer.get("data") or [], key=lambda d: d.get("index", 0))
        vectors = [row.get("embedding") or [] for row in rows]
        if legacy:
            return {"embedding": vectors[0] if vectors else []}
        out: dict[str, Any] = {"model": data["model"], "embeddings": vectors}
        stats = {"usage": answer.get("usage")} if isinstance(answer.get("usage"), dict) else {}
        translator.usage = stats.get("usage")
        counts = translator.stats()
        out["total_duration"] = counts["total_duration"]
        out["load_duration"] = counts["load_duration"]
        if "prompt_eval_count" in counts:
            out["prompt_eval_count"] = counts["prompt_eval_count"]
        return out

    return await exchange(
        request,
        target,
        "/v1/embeddings",
        body,
        stream=False,
        kind="embed",
        keep_alive=parse_keep_alive(data.get("keep_alive")),
        respond=respond,
    )


# -- handlers: what is there ----------------------------------------------------


async def _facts_for(models: list[ModelConfig]) -> dict[str, ModelFacts]:
    """GGUF facts for these models, read off the event loop (cached by the file's size and mtime)."""
    if not models:
        return {}
    found = await asyncio.to_thread(lambda: [facts(m) for m in models])
    return {m.id: f for m, f in zip(models, found, strict=True)}


def _digest(model: ModelConfig, f: ModelFacts) -> str:
    """A stable id for the model's file (Ollama's is the blob's sha256; hashing a multi-GB file per list is not)."""
    basis = f"{f.path}|{f.size_bytes}|{f.modified}" if f.path else f"{model.id}|{' '.join(model.cmd)}"
    return hashlib.sha256(basis.encode()).hexdigest()


def details(f: ModelFacts | None) -> dict[str, Any]:
    family = f.family if f is not None else ""
    return {
        "parent_model": "",
        "format": "gguf" if f is not None and f.path else "",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": f.parameter_size if f is not None else "",
        "quantization_level": f.quantization if f is not None else "",
    }


def _peer_entry(name: str, modified: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": modified,
        "size": 0,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": details(None),
    }


async def handle_tags(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    config = rt.config
    listed = [mc for mc in config.models.values() if not mc.unlisted]
    found = await _facts_for(listed)
    started = _rfc3339(_mtime(config.path))
    out = []
    for mc in listed:
        f = found[mc.id]
        entry = {
            "name": mc.id,
            "model": mc.id,
            "modified_at": _rfc3339(f.modified) if f.modified else started,
            "size": f.size_bytes or 0,
            "digest": _digest(mc, f),
            "details": details(f),
        }
        out.append(entry)
        if config.include_aliases_in_list:
            out.extend({**entry, "name": alias, "model": alias} for alias in mc.aliases)
    for peer in config.peers.values():
        out.extend(_peer_entry(f"{peer.id}/{m}", started) for m in peer.models)
    out.sort(key=lambda e: e["name"])
    return web.json_response({"models": out})


async def handle_ps(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    scheduler = rt.scheduler
    running = [b.model for b in rt.backends.values() if b.state is State.READY]
    found = await _facts_for(running)
    usage = await gpu_api.model_usage(request.app)
    now = time.time()
    out = []
    for mc in sorted(running, key=lambda m: m.id):
        f = found[mc.id]
        vram = usage.get(mc.id, {}).get("vram_mib")
        remaining = scheduler.ttl_remaining(mc.id)
        if remaining is not None:
            expires = _rfc3339(now + remaining)
        elif scheduler.in_flight(mc.id) and mc.ttl > 0:
            expires = _rfc3339(now + mc.ttl)  # busy: the clock starts when the last request ends
        else:
            expires = FOREVER
        footprint = scheduler.footprints.footprint(mc)
        size = int(vram * MIB) if vram else int((footprint.total_mib or 0) * MIB) or (f.size_bytes or 0)
        entry: dict[str, Any] = {
            "name": mc.id,
            "model": mc.id,
            "size": size,
            "digest": _digest(mc, f),
            "details": details(f),
            "expires_at": expires,
        }
        if vram is not None:
            entry["size_vram"] = int(vram * MIB)
        if f.context_length:
            entry["context_length"] = f.context_length
        out.append(entry)
    return web.json_response({"models": out})


async def handle_show(request: web.Request) -> web.Response:
    data = await _body(request)
    target = _target(request, data)
    if not isinstance(target, ModelConfig):
        peer, name = target
        return web.json_response(
            {
                "details": details(None),
                "model_info": {},
                "capabilities": ["completion"],
                "modelfile": "",
                "parameters": "",
                "template": "",
                "license": "",
                "modified_at": _rfc3339(None),
                "remote_host": peer.proxy,
                "remote_model": name,
            }
        )
    f = (await _facts_for([target]))[target.id]
    info = dict(f.metadata)
    if f.architecture:
        info.setdefault("general.architecture", f.architecture)
    if f.parameter_count:
        info.setdefault("general.parameter_count", f.parameter_count)
    if f.context_length and f.architecture:
        info.setdefault(f"{f.architecture}.context_length", f.trained_context or f.context_length)
    modelfile = f"# served by swapd\nFROM {f.path}\n" if f.path else "# served by swapd (no GGUF file in its cmd)\n"
    return web.json_response(
        {
            "license": "",
            "modelfile": modelfile,
            "parameters": "",
            "template": f.chat_template or "",
            "details": details(f),
            "model_info": info,
            "capabilities": capabilities_list(f),
            "modified_at": _rfc3339(f.modified),
        }
    )


def _store_handler(op: str):
    async def handle(request: web.Request) -> web.Response:
        raise ClientError(501, STORE_REFUSAL.format(op=op), "not_supported")

    return handle


def install(app: web.Application) -> None:
    app[OLLAMA_PORTS] = set()  # --ollama-listen's ports, filled in by swapd.cli when they are bound
    r = app.router
    r.add_get("/api/tags", handle_tags)
    r.add_get("/api/ps", handle_ps)
    r.add_post("/api/show", handle_show)
    r.add_post("/api/chat", handle_chat)
    r.add_post("/api/generate", handle_generate)
    r.add_post("/api/embed", handle_embed)
    r.add_post("/api/embeddings", handle_embed)
    for method, path in STORE_ROUTES:
        op = path.split("/")[2]
        r.add_route(method, path, _store_handler(f"/api/{op}"))
