"""What swapd knows about a model from its config and its GGUF file, without starting it.

:func:`facts` reads the GGUF named by the model's ``cmd`` (``-m``/``--model``,
or ``LLAMA_ARG_MODEL`` in its ``env``; split files are summed) through the
header reader of :mod:`swapd.gpu.estimate` (metadata and tensor infos, never
tensor data), parses the llama-server flags that change what the model can
do, and applies the model's ``capabilities`` key, which always wins over what
is read from the file. The answer, a :class:`ModelFacts`, feeds the
capabilities of ``GET /v1/models`` (swapd.server.capabilities) and the Ollama
API's ``/api/tags`` and ``/api/show``.

Blocking: :func:`facts` stats files and, the first time it sees a file (or
after its size or mtime changed), reads its header: a few ms for a small
model, longer for a big vocabulary or a slow disk. Never call it on the event
loop; callers there use ``await asyncio.to_thread(facts, model)`` (one thread
hop for all the models a request needs). It is thread-safe and never raises.

Caching: headers are cached per file (path, size, mtime, inode), and the
finished :class:`ModelFacts` per (command, environment, ``capabilities``,
those file keys), both bounded LRU. A repeated call costs one ``stat`` per
file named in the command, and returns the same object.

Where each fact comes from (llama.cpp's spellings; long options may use
``_`` for ``-``, and ``LLAMA_ARG_*`` variables apply unless the command line
overrides them):

* ``context_length``: ``capabilities.context`` when set; else ``-c``/``--ctx-size``
  (``0`` means the trained context); else ``<arch>.context_length``.
* ``vision``/``audio``: ``--mmproj`` (``-mm``) or ``--mmproj-url`` (``-mmu``),
  unless ``--no-mmproj``; when the projector file is readable, its
  ``clip.has_vision_encoder``/``clip.has_audio_encoder`` decide (a projector
  without either key is taken as vision).
* ``tools``: the chat template in use (``--chat-template-file``, a Jinja
  ``--chat-template``, else the GGUF's ``tokenizer.chat_template``) mentions
  ``tools``; not with ``--no-jinja`` or a built-in template name, and never
  for embedding or reranking models.
* ``embedding``: ``--embedding``/``--embeddings``, or the GGUF says so: an
  encoder architecture (bert, nomic-bert, ...), ``<arch>.attention.causal``
  false, or ``<arch>.pooling_type`` mean, cls or last.
* ``reranker``: ``--rerank``/``--reranking``, or ``<arch>.pooling_type`` rank.
  A reranker is not counted as an embedding model.
* with a non-empty ``capabilities`` key: ``vision`` = ``image`` in ``in``,
  ``audio`` = ``audio`` in ``in``, ``tools`` and ``reranker`` as configured,
  and ``embedding`` only if the file says so and ``out`` has no ``text``.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from swapd.config import ModelConfig
from swapd.gpu import estimate

CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
MAX_TEMPLATE_BYTES = estimate.KEEP_LONG_STRING_BYTES  # the same cap for a --chat-template-file
CACHE_SIZE = 128  # entries in each of the two caches
MODEL_INFO_ARRAY_ITEMS = 1024  # longer numeric arrays are left out of ``metadata``

# llama_ftype (include/llama.h) -> Ollama's quantization_level spelling (fs/ggml FileType.String),
# llama-quantize's names where Ollama has none; 1024 (guessed) and unknown ids give "".
QUANTIZATION_NAMES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
    41: "Q2_0",
}

# encoder-only architectures: embedding models whatever their flags (llama.cpp src/llama-arch.cpp names)
EMBEDDING_ARCHS = frozenset(
    {
        "bert",
        "nomic-bert",
        "nomic-bert-moe",
        "jina-bert-v2",
        "jina-bert-v3",
        "neo-bert",
        "modern-bert",
        "t5encoder",
        "gemma-embedding",
    }
)
# llama_pooling_type: 1 mean, 2 cls, 3 last pool into an embedding; 4 rank scores a pair
_POOLING_EMBEDDING = (1, 2, 3)
_POOLING_RANK = 4
_TOOLS_RE = re.compile(r"\btools\b")


@dataclass(frozen=True)
class ModelFacts:
    """What is known about one model without starting it (see the module doc for the sources)."""

    path: str | None  # the GGUF (first split) named in cmd (-m/--model), None when none or unreadable
    size_bytes: int | None  # sum of the split files' sizes
    modified: float | None  # mtime of the file (epoch seconds)
    architecture: str  # general.architecture ("" if unknown)
    family: str  # Ollama's "family" (the architecture, e.g. "llama")
    parameter_count: int | None  # general.parameter_count, else the sum of tensor element counts
    parameter_size: str  # Ollama style: "135M", "8.0B" ("" if unknown)
    quantization: str  # Ollama style from general.file_type: "Q4_K_M", "Q8_0", "F16", ... ("" if unknown)
    context_length: int | None  # capabilities.context, else -c/--ctx-size (0: trained), else the trained one
    trained_context: int | None  # <arch>.context_length
    embedding_length: int | None  # <arch>.embedding_length
    vision: bool  # --mmproj in cmd (or config capabilities.in has image)
    audio: bool  # an audio projector (or config capabilities.in has audio)
    tools: bool  # the chat template mentions tools (or config capabilities.tools)
    embedding: bool  # --embedding(s) in cmd, or the GGUF is an embedding model
    reranker: bool  # --rerank(ing) in cmd, GGUF pooling rank, or config capabilities.reranker
    chat_template: str | None  # the template llama-server would use (a --chat-template-file, else the GGUF's)
    # GGUF key/values for Ollama's model_info: scalars, short strings and arrays (tuples), no
    # tokenizer arrays or chat template; general.parameter_count added when the file has none
    metadata: Mapping[str, Any]
    error: str  # why the file could not be read ("" when fine or when there is no file)


def capabilities_list(f: ModelFacts) -> list[str]:
    """Ollama's ``/api/show`` ``capabilities``: "completion" unless an embedding or reranking model, then the rest."""
    caps = [] if f.embedding or f.reranker else ["completion"]
    if f.tools:
        caps.append("tools")
    if f.vision:
        caps.append("vision")
    if f.embedding:
        caps.append("embedding")
    return caps


