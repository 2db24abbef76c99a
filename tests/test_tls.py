"""HTTPS with --tls-cert-file/--tls-key-file (llama-swap's flags), against a real swapd process."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import os
import shutil
import ssl
import subprocess

import pytest

from helpers import PY, ROOT, free_port, model


def _self_signed(tmp_path):
    """A certificate for 127.0.0.1/localhost and its key, made for this test."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor openssl is available")
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-days", "2", "-subj", "/CN=localhost",
                "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                "-keyout", str(key), "-out", str(cert),
            ],
            check=True,
            capture_output=True,
        )
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key


def _client_context(cert) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))  # verifies the chain and 127.0.0.1
    return context


@pytest.mark.parametrize("dash", ["--", "-"], ids=["double-dash", "single-dash"])
def test_serves_https_with_the_given_certificate(swapd, tmp_path, dash):
    cert, key = _self_signed(tmp_path)
    s = swapd(
        {"m1": model("--chunks", "3")},
        extra_args=(f"{dash}tls-cert-file", str(cert), f"{dash}tls-key-file", str(key)),
        ssl_context=_client_context(cert),
    )
    r = s.chat("m1")
    assert r.status == 200 and r.json()["object"] == "chat.completion"
    status, _, events = s.stream("m1")
    assert status == 200 and events[-1][1] == "[DONE]" and len(events) >= 4
    # The peer certificate really is ours.
    conn = s.connection(timeout=10)
    conn.connect()
    der = conn.sock.getpeercert(binary_form=True)
    conn.close()
    assert ssl.DER_cert_to_PEM_cert(der).strip() == cert.read_text().strip()
    listening = next(e for e in s.log_events() if e["event"] == "swapd.listening")
    assert listening["tls"] is True and listening["url"] == f"https://127.0.0.1:{s.port}"


def test_plain_http_to_the_tls_port_gets_no_answer(swapd, tmp_path):
    cert, key = _self_signed(tmp_path)
    s = swapd({"m1": model()}, extra_args=("--tls-cert-file", str(cert), "--tls-key-file", str(key)), ssl_context=_client_context(cert))
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        conn.request("GET", "/health")
        conn.getresponse()
    conn.close()
    assert s.get("/health").status == 200  # and HTTPS still works afterwards


def _run(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([PY, "-m", "swapd", *args], capture_output=True, text=True, timeout=30, env=env, cwd=ROOT)


@pytest.mark.parametrize("given", ["cert", "key"])
def test_one_tls_flag_without_the_other_is_refused(tmp_path, given):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models: {}\n")
    flag = ["--tls-cert-file", str(cert)] if given == "cert" else ["-tls-key-file", str(key)]
    out = _run("--config", str(cfg), "--listen", f"127.0.0.1:{free_port()}", *flag)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    line = out.stderr.strip()
    assert "\n" not in line
    assert "--tls-cert-file" in line and "--tls-key-file" in line


def test_unloadable_certificate_is_a_clear_start_error(tmp_path):
    cert, key = _self_signed(tmp_path)
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models: {}\n")
    port = f"127.0.0.1:{free_port()}"
    for cert_arg, key_arg, expect in ((bad, key, "bad.pem"), (cert, tmp_path / "missing.pem", "missing.pem")):
        out = _run("--config", str(cfg), "--listen", port, "--tls-cert-file", str(cert_arg), "--tls-key-file", str(key_arg))
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr
        line = out.stderr.strip()
        assert "\n" not in line and "TLS" in line and expect in line, line
