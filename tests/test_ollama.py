"""Ollama's API, driven by the official ``ollama`` Python client against a real swapd and fake backends.

What a client gets back is checked through the client's own types (it
validates every answer with pydantic), and what the backend received is read
back from the fake backend's ``/x/last``, so the translation is checked at
both ends. ``Translator`` is also fed hand-made streams, cut at awkward
places.
"""

from __future__ import annotations

import base64
import http.client
import json
import time
from datetime import UTC, datetime

import pytest
from helpers import backend_stats, free_port, model, wait_until

from swapd.server.ollama import Translator, parse_keep_alive

ollama = pytest.importorskip("ollama", reason="the ollama client is a test dependency (pip install -e '.[test]')")

PNG_1PX = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
    )
).decode()


def client(s) -> ollama.Client:
    return ollama.Client(host=s.base, timeout=30)


def last_request(s, model_id: str) -> dict:
    """What the model's fake backend received last (path and JSON body)."""
    port = s.running()[model_id]["proxy"].rsplit(":", 1)[1]
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=5)
    conn.request("GET", "/x/last")
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out


def raw(s, method: str, path: str, body: bytes | None = None, port: int | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port or s.port, timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body is not None else {})
    resp = conn.getresponse()
    out = resp.status, dict(resp.getheaders()), resp.read()
    conn.close()
    return out


@pytest.fixture
def s(swapd):
    return swapd(
        {
            "chat": model("--chunks", "6", "--interval", "0.05", ttl=300, aliases=["chat-alias"]),
            "emb": model(),
            "locked": model("--api-key", "backend-secret", unlisted=True),
        }
    )


def test_list_and_ps(s):
    c = client(s)
    names = [m.model for m in c.list().models]
    assert names == ["chat", "emb"]
    assert c.ps().models == []
    c.chat(model="chat", messages=[{"role": "user", "content": "hi"}])
    ps = c.ps().models
    assert [m.model for m in ps] == ["chat"]
    expires = ps[0].expires_at
    left = (expires - datetime.now(UTC)).total_seconds()
    assert 250 < left <= 301, expires  # from the model's ttl: 300
    # listing and ps never start or keep anything alive
    assert "emb" not in s.running()


def test_chat_whole_and_streamed(s):
    c = client(s)
    whole = c.chat(model="chat", messages=[{"role": "user", "content": "hi"}], stream=False)
    assert whole.message.role == "assistant"
    assert whole.message.content.split() == [f"tok{i}" for i in range(6)]
    assert whole.done and whole.done_reason == "stop"
    assert whole.eval_count == 6 and whole.prompt_eval_count >= 1
    assert whole.total_duration > 0 and whole.load_duration > 0  # a cold start

    seen = []
    for part in c.chat(model="chat-alias", messages=[{"role": "user", "content": "hi"}], stream=True):
        seen.append((time.monotonic(), part))
    pieces = [p for _, p in seen if not p.done]
    assert [p.message.content for p in pieces] == [f"tok{i} " for i in range(6)]
    assert all(p.model == "chat-alias" for _, p in seen)  # the name the client used
    spread = seen[len(pieces) - 1][0] - seen[0][0]
    assert spread > 0.15, f"the pieces came together ({spread:.3f} s): the stream was buffered"
    final = seen[-1][1]
    assert final.done and final.done_reason == "stop" and final.message.content == ""
    assert final.eval_count == 6  # from the backend's usage, asked for with include_usage
    assert final.eval_duration > 0
    sent = last_request(s, "chat")
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["stream"] is True and sent["body"]["stream_options"] == {"include_usage": True}
    # with no "stream" key Ollama streams: NDJSON, one object a line
    status, headers, body = raw(s, "POST", "/api/chat", json.dumps(
        {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in body.splitlines()]
    assert [o["done"] for o in lines] == [False] * 6 + [True]


def test_options_format_tools_and_images_reach_the_backend(s):
    c = client(s)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    tools = [{"type": "function", "function": {"name": "weather", "description": "w", "parameters": {"type": "object"}}}]
    c.chat(
        model="chat",
        stream=False,
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is this?", "images": [PNG_1PX]},
        ],
        options={"temperature": 0.2, "top_p": 0.9, "top_k": 20, "seed": 7, "stop": ["###"], "num_predict": 4,
                 "repeat_penalty": 1.1},
        format=schema,
        tools=tools,
    )
    body = last_request(s, "chat")["body"]
    assert body["temperature"] == 0.2 and body["top_p"] == 0.9 and body["top_k"] == 20 and body["seed"] == 7
    assert body["stop"] == ["###"] and body["max_tokens"] == 4 and body["repeat_penalty"] == 1.1
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "format", "schema": schema}}
    assert body["tools"] == tools
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    parts = body["messages"][1]["content"]
    assert parts[0] == {"type": "text", "text": "what is this?"}
    assert parts[1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_1PX}}
    c.chat(model="chat", stream=False, messages=[{"role": "user", "content": "x"}], format="json",
           options={"num_predict": -1})
    body = last_request(s, "chat")["body"]
    assert body["response_format"] == {"type": "json_object"} and "max_tokens" not in body


