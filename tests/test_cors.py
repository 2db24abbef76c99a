"""CORS on every answer, exactly once, and llama-swap's ``security.cors`` block.

Ported from llama-swap's own tests (internal/server/cors_test.go,
cors_proxy_test.go, internal/swaputil/cors_test.go and
internal/config/security_test.go); each test names the ones it ports. They
run against a real swapd and real fake backends, and read responses with
raw ``http.client`` so that a repeated header is seen as two lines, the way
a client that folds them (LiteLLM through h11) would choke on it.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket

import pytest

from helpers import model
from swapd.config import ConfigError, load_config_text
from swapd.server.cors import RESPONSE_HEADERS, add_vary, allowed_request_headers

ORIGIN = "http://ui.example"
DEFAULT_HEADERS = "Content-Type, Authorization, Accept, X-Requested-With"
DEFAULT_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"


def raw(s, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    """(status, [(name, value), ...] exactly as sent, body) over a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    finally:
        conn.close()


def values(headers, name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name.lower()]


def cors_lines(headers) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower().startswith("access-control-")]


def one(headers, name: str) -> str:
    got = values(headers, name)
    assert len(got) == 1, f"{name}: {got}"
    assert got[0] == got[0].strip() and got[0], f"{name} is empty or padded: {got[0]!r}"
    return got[0]


