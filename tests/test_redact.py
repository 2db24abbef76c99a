"""Secrets in a model's cmd and in proxy URLs never reach /running, /logs or /api/events."""

from __future__ import annotations

import http.client
import time

import pytest
from helpers import PY, free_port, wait_until

from swapd.redact import MASK, is_secret_name, redact_argv, redact_url

# -- the redactor ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["env", "HF_TOKEN=hf_abc", "srv"], ["env", f"HF_TOKEN={MASK}", "srv"]),
        (["docker", "run", "-e", "OPENAI_API_KEY=sk-1", "img"], ["docker", "run", "-e", f"OPENAI_API_KEY={MASK}", "img"]),
        (["env", "AWS_SECRET_ACCESS_KEY=a", "MY_SECRET=b", "GH_TOKEN=c", "DB_PASSWORD_X=d", "API_KEY=e"],
         ["env", f"AWS_SECRET_ACCESS_KEY={MASK}", f"MY_SECRET={MASK}", f"GH_TOKEN={MASK}", f"DB_PASSWORD_X={MASK}",
          f"API_KEY={MASK}"]),
        (["srv", "--api-key", "sk-1", "--port", "8080"], ["srv", "--api-key", MASK, "--port", "8080"]),
        (["srv", "--api-key=sk-1", "--hf-token", "hf_x", "--password=pw"],
         ["srv", f"--api-key={MASK}", "--hf-token", MASK, f"--password={MASK}"]),
        (["srv", "--client-secret", "s", "--openai-api-key", "k"], ["srv", "--client-secret", MASK, "--openai-api-key", MASK]),
    ],
)
def test_secret_values_are_masked(argv, expected):
    assert redact_argv(argv) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["env", "MAX_TOKENS=512", "CUDA_VISIBLE_DEVICES=0", "PWD=/srv", "srv"],
        ["llama-server", "--override-kv", "tokenizer.ggml.add_bos_token=bool:false", "-m", "m.gguf"],
        ["vllm", "serve", "--max-num-batched-tokens", "8192", "--tokenizer", "tok", "--skip-tokenizer-init"],
        ["srv", "--no-auth", "--port", "8080"],
        ["srv", "--proxy", "http://127.0.0.1:8080/v1?x=1"],
    ],
)
def test_ordinary_arguments_are_left_alone(argv):
    assert redact_argv(argv) == argv


def test_secret_flag_used_as_a_switch_keeps_the_next_flag():
    assert redact_argv(["srv", "--api-key", "--port", "8080"]) == ["srv", "--api-key", "--port", "8080"]


def test_command_line_inside_one_argument_is_redacted_word_by_word():
    argv = ["sh", "-c", "exec llama-server --api-key 'sk-1' --hf-token=hf_2 --port 8080 AWS_SECRET_ACCESS_KEY=q"]
    out = redact_argv(argv)
    assert out[:2] == ["sh", "-c"]
    assert out[2] == f"exec llama-server --api-key '{MASK}' --hf-token={MASK} --port 8080 AWS_SECRET_ACCESS_KEY={MASK}"


def test_assignment_with_spaces_is_masked_whole():
    assert redact_argv(["env", "DB_PASSWORD=two words"]) == ["env", f"DB_PASSWORD={MASK}"]


def test_urls_in_arguments_lose_their_credentials():
    argv = ["srv", "--upstream", "http://user:pw@host:1/v1", "DATABASE_URL=postgres://u:p@db/x", "--x=https://tok@h/"]
    assert redact_argv(argv) == ["srv", "--upstream", f"http://{MASK}@host:1/v1", f"DATABASE_URL=postgres://{MASK}@db/x",
                                 f"--x=https://{MASK}@h/"]


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://user:pass@127.0.0.1:8080/v1", f"http://{MASK}@127.0.0.1:8080/v1"),
        ("https://tok@example.com", f"https://{MASK}@example.com"),
        ("http://h:1/v1?api_key=s&model=a", f"http://h:1/v1?api_key={MASK}&model=a"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://127.0.0.1:8080/path?model=a", "http://127.0.0.1:8080/path?model=a"),
        ("", ""),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected


@pytest.mark.parametrize("name", ["--api-key", "HF_TOKEN", "hf-token", "x_api_key", "DB_PASSWORD", "apikey", "SECRET"])
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["--tokenizer", "MAX_TOKENS", "--port", "--no-auth", "PWD", "--model", "monkey"])
def test_ordinary_names(name):
    assert not is_secret_name(name)


# -- a real swapd ----------------------------------------------------------------------

SECRETS = ("hf-SECRET-one", "sk-SECRET-two", "sk-SECRET-three", "pw-SECRET-four", "pw-SECRET-five")


def _read_sse(port: int, seconds: float) -> bytes:
    """Whatever /api/events sends within ``seconds``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=seconds)
    data = b""
    try:
        conn.request("GET", "/api/events", headers={"Accept": "text/event-stream"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                chunk = resp.read1(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        conn.close()
    return data


def test_secrets_in_cmd_and_proxy_are_shown_nowhere(swapd):
    backend_cmd = (
        f"env HF_TOKEN={SECRETS[0]} OPENAI_API_KEY={SECRETS[1]} "
        f"{PY} -m swapd.fake_backend --port ${{PORT}} --api-key={SECRETS[2]}"
    )
    s = swapd(
        {"m1": {"cmd": backend_cmd, "proxy": f"http://swapuser:{SECRETS[3]}@127.0.0.1:${{PORT}}"}},
        peers={"remote": {"proxy": f"http://peeruser:{SECRETS[4]}@127.0.0.1:{free_port()}", "models": ["r1"]}},
    )
    # the backend wants its own key, which the client lacks: a 401 from a loaded backend
    assert s.chat("m1").status == 401
    running = s.running()["m1"]
    assert running["state"] == "ready"
    assert running["proxy"].startswith(f"http://{MASK}@127.0.0.1:")
    assert f"HF_TOKEN={MASK}" in running["cmd"] and f"--api-key={MASK}" in running["cmd"]
    wait_until(lambda: "backend.start" in s.get("/logs").body.decode(), message="backend.start in /logs")

    shown = {
        "/running": s.get("/running").body,
        "/logs": s.get("/logs").body,
        "/api/events": _read_sse(s.port, 1.5),
        "swapd's own log": s.log_text().encode(),
    }
    assert b"backend.start" in shown["/api/events"], shown["/api/events"][:500]
    for where, body in shown.items():
        for secret in SECRETS:
            assert secret.encode() not in body, f"{secret} leaked into {where}"
