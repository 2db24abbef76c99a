"""Build the stub libnvidia-ml.so.1 (nvml_stub.c) for tests on machines without a GPU.

The library is compiled with ``cc`` into a cache directory named after the
source's hash, so it is rebuilt exactly when the source changes. Processes
load it through ``LD_LIBRARY_PATH=<dir>``; the test process itself can load it
with :func:`preload`, after which nvidia-ml-py's ``CDLL("libnvidia-ml.so.1")``
finds it by its soname.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "nvml_stub.c"
LIBNAME = "libnvidia-ml.so.1"


def build_stub(cache_dir: Path) -> Path:
    """Compile the stub if needed; return the directory holding ``libnvidia-ml.so.1``."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    out_dir = Path(cache_dir) / f"nvml-stub-{digest}"
    lib = out_dir / LIBNAME
    if lib.exists():
        return out_dir
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) found; it is needed to build the NVML stub for the GPU tests")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{LIBNAME}.{os.getpid()}.tmp"
    cmd = [compiler, "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror",
           f"-Wl,-soname,{LIBNAME}", "-o", str(tmp), str(SOURCE)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the NVML stub failed ({' '.join(cmd)}):\n{proc.stderr}")
    os.replace(tmp, lib)  # atomic: parallel builders never see half a library
    return out_dir


def stub_dir_for(request, tmp_path_factory) -> Path:
    """The body of a session fixture: the stub, cached in pytest's cache dir."""
    cache = getattr(request.config, "cache", None)
    where = cache.mkdir("nvml_stub") if cache is not None else tmp_path_factory.mktemp("nvml_stub")
    return build_stub(where)


def stub_env(lib_dir: Path, state_dir: Path) -> dict[str, str]:
    """Environment that makes a child process load the stub and read ``state_dir``."""
    return {
        "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(lib_dir), os.environ.get("LD_LIBRARY_PATH")])),
        "SWAPD_STUB_NVML_STATE": str(state_dir),
    }


def preload(lib_dir: Path) -> ctypes.CDLL:
    """Load the stub into this process so nvidia-ml-py picks it up by soname."""
    return ctypes.CDLL(str(Path(lib_dir) / LIBNAME), mode=ctypes.RTLD_GLOBAL)
