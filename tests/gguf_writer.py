"""A tiny GGUF v3 writer for tests: metadata typed from Python values, zero-filled tensors.

Independent of swapd's reader (tests/test_modelinfo.py, tests/test_capabilities.py):
the layout follows ggml's docs/gguf.md.
"""

from __future__ import annotations

import struct
from pathlib import Path

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B", U64: "<Q",
        I64: "<q", F64: "<d"}
# ggml type -> (elements per block, bytes per block) for the types tests use
BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 8: (32, 34)}


class Typed:
    """A value with an explicit GGUF type (``Typed(U16, 3)``, ``Typed(ARR, (I32, [1, 2]))``)."""

    def __init__(self, vtype: int, value) -> None:
        self.vtype, self.value = vtype, value


def _string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _typed(value) -> tuple[int, object]:
    if isinstance(value, Typed):
        return value.vtype, value.value
    if isinstance(value, bool):
        return BOOL, value
    if isinstance(value, int):
        return (U32 if 0 <= value < 1 << 32 else I64), value
    if isinstance(value, float):
        return F32, value
    if isinstance(value, (str, bytes)):
        return STR, value
    if isinstance(value, list):
        if value and isinstance(value[0], str):
            return ARR, (STR, value)
        return ARR, (I32, value)
    raise TypeError(f"no GGUF type for {value!r}")


def _encode(vtype: int, value) -> bytes:
    if vtype == STR:
        return _string(value)
    if vtype == ARR:
        itype, items = value
        return struct.pack("<IQ", itype, len(items)) + b"".join(_encode(itype, x) for x in items)
    return struct.pack(_FMT[vtype], value)


def gguf_bytes(metadata: dict, tensors=(), *, alignment: int = 32) -> bytes:
    """``metadata``: key -> value (typed from Python, or ``Typed``); ``tensors``: (name, shape, ggml type)."""
    out = [b"GGUF", struct.pack("<Iqq", 3, len(tensors), len(metadata))]
    for key, raw in metadata.items():
        vtype, value = _typed(raw)
        out += [_string(key), struct.pack("<I", vtype), _encode(vtype, value)]
    offset = 0
    for name, shape, ttype in tensors:
        out += [_string(name), struct.pack("<I", len(shape)), struct.pack(f"<{len(shape)}q", *shape)]
        out.append(struct.pack("<IQ", ttype, offset))
        block, size = BLOCKS[ttype]
        n = 1
        for d in shape:
            n *= d
        offset += -(-(n // block * size) // alignment) * alignment
    head = b"".join(out)
    head += b"\0" * (-len(head) % alignment)
    return head + b"\0" * offset


def llama_metadata(arch: str = "llama", *, context: int = 512, file_type: int | None = 15, extra=None) -> dict:
    """The keys of a small decoder model; ``extra`` adds or replaces keys ("{arch}" in a key is the arch)."""
    meta = {
        "general.architecture": arch,
        "general.name": "tiny",
        f"{arch}.block_count": 2,
        f"{arch}.context_length": context,
        f"{arch}.embedding_length": 64,
        f"{arch}.feed_forward_length": 128,
        f"{arch}.attention.head_count": 4,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(100)],
        "tokenizer.ggml.token_type": [1] * 100,
    }
    if file_type is not None:
        meta["general.file_type"] = file_type
    meta.update({k.replace("{arch}", arch): v for k, v in (extra or {}).items()})
    return meta


TINY_TENSORS = (
    ("token_embd.weight", (64, 100), 0),
    ("blk.0.attn_q.weight", (64, 64), 1),
    ("blk.1.attn_q.weight", (64, 64), 1),
    ("output.weight", (64, 100), 8),
)
TINY_PARAMETERS = 64 * 100 + 2 * 64 * 64 + 64 * 100


def write_gguf(path: Path, metadata: dict | None = None, tensors=TINY_TENSORS) -> Path:
    path.write_bytes(gguf_bytes(llama_metadata() if metadata is None else metadata, tensors))
    return path