def parameter_size(count: int | None) -> str:
    """Ollama's HumanNumber: 134515008 -> "134.52M", 8030261248 -> "8.0B", 7000000000 -> "7B"."""
    if count is None or count < 0:
        return ""
    for scale, unit, places in ((1_000_000_000, "B", 1), (1_000_000, "M", 2)):
        if count >= scale:
            value = count / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{places}f}{unit}"
    if count >= 1000:
        return f"{count / 1000:.0f}K"
    return str(count)


def quantization_name(file_type: Any) -> str:
    """The name of a ``general.file_type`` value ("" when unknown)."""
    if isinstance(file_type, bool) or not isinstance(file_type, int):
        return ""
    return QUANTIZATION_NAMES.get(file_type, "")


# -- the command line ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Flags:
    """What the command says beyond estimate.LlamaFlags (which gives -m, -c and --mmproj)."""

    embedding: bool = False
    reranking: bool = False
    jinja: bool = True  # llama-server's default
    no_mmproj: bool = False
    mmproj_url: str | None = None
    chat_template: str | None = None
    chat_template_file: str | None = None


_SWITCH_FLAGS: dict[str, tuple[str, bool]] = {
    "--embedding": ("embedding", True),
    "--embeddings": ("embedding", True),
    "--rerank": ("reranking", True),
    "--reranking": ("reranking", True),
    "--jinja": ("jinja", True),
    "--no-jinja": ("jinja", False),
    "--no-mmproj": ("no_mmproj", True),
}
_VALUE_FLAGS: dict[str, str] = {
    "-mmu": "mmproj_url",
    "--mmproj-url": "mmproj_url",
    "--chat-template": "chat_template",
    "--chat-template-file": "chat_template_file",
}
_ENV_FLAGS: tuple[tuple[str, str, bool], ...] = (  # variable, field, is a switch
    ("LLAMA_ARG_EMBEDDINGS", "embedding", True),
    ("LLAMA_ARG_RERANKING", "reranking", True),
    ("LLAMA_ARG_JINJA", "jinja", True),
    ("LLAMA_ARG_NO_MMPROJ", "no_mmproj", True),
    ("LLAMA_ARG_MMPROJ_URL", "mmproj_url", False),
    ("LLAMA_ARG_CHAT_TEMPLATE", "chat_template", False),
    ("LLAMA_ARG_CHAT_TEMPLATE_FILE", "chat_template_file", False),
)
_TRUTHY = ("on", "enabled", "true", "1")
_FALSEY = ("off", "disabled", "false", "0")


def _not_llama_server(cmd: Sequence[str]) -> bool:
    """vLLM, llama-cpp-python, or any ``python ...`` (where ``-m`` names a module, not a model)."""
    return os.path.basename(cmd[0]).startswith("python") or estimate._foreign(cmd) is not None


def _flags(cmd: Sequence[str], env: Mapping[str, str]) -> _Flags:
    values: dict[str, Any] = {}
    for var, key, switch in _ENV_FLAGS:
        if var not in env:
            continue
        raw = env[var]
        if not switch:
            values[key] = raw
        elif raw in _TRUTHY or raw in _FALSEY:
            values[key] = raw in _TRUTHY
    for key, value in estimate.walk_options(cmd, _SWITCH_FLAGS, _VALUE_FLAGS):
        if value is not None:  # a last option missing its value changes nothing
            values[key] = value
    return _Flags(**values)