def chat(stream: bool = False) -> bytes:
    return json.dumps({"model": "m1", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).encode()


def _websocket_handshake(port: int, path: str, origin: str | None) -> bytes:
    """A raw websocket handshake through swapd; the 101's head, as sent."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if origin:
        lines.append(f"Origin: {origin}")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, head
            head += chunk
    accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
    assert head.startswith(b"HTTP/1.1 101") and accept in head, head
    return head.split(b"\r\n\r\n")[0]


def _answers(s, origin: str | None) -> dict[str, list[tuple[str, str]]]:
    """One of every kind of answer swapd gives, each with its headers as sent."""
    extra = {"Origin": origin} if origin else {}
    json_ct = {"Content-Type": "application/json", **extra}
    got = {}
    for label, method, path, body, headers in (
        ("json route", "GET", "/v1/models", None, extra),
        ("running", "GET", "/running", None, extra),
        ("health", "GET", "/health", None, extra),
        ("version", "GET", "/api/version", None, extra),
        ("chat, whole", "POST", "/v1/chat/completions", chat(), json_ct),
        ("chat, streamed", "POST", "/v1/chat/completions", chat(stream=True), json_ct),
        ("upstream passthrough (backend sends its own)", "GET", "/upstream/m1/v1/models", None, extra),
        ("upstream 404 from the backend", "GET", "/upstream/m1/nothing-here", None, extra),
        ("404", "GET", "/no/such/route", None, extra),
        ("unknown model 404", "POST", "/v1/chat/completions", b'{"model": "nope"}', json_ct),
        ("invalid JSON 400", "POST", "/v1/chat/completions", b"{", json_ct),
        ("start failure 502", "POST", "/v1/chat/completions", b'{"model": "broken"}', json_ct),
        ("metrics", "GET", "/metrics", None, extra),
        ("ui index", "GET", "/ui/", None, extra),
        ("ui script", "GET", "/ui/app.js", None, extra),
        ("redirect", "GET", "/ui", None, extra),
        ("upstream redirect", "GET", "/upstream/m1", None, extra),
    ):
        status, headers, _ = raw(s, method, path, headers, body)
        got[f"{label} ({status})"] = headers
    etag = one(got[next(k for k in got if k.startswith("ui script"))], "ETag")
    status, headers, _ = raw(s, "GET", "/ui/app.js", {"If-None-Match": etag, **extra})
    assert status == 304
    got["ui 304"] = headers
    return got


@pytest.fixture
def two_models(swapd):
    return swapd({"m1": model("--cors-echo"), "broken": model("--exit-at-start", "3")})


def test_every_answer_to_an_origin_carries_one_allow_origin(two_models):
    """Ports TestServer_CORSHeadersAreSingleValued, TestServer_CORSActualResponseWithOrigin and
    TestServer_CORSProxiedResponseIsSingleValued (llama-swap #1121, #85): every route, every kind of
    answer, proxied ones whose backend sends its own ``Access-Control-Allow-Origin`` included."""
    s = two_models
    answers = _answers(s, ORIGIN)
    for label, headers in answers.items():
        assert one(headers, "Access-Control-Allow-Origin") == "*", label
        assert "origin" in [t.strip().lower() for v in values(headers, "Vary") for t in v.split(",")], label
        assert len(values(headers, "Vary")) <= 1, label
        for name, _ in cors_lines(headers):
            one(headers, name)  # every CORS header at most once, never empty
        # preflight-only headers do not belong on an actual answer; llama-server's go
        for name in ("Access-Control-Allow-Methods", "Access-Control-Max-Age", "Access-Control-Allow-Headers",
                     "Access-Control-Allow-Credentials"):
            assert not values(headers, name), (label, name)
    assert any("(502)" in k for k in answers) and any("(404)" in k for k in answers)
    head = _websocket_handshake(s.port, "/upstream/m1/ws", ORIGIN)
    assert head.lower().count(b"access-control-allow-origin: *") == 1, head


def test_no_origin_means_no_cors_headers_at_all(two_models):
    """Ports TestServer_CORSNoOriginEmitsNoHeaders, TestServer_CORSProxiedResponseHasNoEmptyHeaders and
    TestStripUpstreamCORSHeaders: curl, LiteLLM and SDKs send no Origin, and get no CORS header, not
    even the empty one llama-server sends (the trailing half of the ``*, `` that h11 rejects)."""
    s = two_models
    for label, headers in _answers(s, None).items():
        assert cors_lines(headers) == [], label
        assert "origin" not in ",".join(values(headers, "Vary")).lower(), label
    head = _websocket_handshake(s.port, "/upstream/m1/ws", None)
    assert b"access-control" not in head.lower()
    # the backend does send them: swapd is what drops them
    status, headers, _ = raw(s, "GET", "/upstream/m1/x/pid")
    assert status == 200 and cors_lines(headers) == []


def test_preflight_defaults(swapd):
    """Ports TestServer_CORSPreflight and TestServer_CORSDefaultPolicyMatchesLegacy: no security block
    keeps llama-swap's permissive policy."""
    s = swapd({"m1": model()})
    status, headers, body = raw(s, "OPTIONS", "/v1/chat/completions",
                                {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert (status, body) == (204, b"")
    assert one(headers, "Access-Control-Allow-Origin") == "*"
    assert one(headers, "Access-Control-Allow-Methods") == DEFAULT_METHODS
    assert one(headers, "Access-Control-Allow-Headers") == DEFAULT_HEADERS
    assert one(headers, "Access-Control-Max-Age") == "86400"
    assert not values(headers, "Access-Control-Allow-Credentials")
    assert not values(headers, "Access-Control-Expose-Headers")  # TestServer_CORSExposeHeadersOmittedWhenEmpty
    assert not values(headers, "Access-Control-Allow-Private-Network")


def test_preflight_echoes_the_requested_headers_that_are_tokens(swapd):
    """Ports TestServer_CORSPreflightEchoesRequestHeaders, TestServer_CORSPreflightDropsIllegalRequestHeaders
    and TestServer_CORSPreflightAllIllegalFallsBackToDefaults."""
    s = swapd({"m1": model()})
    for requested, echoed in (("X-Custom, Content-Type", "X-Custom, Content-Type"),
                              ("X-Good, Bad Header, Content-Type", "X-Good, Content-Type"),
                              ("Bad@Header", None)):
        status, headers, _ = raw(s, "OPTIONS", "/v1/chat/completions",
                                 {"Origin": ORIGIN, "Access-Control-Request-Headers": requested})
        assert status == 204
        vary = [t.strip() for t in one(headers, "Vary").split(",")]
        if echoed is None:
            assert one(headers, "Access-Control-Allow-Headers") == DEFAULT_HEADERS
            assert "Access-Control-Request-Headers" not in vary
        else:
            assert one(headers, "Access-Control-Allow-Headers") == echoed
            assert "Access-Control-Request-Headers" in vary and "Origin" in vary


def test_sanitize_access_control_request_headers():
    """Ports TestServer_SanitizeAccessControlRequestHeaders."""
    for given, want in (("Content-Type, Authorization", "Content-Type, Authorization"),
                        ("  X-Custom ,  Accept ", "X-Custom, Accept"), ("Valid, Bad Header", "Valid"),
                        ("Bad@Header", ""), ("", ""), (",,,", ""), ("X-A,,X-B", "X-A, X-B"), ("X-A,", "X-A"),
                        ("\tX-Tabbed\t", "X-Tabbed")):
        assert allowed_request_headers(given) == want, given


def test_vary_names_origin_once_on_one_line():
    from multidict import CIMultiDict

    headers = CIMultiDict()
    add_vary(headers, "Origin")
    assert headers.getall("Vary") == ["Origin"]
    headers = CIMultiDict([("Vary", "Accept-Encoding"), ("vary", "Cookie")])
    add_vary(headers, "Origin")
    assert headers.getall("Vary") == ["Accept-Encoding, Cookie, Origin"]
    for already in ("origin", "Accept, Origin", "*"):
        headers = CIMultiDict(Vary=already)
        add_vary(headers, "Origin")
        assert headers.getall("Vary") == [already]
    assert len(RESPONSE_HEADERS) == 7  # what the relay drops from a backend's answer


def test_preflight_without_origin_and_preflight_without_key(swapd):
    """Ports TestServer_CORSPreflightWithoutOrigin and TestServer_CORSPreflightBypassesAuth."""
    s = swapd({"m1": model()}, apiKeys=["sk-test"])
    status, headers, _ = raw(s, "OPTIONS", "/v1/chat/completions")
    assert status == 204 and cors_lines(headers) == []
    status, headers, _ = raw(s, "OPTIONS", "/v1/chat/completions", {"Origin": ORIGIN})
    assert status == 204 and one(headers, "Access-Control-Allow-Origin") == "*"
    # the 401 that follows a preflight must be readable by the page too, or it cannot tell the user why
    status, headers, _ = raw(s, "GET", "/v1/models", {"Origin": ORIGIN, "Sec-Fetch-Mode": "cors"})
    assert status == 401 and one(headers, "Access-Control-Allow-Origin") == "*"
    assert not values(headers, "WWW-Authenticate")
    status, headers, _ = raw(s, "POST", "/v1/chat/completions", {"Origin": ORIGIN, "Content-Type": "application/json"}, chat())
    assert status == 401 and one(headers, "Access-Control-Allow-Origin") == "*"
    status, headers, _ = raw(s, "GET", "/v1/models", {"Origin": ORIGIN, "Authorization": "Bearer sk-test"})
    assert status == 200 and one(headers, "Access-Control-Allow-Origin") == "*"


LOCKED = {
    "cors": {
        "allowedOrigins": ["https://Dash.Example.com", "http://localhost:5173"],
        "allowCredentials": True,
        "allowPrivateNetwork": True,
        "allowedMethods": ["GET", "POST"],
        "allowedHeaders": ["Content-Type"],
        "exposedHeaders": ["X-Request-Id", "X-Model"],
        "maxAge": 60,
    }
}


def test_a_listed_origin_gets_its_configured_spelling_and_credentials(swapd):
    """Ports TestServer_CORSAllowedOriginsExactMatch, TestServer_CORSOriginMatchIsHostCaseInsensitive,
    TestServer_CORSAllowCredentials and TestServer_CORSExposeHeaders."""
    s = swapd({"m1": model("--cors-echo")}, security=LOCKED)
    for path in ("/running", "/v1/models", "/upstream/m1/v1/models", "/no/such/route"):
        status, headers, _ = raw(s, "GET", path, {"Origin": "https://dash.example.com"})
        assert one(headers, "Access-Control-Allow-Origin") == "https://Dash.Example.com", path
        assert one(headers, "Access-Control-Allow-Credentials") == "true", path  # never with "*"
        assert one(headers, "Access-Control-Expose-Headers") == "X-Request-Id, X-Model", path
        assert "Origin" in one(headers, "Vary"), path
    status, headers, _ = raw(s, "POST", "/v1/chat/completions",
                             {"Origin": "http://localhost:5173", "Content-Type": "application/json"}, chat(stream=True))
    assert status == 200 and one(headers, "Access-Control-Allow-Origin") == "http://localhost:5173"


def test_an_origin_not_listed_is_served_without_cors_headers(swapd):
    """Ports TestServer_CORSAllowedOriginsMismatch and TestServer_CORSNullOriginNotAllowedByList: the
    answer is the same, the browser just does not let the page read it."""
    s = swapd({"m1": model("--cors-echo")}, security=LOCKED)
    for origin in ("https://evil.example.com", "null", "https://dash.example.com:8443", "http://localhost:5174"):
        status, headers, _ = raw(s, "GET", "/running", {"Origin": origin})
        assert status == 200 and cors_lines(headers) == [], origin
        status, headers, _ = raw(s, "GET", "/upstream/m1/v1/models", {"Origin": origin})
        assert status == 200 and cors_lines(headers) == [], origin  # not even the backend's
        status, headers, _ = raw(s, "OPTIONS", "/v1/chat/completions", {"Origin": origin})
        assert status == 204 and cors_lines(headers) == [], origin


def test_a_configured_preflight(swapd):
    """Ports TestServer_CORSCustomMethodsAndMaxAge (a configured allowedHeaders list wins over the echo),
    and the private-network answer of llama-swap #1146, sent only to a preflight that asks for it."""
    s = swapd({"m1": model()}, security=LOCKED)
    asked = {"Origin": "https://dash.example.com", "Access-Control-Request-Headers": "X-Custom"}
    status, headers, _ = raw(s, "OPTIONS", "/v1/chat/completions", asked)
    assert status == 204
    assert one(headers, "Access-Control-Allow-Methods") == "GET, POST"
    assert one(headers, "Access-Control-Allow-Headers") == "Content-Type"
    assert one(headers, "Access-Control-Max-Age") == "60"
    assert one(headers, "Access-Control-Allow-Credentials") == "true"
    assert one(headers, "Access-Control-Expose-Headers") == "X-Request-Id, X-Model"
    assert not values(headers, "Access-Control-Allow-Private-Network")
    status, headers, _ = raw(s, "OPTIONS", "/v1/chat/completions",
                             {**asked, "Access-Control-Request-Private-Network": "true"})
    assert one(headers, "Access-Control-Allow-Private-Network") == "true"


def test_the_browser_defences_still_hold_with_cors_open(swapd):
    """swapd's own refusals (webguard) are answers like any other: one Allow-Origin, and still refused."""
    s = swapd({"m1": model()})
    status, headers, _ = raw(s, "POST", "/api/models/unload",
                             {"Origin": "http://attacker.example", "Content-Type": "text/plain"}, b"")
    assert status == 403 and one(headers, "Access-Control-Allow-Origin") == "*"
    status, headers, _ = raw(s, "GET", "/running", {"Host": "attacker.example", "Origin": "http://attacker.example"})
    assert status == 403 and one(headers, "Access-Control-Allow-Origin") == "*"


# -- the config block ------------------------------------------------------------

MODELS = "models:\n  m1:\n    cmd: echo ${PORT}\n"


def _cors(text: str):
    return load_config_text(text + MODELS).cors


@pytest.mark.parametrize("block", ["", "security:\n", "security:\n  cors:\n", "security:\n  cors: {}\n",
                                   "security:\n  cors:\n    allowedOrigins:\n",
                                   "security:\n  cors:\n    allowedOrigins: null\n"])
def test_config_without_origins_is_the_permissive_default(block):
    """Ports TestConfig_SecurityCORSUnsetOriginsSelectLegacyPolicy and TestConfig_SecurityCORSNilVsEmptyOrigins."""
    cors = _cors(block)
    assert cors.allowed_origins == ("*",) and not cors.allow_credentials and cors.max_age == 86400


@pytest.mark.parametrize("block", ["allowedOrigins: []\n", "allowedOrigins: []\n    maxAge: 600\n",
                                   "allowedOrigins: [\n]\n"])
def test_config_an_empty_origin_list_is_refused(block):
    """Ports TestConfig_SecurityCORSEmptyOriginListRejected."""
    with pytest.raises(ConfigError, match="at least one origin") as err:
        _cors("security:\n  cors:\n    " + block)
    assert "security.cors.allowedOrigins" in str(err.value)


@pytest.mark.parametrize("setting", ["allowCredentials: true", "allowPrivateNetwork: true",
                                     'allowedMethods: ["GET"]', 'allowedHeaders: ["Content-Type"]',
                                     'exposedHeaders: ["X-Request-Id"]', "maxAge: 600"])
def test_config_settings_without_origins_are_refused(setting):
    """Ports TestConfig_SecurityCORSOrphanSettingsRejected."""
    with pytest.raises(ConfigError, match="is required") as err:
        _cors(f"security:\n  cors:\n    {setting}\n")
    assert "'security.cors.allowedOrigins'" in str(err.value)


def test_config_a_block_naming_only_origins_keeps_the_preflight_defaults():
    """Ports TestConfig_SecurityCORSDeclaredKeepsPreflightDefaults and TestConfig_SecurityCORSParsing."""
    cors = _cors('security:\n  cors:\n    allowedOrigins: ["https://dash.example.com"]\n')
    assert cors.allowed_origins == ("https://dash.example.com",)
    assert cors.allowed_methods == tuple(DEFAULT_METHODS.split(", ")) and cors.allowed_headers == ()
    assert cors.max_age == 86400 and cors.exposed_headers == ()
    full = _cors("security:\n  cors:\n" + "".join(f"    {k}: {json.dumps(v)}\n" for k, v in LOCKED["cors"].items()))
    assert full.allowed_origins == ("https://Dash.Example.com", "http://localhost:5173")
    assert full.allow_credentials and full.allow_private_network and full.max_age == 60
    assert full.allowed_methods == ("GET", "POST") and full.allowed_headers == ("Content-Type",)
    assert full.exposed_headers == ("X-Request-Id", "X-Model")


@pytest.mark.parametrize(
    "cors, key, message",
    [
        ({"allowedOrigins": ["*"], "allowCredentials": True}, "allowedOrigins", "allowCredentials"),
        ({"allowedOrigins": ["*"], "allowPrivateNetwork": True}, "allowedOrigins", "allowPrivateNetwork"),
        ({"allowedOrigins": ["https://a.example.com", "*"], "allowCredentials": True}, "allowedOrigins",
         "allowCredentials"),
        ({"allowedOrigins": ["https://dash.example.com/"]}, "allowedOrigins[0]", "path"),
        ({"allowedOrigins": ["https://dash.example.com/ui"]}, "allowedOrigins[0]", "path"),
        ({"allowedOrigins": ["dash.example.com"]}, "allowedOrigins[0]", "scheme://host"),
        ({"allowedOrigins": ["https://ok.example", ""]}, "allowedOrigins[1]", "must not be empty"),
        ({"allowedOrigins": [" https://dash.example.com"]}, "allowedOrigins[0]", "whitespace"),
        ({"allowedOrigins": ["null"]}, "allowedOrigins[0]", "scheme://host"),
        ({"allowedOrigins": ["*"], "maxAge": -1}, "maxAge", "maxAge|>= 0"),
        ({"allowedOrigins": ["*"], "allowedMethods": ["GET POST"]}, "allowedMethods[0]", "HTTP method"),
        ({"allowedOrigins": ["*"], "allowedHeaders": ["Bad Header"]}, "allowedHeaders[0]", "header name"),
        ({"allowedOrigins": ["*"], "exposedHeaders": ["Bad@Header"]}, "exposedHeaders[0]", "header name"),
        ({"allowedOrigins": "https://a.example"}, "allowedOrigins", "list"),
        ({"allowedOrigins": ["*"], "allowCredentials": "yes"}, "allowCredentials", "true or false"),
    ],
)
def test_config_errors_name_the_key(cors, key, message):
    """Ports TestConfig_SecurityCORSValidation, TestConfig_SecurityCORSValidationRunsOnLoad and
    TestConfig_SecurityCORSPrivateNetworkRequiresExplicitOrigins."""
    text = "security:\n  cors:\n" + "".join(f"    {k}: {json.dumps(v)}\n" for k, v in cors.items())
    with pytest.raises(ConfigError, match=message) as err:
        _cors(text)
    assert f"'security.cors.{key}'" in str(err.value)


def test_config_valid_origins_and_unknown_keys():
    """Ports TestConfig_SecurityCORSValidOrigins; an unknown key under security or cors is a warning."""
    for origin in ("*", "https://dash.example.com", "http://localhost:5173", "http://127.0.0.1:8080",
                   "https://sub.domain.example.com:8443", "http://[::1]:8080"):
        assert _cors(f'security:\n  cors:\n    allowedOrigins: ["{origin}"]\n').allowed_origins == (origin,)
    config = load_config_text('security:\n  cors:\n    allowedOrigin: ["x"]\n  cros: {}\n' + MODELS)
    assert any("allowedOrigins" in w for w in config.warnings)
    assert any("cros" in w for w in config.warnings)
    with pytest.raises(ConfigError, match="'security'"):
        load_config_text("security: [1]\n" + MODELS)
