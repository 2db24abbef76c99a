"""Websockets through ``/upstream/<model>/...``: spliced both ways, a lease for the socket's life.

A real swapd, real fake backends (``swapd.fake_backend``'s ``/ws``: echo,
server-initiated frames, pings, closes with a code, refusals) and aiohttp's
websocket client. The ``compat.ignoreWebsockets`` cases are ported from
llama-swap's tests, named in each docstring.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import time

import aiohttp
import pytest

from helpers import backend_stats, model, wait_until
from swapd.config import ConfigError, load_config_text


def _run(coro):
    return asyncio.run(coro)


def _ws_url(s, path: str = "/upstream/m1/ws") -> str:
    return f"ws://127.0.0.1:{s.port}{path}"


def _backend_port(s, model_id: str = "m1") -> int:
    return int(s.running()[model_id]["proxy"].rsplit(":", 1)[1])


def _events(s, name: str) -> list[dict]:
    return [e for e in s.log_events() if e.get("event") == name]


async def _receive(ws, timeout: float = 10.0):
    return await asyncio.wait_for(ws.receive(), timeout)


# -- the relay ---------------------------------------------------------------------


def test_text_binary_and_server_frames_go_both_ways_with_subprotocol_and_extension(swapd):
    """Echo both ways, frames the backend sends on its own (some in the same read as its 101), a
    subprotocol and permessage-deflate negotiated by the backend itself, and the handshake headers."""
    s = swapd({"m1": model()}, apiKeys=["sk-swapd"])

    async def go():
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer sk-swapd"}) as session:
            async with session.ws_connect(
                _ws_url(s, "/upstream/m1/ws?push=3"), protocols=("echo.v9", "echo.v1"), compress=15
            ) as ws:
                assert ws.protocol == "echo.v1"  # the backend's choice, from the client's list
                assert ws.compress == 15  # permessage-deflate, agreed end to end
                assert [(await _receive(ws)).data for _ in range(3)] == ["push 0", "push 1", "push 2"]
                await ws.send_str("héllo, wörld")
                assert (await _receive(ws)).data == "héllo, wörld"
                blob = os.urandom(3 * 1024 * 1024)  # larger than every buffer on the way
                await ws.send_bytes(blob)
                got = await _receive(ws, 30)
                assert got.type == aiohttp.WSMsgType.BINARY and got.data == blob
                await ws.send_str("x_push 200")
                assert [(await _receive(ws)).data for _ in range(200)] == [f"push {i}" for i in range(200)]
                await ws.send_str("x_info")
                info = json.loads((await _receive(ws)).data)
                assert info["protocol"] == "echo.v1" and info["compress"] == 15
                sent = {k.lower(): v for k, v in info["headers"].items()}
                assert sent["upgrade"] == "websocket" and "upgrade" in sent["connection"].lower()
                assert "permessage-deflate" in sent["sec-websocket-extensions"]
                assert sent["sec-websocket-protocol"] == "echo.v9,echo.v1"  # as the client sent it
                assert "authorization" not in sent  # swapd's own key never reaches a backend
                assert sent["x-forwarded-for"] == "127.0.0.1"

    _run(go())


def test_pings_and_pongs_go_both_ways(swapd):
    s = swapd({"m1": model()})

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(_ws_url(s), autoping=False) as ws:
                await ws.ping(b"from-client")
                pong = await _receive(ws)
                assert (pong.type, pong.data) == (aiohttp.WSMsgType.PONG, b"from-client")
                await ws.send_str("x_ping")
                ping = await _receive(ws)
                assert (ping.type, ping.data) == (aiohttp.WSMsgType.PING, b"from-backend")
                await ws.pong(ping.data)
                assert (await _receive(ws)).data == "pong:from-backend"

    _run(go())


def test_a_close_from_either_side_reaches_the_other_with_its_code(swapd):
    s = swapd({"m1": model()})

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(_ws_url(s)) as ws:
                await ws.send_str("x_close 4001")
                closing = await _receive(ws)
                assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4001 and closing.extra == "bye"
            assert ws.close_code == 4001
            async with session.ws_connect(_ws_url(s)) as ws:
                await ws.send_str("hi")
                assert (await _receive(ws)).data == "hi"
                await ws.close(code=4002, message=b"client-bye")  # the backend gets 4002 (its stats, below)

    _run(go())
    port = _backend_port(s)
    wait_until(lambda: backend_stats(port)["ws_open"] == 0, message="the backend's sockets to close")
    # what the backend received: the client's reply to its 4001 (aiohttp's client answers 1000), then 4002
    assert backend_stats(port)["ws_close_codes"] == [1000, 4002]
    assert s.running()["m1"]["in_flight"] == 0


def test_a_vanished_client_closes_the_backend_socket_and_a_dead_backend_the_client(swapd):
    s = swapd({"m1": model()})
    key = base64.b64encode(os.urandom(16)).decode()
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    sock.sendall(
        f"GET /upstream/m1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    port = _backend_port(s)
    assert backend_stats(port)["ws_open"] == 1
    sock.close()  # no Close frame: the connection just ends
    wait_until(lambda: backend_stats(port)["ws_open"] == 0, message="the backend's socket to close")
    wait_until(lambda: s.running()["m1"]["in_flight"] == 0, message="the lease to go")

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(_ws_url(s)) as ws:
                await ws.send_str("hi")
                assert (await _receive(ws)).data == "hi"
                unload = asyncio.create_task(session.post(f"{s.base}/api/models/unload/m1"))
                gone = await _receive(ws, 20)  # the model stopped: its socket ends, and so does the client's
                assert gone.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
                (await unload).release()

    _run(go())
    assert "m1" not in s.running()


def test_the_first_connect_starts_the_model_and_the_socket_is_in_flight_while_open(swapd):
    """Ports TestBaseRouter_WebsocketStartsModelWhenCompatDisabled; while open the socket holds a lease,
    so /running counts it and no TTL stops the model under it."""
    s = swapd({"m1": model("--load-delay", "0.5", ttl=1)})
    assert s.running() == {}

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(_ws_url(s)) as ws:
                assert [e["model"] for e in _events(s, "backend.start")] == ["m1"]
                entry = s.running()["m1"]
                assert entry["state"] == "ready" and entry["in_flight"] == 1 and entry["ttl_remaining"] is None
                await asyncio.sleep(2.5)  # past the TTL
                await ws.send_str("still here")
                assert (await _receive(ws)).data == "still here"
                assert s.running()["m1"]["in_flight"] == 1
            wait_until(lambda: s.running().get("m1", {}).get("in_flight") == 0, message="the lease to go")
            assert s.running()["m1"]["ttl_remaining"] is not None  # the TTL counts from the close

    _run(go())
    wait_until(lambda: "m1" not in s.running(), timeout=10, message="the TTL to stop the model")
    [line] = [e for e in _events(s, "request") if e.get("websocket")]
    assert line["status"] == 101 and line["model"] == "m1"


def test_a_socket_holds_off_a_swap_until_it_closes(swapd):
    """The other side of TestBaseRouter_IgnoreWebsocketsDoesNotBlockSwap: without ignoreWebsockets the
    socket is a request in flight, so a request for a model that must replace it waits for it."""
    s = swapd({"a": model(), "b": model()})

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(_ws_url(s, "/upstream/a/ws")) as ws:
                chat = asyncio.create_task(
                    session.post(f"{s.base}/v1/chat/completions", json={"model": "b", "messages": []})
                )
                await asyncio.sleep(1.0)
                assert not chat.done() and s.running()["a"]["state"] == "ready"
                await ws.send_str("hi")
                assert (await _receive(ws)).data == "hi"
            response = await asyncio.wait_for(chat, 20)
            assert response.status == 200
            response.release()

    _run(go())
    assert list(s.running()) == ["b"]


def test_open_sockets_count_toward_the_concurrency_limit(swapd):
    s = swapd({"m1": model(concurrencyLimit=1)})

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(_ws_url(s)):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await session.ws_connect(_ws_url(s))
                assert refused.value.status == 429

    _run(go())


def test_a_refused_upgrade_passes_the_backends_answer_through(swapd):
    s = swapd({"m1": model("--cors-echo")})
    key = base64.b64encode(os.urandom(16)).decode()
    handshake = (
        "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    )
    with socket.create_connection(("127.0.0.1", s.port), timeout=20) as sock:
        sock.sendall(f"GET /upstream/m1/ws?refuse=403 HTTP/1.1\r\n{handshake}\r\n".encode())
        reader = sock.makefile("rb")
        status = reader.readline()
        headers = {}
        while (line := reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = reader.read(int(headers["content-length"]))
        assert status.startswith(b"HTTP/1.1 403"), status
        assert headers["x-refused"] == "yes" and "access-control-allow-origin" not in headers
        assert json.loads(body)["error"]["message"] == "websocket refused with 403"
        # the connection is still HTTP: the next request on it is answered
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reader.readline().startswith(b"HTTP/1.1 200")

    async def go():
        async with aiohttp.ClientSession() as session:
            for path, code in (("/upstream/m1/ws?refuse=401", 401), ("/upstream/m1/not-a-socket", 404)):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await session.ws_connect(_ws_url(s, path))
                assert refused.value.status == code

    _run(go())
    assert s.running()["m1"]["in_flight"] == 0
    assert {e["outcome"] for e in _events(s, "request") if e.get("websocket")} == {"refused"}


def test_no_tasks_or_descriptors_leak(swapd):
    s = swapd({"m1": model()})

    async def rounds():
        async with aiohttp.ClientSession() as session:
            for i in range(12):
                ws = await session.ws_connect(_ws_url(s), autoping=False)
                await ws.send_bytes(b"x" * 100_000)
                await _receive(ws)
                if i % 3 == 0:
                    await ws.close(code=4000)
                elif i % 3 == 1:
                    await ws.send_str("x_close 4003")
                    await _receive(ws)
                    await ws.close()
                else:
                    ws._response.connection.transport.abort()  # the client vanishes
                    await ws.close()
            for _ in range(3):
                with pytest.raises(aiohttp.WSServerHandshakeError):
                    await session.ws_connect(_ws_url(s, "/upstream/m1/ws?refuse=500"))

    _run(rounds())  # a first round: the model is started, the pools and caches exist
    port = _backend_port(s)
    wait_until(lambda: backend_stats(port)["ws_open"] == 0, message="the backend's sockets to close")
    time.sleep(0.3)
    before = s.get("/api/status").json()
    _run(rounds())
    wait_until(lambda: backend_stats(port)["ws_open"] == 0, message="the backend's sockets to close")

    def settled():
        now = s.get("/api/status").json()
        return now["tasks"] <= before["tasks"] and now["fds"] <= before["fds"] and now
    after = wait_until(settled, timeout=10, message=f"tasks and fds back to {before}")
    assert after["admitted"] == {} and s.running()["m1"]["in_flight"] == 0


def test_shutdown_closes_open_sockets(swapd):
    s = swapd({"m1": model()})

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(_ws_url(s)) as ws:
                await ws.send_str("hi")
                assert (await _receive(ws)).data == "hi"
                t0 = time.monotonic()
                s.proc.send_signal(signal.SIGTERM)
                gone = await _receive(ws, 20)
                assert gone.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
                return time.monotonic() - t0

    assert _run(go()) < 5  # not aiohttp's 10 s wait for handlers
    assert s.proc.wait(20) == 0


# -- compat.ignoreWebsockets ---------------------------------------------------------


def test_ignored_websockets_never_start_a_model(swapd):
    """Ports TestBaseRouter_IgnoreWebsocketsRejectsModelUnlessReady: stopped or starting, the answer is 409
    and nothing is started for the socket."""
    s = swapd({"m1": model("--load-delay", "2", compat={"ignoreWebsockets": True})})

    async def go():
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(_ws_url(s))
            assert refused.value.status == 409
            assert s.running() == {} and _events(s, "backend.start") == []
            starting = asyncio.create_task(
                session.post(f"{s.base}/v1/chat/completions", json={"model": "m1", "messages": []})
            )
            await asyncio.to_thread(wait_until, lambda: s.running().get("m1", {}).get("state") == "starting")
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(_ws_url(s))
            assert refused.value.status == 409
            (await starting).release()
            async with session.ws_connect(_ws_url(s)) as ws:  # ready now: it connects
                await ws.send_str("hi")
                assert (await _receive(ws)).data == "hi"

    _run(go())
    assert len(_events(s, "backend.start")) == 1


def test_an_ignored_websocket_is_not_in_flight_and_takes_no_slot(swapd):
    """Ports TestServer_HandleUpstream_InflightIgnoresConfiguredWebsocket and
    TestServer_InflightMiddleware_IgnoresConfiguredWebsocket: no in-flight count, no concurrency slot."""
    s = swapd({"m1": model(concurrencyLimit=1, compat={"ignoreWebsockets": True})})
    assert s.chat("m1").status == 200

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(_ws_url(s)) as ws, session.ws_connect(_ws_url(s)) as ws2:
                await ws.send_str("one")
                await ws2.send_str("two")
                assert (await _receive(ws)).data == "one" and (await _receive(ws2)).data == "two"
                entry = s.running()["m1"]
                assert entry["in_flight"] == 0
                status = await asyncio.to_thread(lambda: s.chat("m1").status)
                assert status == 200  # the limit of 1 is not taken by either socket
                assert s.get("/api/status").json()["admitted"] == {}

    _run(go())


def test_an_ignored_websocket_does_not_hold_off_the_ttl(swapd):
    """Ports TestProcessCommand_TTL_IgnoresWebsocket: the TTL stops the model under an open socket, and the
    socket ends with it."""
    s = swapd({"m1": model(ttl=1, compat={"ignoreWebsockets": True})})
    assert s.chat("m1").status == 200

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(_ws_url(s)) as ws:
                await ws.send_str("hi")
                assert (await _receive(ws)).data == "hi"
                gone = await _receive(ws, 20)
                assert gone.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)

    _run(go())
    wait_until(lambda: "m1" not in s.running(), message="the stop to finish")
    assert [e["reason"] for e in _events(s, "backend.stop")] == ["ttl"]


def test_an_ignored_websocket_does_not_block_a_swap(swapd):
    """Ports TestBaseRouter_IgnoreWebsocketsDoesNotBlockSwap: the other model swaps in at once, and the
    socket is dropped with the model it was on."""
    s = swapd({"a": model(compat={"ignoreWebsockets": True}), "b": model()})
    assert s.chat("a").status == 200

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(_ws_url(s, "/upstream/a/ws")) as ws:
                await ws.send_str("hi")
                assert (await _receive(ws)).data == "hi"
                t0 = time.monotonic()
                response = await session.post(f"{s.base}/v1/chat/completions", json={"model": "b", "messages": []})
                assert response.status == 200 and time.monotonic() - t0 < 10
                response.release()
                gone = await _receive(ws, 20)
                assert gone.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)

    _run(go())
    assert list(s.running()) == ["b"]


MODELS = "  regular:\n    cmd: regular --port ${PORT}\n    concurrencyLimit: 10\n"


def test_config_compat_ignore_websockets():
    """Ports TestConfig_ModelCompat and the comfyui_auto case of llama-swap's model_config_test (forced on)."""
    config = load_config_text(
        "models:\n  enabled:\n    cmd: enabled --port ${PORT}\n    compat:\n      ignoreWebsockets: true\n"
        "  comfyui_auto:\n    cmd: comfyui --port ${PORT}\n    compat:\n      ignoreWebsockets: false\n" + MODELS
    )
    assert config.models["enabled"].ignore_websockets
    assert config.models["comfyui_auto"].ignore_websockets
    assert config.models["comfyui_auto"].concurrency_limit == 50
    assert not config.models["regular"].ignore_websockets
    assert config.warnings == ()
    with pytest.raises(ConfigError, match="'compat.ignoreWebsockets'.*true or false"):
        load_config_text("models:\n  m:\n    cmd: m --port ${PORT}\n    compat:\n      ignoreWebsockets: 1\n")
    warned = load_config_text("models:\n  m:\n    cmd: m --port ${PORT}\n    compat:\n      ignoreWebsocket: true\n")
    assert any("ignoreWebsockets" in w for w in warned.warnings)


def test_a_slow_reader_on_either_side_is_waited_for_not_buffered(swapd):
    """Flow control both ways: 32 MiB each way while the other side does not read; swapd holds a bounded
    amount (its memory hardly moves), pauses the sender, and every byte arrives once reading resumes."""
    s = swapd({"m1": model()})
    blob = os.urandom(32 * 1024 * 1024)

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(_ws_url(s), max_msg_size=0) as ws:
                rss0 = s.get("/api/status").json()["rss_bytes"]
                await ws.send_bytes(blob)  # echoed at once by the backend, while this client reads nothing
                await asyncio.sleep(1.5)
                rss1 = s.get("/api/status").json()["rss_bytes"]
                got = await _receive(ws, 60)
                assert got.data == blob
                return rss1 - rss0

    grew = _run(go())
    assert grew < 16 * 1024 * 1024, f"swapd grew by {grew} bytes while relaying 64 MiB"