# -- file reads, cached per (path, size, mtime, inode) ---------------------------------------
@dataclass(frozen=True)
class _Gguf:
    """The summary of one model file (all its split parts) that ModelFacts is built from."""

    path: str
    size_bytes: int
    modified: float
    architecture: str
    parameter_count: int
    file_type: Any
    trained_context: int | None
    embedding_length: int | None
    embedding: bool
    reranker: bool
    chat_template: str | None
    metadata: Mapping[str, Any]


_FileKey = tuple[str, int, int, int, int]
_lock = threading.Lock()
_files: OrderedDict[tuple[str, _FileKey], Any] = OrderedDict()
_facts: OrderedDict[tuple[Any, ...], ModelFacts] = OrderedDict()
_T = TypeVar("_T")


def clear_cache() -> None:
    """Forget every cached read and answer (tests; the caches also age out by themselves)."""
    with _lock:
        _files.clear()
        _facts.clear()


def _remember(cache: OrderedDict, key: Any, value: _T) -> _T:
    with _lock:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
    return value


def _recall(cache: OrderedDict, key: Any) -> Any:
    with _lock:
        value = cache.get(key)
        if value is not None:
            cache.move_to_end(key)
        return value


def _file_key(path: str) -> _FileKey:
    """Who the file is now; raises OSError (missing, unreadable) or GgufError (not a regular file)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise estimate.GgufError("not a regular file")
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


@dataclass(frozen=True)
class _Failure:
    """Why a file could not be read (cached like a result, so a broken file is not read on every call)."""

    message: str


def _cached_read(kind: str, key: _FileKey, read: Callable[[_FileKey], Any]) -> Any:
    """``read(key)`` once per file version; an error gives a cached _Failure."""
    found = _recall(_files, (kind, key))
    if found is not None:
        return found
    try:
        value = read(key)
    except estimate.GgufError as exc:
        value = _Failure(f"unreadable GGUF: {exc}")
    except OSError as exc:
        value = _Failure(f"cannot read the file: {exc.strerror or exc}")
    except Exception as exc:  # never raise on a strange file
        value = _Failure(f"cannot read the file: {type(exc).__name__}: {exc}")
    return _remember(_files, (kind, key), value)


def _read_gguf(key: _FileKey) -> _Gguf:
    path = key[0]
    headers = estimate.read_model(path, keep_long=(CHAT_TEMPLATE_KEY,))
    meta = headers[0].metadata
    arch = headers[0].arch

    def arch_int(name: str) -> int | None:
        value = meta.get(f"{arch}.{name}")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    count = meta.get("general.parameter_count")
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        count = 0
        for h in headers:
            for t in h.tensors:
                n = 1
                for d in t.shape:
                    n *= d
                count += n
    pooling = arch_int("pooling_type")
    reranker = pooling == _POOLING_RANK
    embedding = not reranker and (
        arch in EMBEDDING_ARCHS or meta.get(f"{arch}.attention.causal") is False or pooling in _POOLING_EMBEDDING
    )
    template = meta.get(CHAT_TEMPLATE_KEY)
    return _Gguf(
        path=path,
        size_bytes=sum(h.file_size for h in headers),
        modified=key[2] / 1e9,
        architecture=arch,
        parameter_count=count,
        file_type=meta.get("general.file_type"),
        trained_context=arch_int("context_length"),
        embedding_length=arch_int("embedding_length"),
        embedding=embedding,
        reranker=reranker,
        chat_template=template if isinstance(template, str) else None,
        metadata=_model_info(meta, count),
    )


def _model_info(meta: Mapping[str, Any], count: int) -> Mapping[str, Any]:
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if value is None or key == CHAT_TEMPLATE_KEY:
            continue  # skipped by the reader (long strings, vocabularies), or shown on its own
        if isinstance(value, list):
            if key.startswith("tokenizer.ggml.") or len(value) > MODEL_INFO_ARRAY_ITEMS:
                continue
            value = tuple(value)
        out[key] = value
    out.setdefault("general.parameter_count", count)
    return MappingProxyType(out)


def _read_mmproj(key: _FileKey) -> tuple[bool, bool]:
    """(vision, audio) of a multimodal projector."""
    meta = estimate.read_header(key[0]).metadata
    vision, audio = meta.get("clip.has_vision_encoder"), meta.get("clip.has_audio_encoder")
    if vision is None and audio is None:
        return True, False  # an older projector: vision only
    return bool(vision), bool(audio)


def _read_text(key: _FileKey) -> str:
    with open(key[0], "rb") as f:
        return f.read(MAX_TEMPLATE_BYTES).decode("utf-8", errors="replace")


# -- facts -------------------------------------------------------------------------------------
def facts(model: ModelConfig) -> ModelFacts:
    """What is known about ``model`` (blocking: call it in a thread from the event loop; never raises)."""
    try:
        return _facts_of(model)
    except Exception as exc:  # a bug here must never break a listing
        return _assemble(model, estimate.LlamaFlags(), _Flags(), None, f"{type(exc).__name__}: {exc}", None, None)


def _facts_of(model: ModelConfig) -> ModelFacts:
    env = {**os.environ, **dict(model.env)}  # what the process gets (swapd spawns with its own environment)
    cmd = model.cmd
    if not cmd or _not_llama_server(cmd):
        lflags, xflags = estimate.LlamaFlags(), _Flags()
    else:
        lflags, xflags = estimate.llama_flags(cmd, env), _flags(cmd, env)
    keys: list[Any] = [lflags, xflags, model.capabilities]
    gguf_key = mmproj_key = template_key = None
    error = ""
    if lflags.model:
        try:
            gguf_key = _file_key(lflags.model)
        except estimate.GgufError as exc:
            error = f"unreadable GGUF: {exc}"
        except OSError as exc:
            error = f"cannot read the model file: {exc.strerror or exc}"
    if lflags.mmproj and not xflags.no_mmproj:
        try:
            mmproj_key = _file_key(lflags.mmproj)
        except (OSError, estimate.GgufError):
            pass  # named but unreadable: still a vision model to llama-server's client
    if xflags.chat_template_file:
        try:
            template_key = _file_key(xflags.chat_template_file)
        except (OSError, estimate.GgufError):
            pass
    keys += [gguf_key, mmproj_key, template_key, error]
    key = tuple(keys)
    found = _recall(_facts, key)
    if found is not None:
        return found
    gguf: _Gguf | None = None
    if gguf_key is not None:
        read = _cached_read("gguf", gguf_key, _read_gguf)
        if isinstance(read, _Failure):
            error = read.message
        else:
            gguf = read
    mmproj = _cached_read("mmproj", mmproj_key, _read_mmproj) if mmproj_key is not None else None
    template = _cached_read("text", template_key, _read_text) if template_key is not None else None
    result = _assemble(
        model,
        lflags,
        xflags,
        gguf,
        error,
        mmproj if isinstance(mmproj, tuple) else None,
        template if isinstance(template, str) else None,
    )
    return _remember(_facts, key, result)


def _assemble(
    model: ModelConfig,
    lflags: estimate.LlamaFlags,
    xflags: _Flags,
    gguf: _Gguf | None,
    error: str,
    mmproj: tuple[bool, bool] | None,
    template_file: str | None,
) -> ModelFacts:
    caps = model.capabilities
    trained = gguf.trained_context if gguf else None
    context: int | None = trained
    if lflags.ctx_size is not None and lflags.ctx_size > 0:
        context = lflags.ctx_size
    # the projector: named in the command (a file or a URL), unless --no-mmproj
    vision = audio = False
    if not xflags.no_mmproj and (lflags.mmproj or xflags.mmproj_url):
        vision, audio = mmproj if mmproj is not None else (True, False)
    # the template llama-server would use
    if xflags.chat_template_file:
        template = template_file
    elif xflags.chat_template is not None:
        jinja_text = "{%" in xflags.chat_template or "{{" in xflags.chat_template
        template = xflags.chat_template if jinja_text else None  # a built-in name: no tools
    else:
        template = gguf.chat_template if gguf else None
    reranker = xflags.reranking or bool(gguf and gguf.reranker)
    embedding = not reranker and (xflags.embedding or bool(gguf and gguf.embedding))
    tools = bool(xflags.jinja and template and _TOOLS_RE.search(template)) and not (embedding or reranker)
    if not caps.empty:  # the config key wins
        vision, audio = "image" in caps.inputs, "audio" in caps.inputs
        tools, reranker = caps.tools, caps.reranker
        embedding = embedding and not reranker and "text" not in caps.outputs
        if caps.context > 0:
            context = caps.context
    count = gguf.parameter_count if gguf else None
    return ModelFacts(
        path=gguf.path if gguf else None,
        size_bytes=gguf.size_bytes if gguf else None,
        modified=gguf.modified if gguf else None,
        architecture=gguf.architecture if gguf else "",
        family=gguf.architecture if gguf else "",
        parameter_count=count,
        parameter_size=parameter_size(count),
        quantization=quantization_name(gguf.file_type) if gguf else "",
        context_length=context,
        trained_context=trained,
        embedding_length=gguf.embedding_length if gguf else None,
        vision=vision,
        audio=audio,
        tools=tools,
        embedding=embedding,
        reranker=reranker,
        chat_template=template,
        metadata=gguf.metadata if gguf else MappingProxyType({}),
        error=error,
    )