def test_tool_calls_streamed_and_whole(s):
    c = client(s)
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    msgs = [{"role": "user", "content": "x_tool_call please"}]
    whole = c.chat(model="chat", messages=msgs, tools=tools, stream=False)
    assert [(t.function.name, dict(t.function.arguments)) for t in whole.message.tool_calls] == [
        ("weather", {"city": "Paris", "days": 3})
    ]
    parts = list(c.chat(model="chat", messages=msgs, tools=tools, stream=True))
    calls = [t for p in parts if p.message.tool_calls for t in p.message.tool_calls]
    assert [(t.function.name, dict(t.function.arguments)) for t in calls] == [("weather", {"city": "Paris", "days": 3})]
    assert parts[-1].done and parts[-1].done_reason == "stop"
    # the answer goes back as a tool message, matched to the call
    c.chat(model="chat", stream=False, tools=tools, messages=[
        *msgs,
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "weather"},
    ])
    sent = last_request(s, "chat")["body"]["messages"]
    call = sent[1]["tool_calls"][0]
    assert call["function"] == {"name": "weather", "arguments": json.dumps({"city": "Paris"})}
    assert sent[2] == {"role": "tool", "content": "sunny", "name": "weather", "tool_call_id": call["id"]}


def test_generate_chat_semantics_and_raw(s):
    c = client(s)
    out = c.generate(model="chat", prompt="Why is the sky blue?", system="be short", stream=False)
    assert out.response.split() == [f"tok{i}" for i in range(6)] and out.done
    sent = last_request(s, "chat")
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["messages"] == [
        {"role": "system", "content": "be short"},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    pieces = [p.response for p in c.generate(model="chat", prompt="go", raw=True, stream=True) if not p.done]
    assert pieces == [f"tok{i} " for i in range(6)]
    sent = last_request(s, "chat")
    assert sent["path"] == "/v1/completions" and sent["body"]["prompt"] == "go"


def test_empty_prompt_loads_and_keep_alive_zero_unloads(s):
    c = client(s)
    loaded = c.generate(model="chat", prompt="")
    assert loaded.done and loaded.done_reason == "load"
    assert s.running()["chat"]["state"] == "ready"
    gone = c.generate(model="chat", prompt="", keep_alive=0)
    assert gone.done_reason == "unload"
    wait_until(lambda: "chat" not in s.running(), timeout=10, message="the model to unload")
    loaded = c.chat(model="chat", messages=[])
    assert loaded.done_reason == "load" and s.running()["chat"]["state"] == "ready"


def test_keep_alive_overrides_the_ttl(s):
    c = client(s)
    c.chat(model="chat", messages=[{"role": "user", "content": "hi"}], keep_alive=0)
    wait_until(lambda: "chat" not in s.running(), timeout=10, message="keep_alive 0 to stop the model after the reply")
    c.chat(model="chat", messages=[{"role": "user", "content": "hi"}], keep_alive="1s")
    assert 0 < s.running()["chat"]["ttl_remaining"] <= 1.0
    wait_until(lambda: "chat" not in s.running(), timeout=10, message="keep_alive 1s to stop the model")
    c.chat(model="chat", messages=[{"role": "user", "content": "hi"}], keep_alive=-1)
    assert s.running()["chat"]["ttl_remaining"] is None
    assert c.ps().models[0].expires_at.year == 9999
    c.chat(model="chat", messages=[{"role": "user", "content": "hi"}])  # no keep_alive: the model's ttl again
    assert 290 < s.running()["chat"]["ttl_remaining"] <= 300


def test_embed_and_legacy_embeddings(s):
    c = client(s)
    out = c.embed(model="emb", input=["one", "two"])
    assert len(out.embeddings) == 2 and all(len(v) > 0 for v in out.embeddings)
    assert out.prompt_eval_count is not None
    sent = last_request(s, "emb")
    assert sent["path"] == "/v1/embeddings" and sent["body"]["input"] == ["one", "two"]
    legacy = c.embeddings(model="emb", prompt="one")
    assert list(legacy.embedding) == list(out.embeddings[0])


def test_errors_in_ollamas_shape(s):
    c = client(s)
    with pytest.raises(ollama.ResponseError) as err:
        c.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404 and "nope" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        c.show("nope")
    assert err.value.status_code == 404
    status, headers, body = raw(s, "POST", "/api/chat", b"{not json")
    assert status == 400 and json.loads(body) == {"error": "invalid JSON in the request body"}
    status, _, body = raw(s, "POST", "/api/chat", b'{"messages": []}')
    assert status == 400 and json.loads(body) == {"error": "model is required"}
    with pytest.raises(ollama.ResponseError) as err:
        c.pull("llama3")
    assert err.value.status_code == 501 and "does not manage model files" in err.value.error
    for method, path in (("DELETE", "/api/delete"), ("POST", "/api/copy"), ("POST", "/api/create"),
                         ("POST", "/api/push"), ("HEAD", "/api/blobs/sha256:00")):
        status, _, body = raw(s, method, path, b"{}" if method != "HEAD" else None)
        assert status == 501, (path, status)
        if body:
            assert "does not manage model files" in json.loads(body)["error"]
    with pytest.raises(ollama.ResponseError) as err:
        c.chat(model="chat", messages=[{"role": "user", "content": "hi"}], keep_alive="soon")
    assert err.value.status_code == 400 and "keep_alive" in err.value.error
    status, _, body = raw(s, "POST", "/api/chat", json.dumps(
        {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "format": 5}).encode())
    assert status == 400 and "format" in json.loads(body)["error"]
    # the backend's own refusal keeps its status, and the model is named
    with pytest.raises(ollama.ResponseError) as err:
        c.chat(model="locked", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 401 and "locked" in err.value.error and "invalid api key" in err.value.error
    # swapd still serves
    assert c.chat(model="chat", messages=[{"role": "user", "content": "hi"}], stream=False).done


def test_requests_are_counted_like_any_other(s):
    c = client(s)
    c.chat(model="chat", messages=[{"role": "user", "content": "hi"}])
    c.chat(model="chat", messages=[{"role": "user", "content": "hi"}], stream=False)

    def rows():
        return [r for r in s.get("/api/metrics/activity").json()["data"] if r["req_path"] == "/api/chat"]

    wait_until(lambda: len(rows()) == 2, timeout=10, message="two activity rows")
    assert all(r["model"] == "chat" and r["tokens"]["output_tokens"] == 6 for r in rows())


def test_client_gone_mid_stream_stops_the_backend(swapd):
    """Closing an NDJSON stream closes the backend's connection, which is how the backend learns to stop."""
    import socket

    s = swapd({"slow": model("--chunks", "200", "--interval", "0.05")})
    sock = socket.create_connection(("127.0.0.1", s.port))
    body = json.dumps({"model": "slow", "messages": [{"role": "user", "content": "hi"}]}).encode()
    sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while got.count(b'"done":false') < 3:
        got += sock.recv(4096)
    sock.close()
    port = int(s.running()["slow"]["proxy"].rsplit(":", 1)[1])
    wait_until(lambda: backend_stats(port)["streams_cancelled"] == 1, timeout=10, message="the backend to see the cut")
    assert backend_stats(port)["streams_completed"] == 0
    wait_until(lambda: s.running()["slow"]["in_flight"] == 0, timeout=10, message="the lease to come back")
    assert client(s).chat(model="slow", messages=[{"role": "user", "content": "hi"}], stream=False,
                          options={"num_predict": 2}).done


def test_second_listener(swapd):
    port = free_port()
    s = swapd({"chat": model("--chunks", "3")}, extra_args=("--ollama-listen", f"127.0.0.1:{port}"))
    c = ollama.Client(host=f"http://127.0.0.1:{port}", timeout=30)
    assert [m.model for m in c.list().models] == ["chat"]
    assert c.chat(model="chat", messages=[{"role": "user", "content": "hi"}], stream=False).message.content
    status, _, body = raw(s, "GET", "/", port=port)
    assert status == 200 and body == b"Ollama is running"
    assert raw(s, "GET", "/")[0] == 302  # the main port still redirects to the web UI
    status, _, body = raw(s, "GET", "/api/version", port=port)
    assert status == 200 and isinstance(json.loads(body)["version"], str)
    # the OpenAI routes are there too, as on Ollama's own port
    status, _, _ = raw(s, "GET", "/v1/models", port=port)
    assert status == 200


def test_second_listener_from_the_config(swapd):
    port = free_port()
    s = swapd({"chat": model()}, ollama={"listen": f"127.0.0.1:{port}"})
    status, _, body = raw(s, "GET", "/", port=port)
    assert status == 200 and body == b"Ollama is running"


# -- Translator, fed by hand ----------------------------------------------------------


def _sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def test_translator_cut_anywhere_gives_the_same_lines():
    stream = _sse(
        {"choices": [{"delta": {"role": "assistant", "content": "Hel"}}]},
        {"choices": [{"delta": {"content": "lo"}}]},
        {"choices": [{"delta": {"reasoning_content": "hmm"}}]},
        {"choices": [{"delta": {}, "finish_reason": "length"}], "timings": {"prompt_n": 3, "prompt_ms": 12.0,
                                                                             "predicted_n": 2, "predicted_ms": 40.0}},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
        b"[DONE]",
    )
    reference = None
    for cut in range(1, len(stream)):
        t = Translator("m", "chat", time.monotonic(), 0.5)
        lines = t.feed(stream[:cut]) + t.feed(stream[cut:])
        objs = [json.loads(line) for line in lines]
        got = [(o["message"]["content"], o["message"].get("thinking", "")) for o in objs]
        reference = reference or got
        assert got == reference == [("Hel", ""), ("lo", ""), ("", "hmm")], cut
        final = t.final()
        assert final["done"] and final["done_reason"] == "length"
        assert final["prompt_eval_count"] == 3 and final["eval_count"] == 2
        assert final["prompt_eval_duration"] == 12_000_000 and final["eval_duration"] == 40_000_000
        assert final["load_duration"] == 500_000_000


def test_translator_tool_call_pieces_and_errors():
    t = Translator("m", "chat", time.monotonic(), 0)
    t.feed(_sse(
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ""}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": '}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
    ))
    line = json.loads(t.pending_tools())
    assert line["message"]["tool_calls"] == [{"function": {"name": "f", "arguments": {"a": 1}}}]
    assert t.final()["done_reason"] == "stop"
    t = Translator("m", "generate", time.monotonic(), 0)
    assert t.feed(_sse({"error": {"message": "context full"}})) == []
    assert t.error == "context full"


@pytest.mark.parametrize(
    "value,seconds",
    [(None, None), (0, 0.0), (30, 30.0), ("30", 30.0), ("5m", 300.0), ("1h30m", 5400.0), ("-1", -1.0), ("-1m", -60.0),
     ("250ms", 0.25)],
)
def test_keep_alive_values(value, seconds):
    assert parse_keep_alive(value) == seconds
