"""swapd.modelinfo: what a model is, from its config, its command line and its GGUF, without starting it.

Against the real SmolLM2-135M GGUF (as tests/test_estimate.py finds it, skipped
when absent) and against small GGUF files written here (tests/gguf_writer.py).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from gguf_writer import BOOL, TINY_PARAMETERS, U16, Typed, gguf_bytes, llama_metadata, write_gguf
from test_estimate import smollm2  # noqa: F401 - the fixture

from swapd import modelinfo
from swapd.config import Capabilities, ModelConfig, load_config_text
from swapd.gpu import estimate
from swapd.modelinfo import capabilities_list, facts, parameter_size, quantization_name

SERVER = "llama-server"
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call one of these functions:\n{%- for tool in tools %}"
    "{{ tool | tojson }}{%- endfor %}<|im_end|>{%- endif %}{%- for m in messages %}{{ m.content }}{%- endfor %}"
)
PLAIN_TEMPLATE = "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{%- endfor %}"


@pytest.fixture(autouse=True)
def _fresh_cache():
    modelinfo.clear_cache()
    yield
    modelinfo.clear_cache()


def mc(*args: str, env: dict | None = None, caps: Capabilities | None = None, cmd0: str = SERVER) -> ModelConfig:
    """A ModelConfig whose command is ``cmd0 --port 9 *args`` (never started)."""
    return ModelConfig(
        id="m",
        cmd=(cmd0, "--port", "9", *args),
        cmd_stop=(),
        proxy="http://127.0.0.1:9",
        port=9,
        aliases=(),
        env=tuple((env or {}).items()),
        check_endpoint="/health",
        ttl=0.0,
        unload_timeout=5.0,
        health_check_timeout=15.0,
        unlisted=False,
        use_model_name="",
        name="",
        description="",
        concurrency_limit=10,
        capabilities=caps or Capabilities(),
    )


def tiny(tmp_path: Path, name: str = "tiny.gguf", **kw) -> str:
    extra = kw.pop("extra", None)
    return str(write_gguf(tmp_path / name, llama_metadata(extra=extra, **kw)))


# -- the real model ---------------------------------------------------------------------------


def test_smollm2_facts(smollm2):  # noqa: F811 - the fixture
    path = str(smollm2)
    header = estimate.read_header(path)
    elements = 0
    for t in header.tensors:
        n = 1
        for d in t.shape:
            n *= d
        elements += n
    f = facts(mc("-m", path))
    assert f.error == "" and f.path == os.path.abspath(path)
    assert (f.architecture, f.family) == ("llama", "llama")
    assert f.parameter_count == elements and 134_000_000 < elements < 136_000_000  # SmolLM2-135M
    assert f.parameter_size == parameter_size(elements) and f.parameter_size.endswith("M")
    assert f.quantization == "Q4_1"  # the file setup fetches; general.file_type 3
    assert f.size_bytes == smollm2.stat().st_size and f.modified == smollm2.stat().st_mtime
    assert f.trained_context == f.context_length == 8192 and f.embedding_length == 576
    assert facts(mc("-m", path, "-c", "2048")).context_length == 2048
    assert facts(mc("-m", path, "-c", "0")).context_length == 8192
    # its chat template (over 1024 bytes is kept) handles no tools; it is a chat model
    assert f.chat_template and "<|im_start|>" in f.chat_template
    assert not f.tools and not f.vision and not f.embedding and not f.reranker
    assert capabilities_list(f) == ["completion"]
    # model_info: scalars and short values, no vocabulary, no template
    assert f.metadata["general.architecture"] == "llama" and f.metadata["llama.block_count"] == 30
    assert f.metadata["general.parameter_count"] == elements
    assert not any(k.startswith("tokenizer.ggml.") and isinstance(v, (list, tuple)) for k, v in f.metadata.items())
    assert "tokenizer.chat_template" not in f.metadata and None not in f.metadata.values()
    # --embedding makes it an embedding-only server; --mmproj a vision one (the file need not exist here)
    e = facts(mc("-m", path, "--embedding"))
    assert e.embedding and not e.tools and capabilities_list(e) == ["embedding"]
    v = facts(mc("-m", path, "--mmproj", str(smollm2.parent / "absent-mmproj.gguf")))
    assert v.vision and capabilities_list(v) == ["completion", "vision"]


# -- Ollama's spellings -----------------------------------------------------------------------


def test_parameter_size_is_ollamas_human_number():
    assert parameter_size(134_515_008) == "134.52M"
    assert parameter_size(8_030_261_248) == "8.0B"
    assert parameter_size(7_000_000_000) == "7B"
    assert parameter_size(135_000_000) == "135M"
    assert parameter_size(1_500_000_000) == "1.5B"
    assert parameter_size(22_700) == "23K"
    assert parameter_size(999) == "999"
    assert parameter_size(None) == ""


@pytest.mark.parametrize(
    ("file_type", "name"),
    [(0, "F32"), (1, "F16"), (2, "Q4_0"), (7, "Q8_0"), (15, "Q4_K_M"), (14, "Q4_K_S"), (18, "Q6_K"),
     (32, "BF16"), (30, "IQ4_XS"), (1024, ""), (None, ""), (999, "")],
)
def test_quantization_from_file_type(tmp_path, file_type, name):
    f = facts(mc("-m", tiny(tmp_path, file_type=file_type)))
    assert f.error == "" and f.quantization == name
    assert quantization_name(True) == ""


def test_architecture_family_and_parameters_of_a_small_file(tmp_path):
    f = facts(mc("-m", tiny(tmp_path, arch="qwen3")))
    assert (f.architecture, f.family) == ("qwen3", "qwen3")
    assert f.parameter_count == TINY_PARAMETERS and f.parameter_size == "21K"
    assert f.embedding_length == 64 and f.metadata["qwen3.block_count"] == 2
    # general.parameter_count in the file is taken as it is
    stated = facts(mc("-m", tiny(tmp_path, "p.gguf", extra={"general.parameter_count": Typed(10, 8_030_261_248)})))
    assert stated.parameter_count == 8_030_261_248 and stated.parameter_size == "8.0B"


def test_split_files_are_one_model(tmp_path):
    tensors = [(("token_embd.weight", (64, 100), 0),), (("blk.0.attn_q.weight", (64, 64), 1),)]
    parts = []
    for no in range(2):
        meta = llama_metadata() if no == 0 else {"general.architecture": "llama"}
        meta |= {"split.no": Typed(U16, no), "split.count": Typed(U16, 2)}
        path = tmp_path / f"m-{no + 1:05d}-of-00002.gguf"
        path.write_bytes(gguf_bytes(meta, tensors[no]))
        parts.append(path)
    f = facts(mc("-m", str(parts[0])))
    assert f.error == "" and f.path == str(parts[0])
    assert f.size_bytes == sum(p.stat().st_size for p in parts)
    assert f.parameter_count == 64 * 100 + 64 * 64


# -- the command line -----------------------------------------------------------------------


def test_context_from_the_command_the_environment_and_the_file(tmp_path):
    path = tiny(tmp_path, context=512)
    assert facts(mc("-m", path)).context_length == 512
    assert facts(mc("-m", path, "-c", "4096")).context_length == 4096
    assert facts(mc("-m", path, "--ctx-size", "0")).context_length == 512
    assert facts(mc("-m", path, "--ctx_size", "2000")).context_length == 2000  # llama.cpp's _ spelling
    assert facts(mc("-m", path, env={"LLAMA_ARG_CTX_SIZE": "1024"})).context_length == 1024
    assert facts(mc("-m", path, "-c", "64", env={"LLAMA_ARG_CTX_SIZE": "1024"})).context_length == 64
    assert facts(mc(env={"LLAMA_ARG_MODEL": path})).trained_context == 512  # the model from the environment
    f = facts(mc("-m", path, "-c", "4096"))
    assert f.trained_context == 512


def test_vision_and_audio_from_the_projector(tmp_path):
    path = tiny(tmp_path)
    assert not facts(mc("-m", path)).vision
    # named but absent (or unreadable): llama-server would refuse to start without it; the intent is vision
    f = facts(mc("-m", path, "--mmproj", str(tmp_path / "nope.gguf")))
    assert f.vision and not f.audio and f.error == ""
    both = write_gguf(tmp_path / "mmproj-av.gguf", {"general.architecture": "clip", "clip.has_vision_encoder": True,
                                                    "clip.has_audio_encoder": True}, ())
    f = facts(mc("-m", path, "-mm", str(both)))
    assert f.vision and f.audio and capabilities_list(f) == ["completion", "vision"]
    audio = write_gguf(tmp_path / "mmproj-a.gguf", {"general.architecture": "clip",
                                                    "clip.has_vision_encoder": Typed(BOOL, False),
                                                    "clip.has_audio_encoder": True}, ())
    f = facts(mc("-m", path, "--mmproj", str(audio)))
    assert f.audio and not f.vision
    old = write_gguf(tmp_path / "mmproj-old.gguf", {"general.architecture": "clip"}, ())
    assert facts(mc("-m", path, "--mmproj", str(old))).vision
    assert facts(mc("-m", path, "-mmu", "https://example.invalid/mmproj.gguf")).vision
    assert not facts(mc("-m", path, "--mmproj", str(both), "--no-mmproj")).vision
    assert facts(mc("-m", path, env={"LLAMA_ARG_MMPROJ": str(both)})).vision


def test_tools_from_the_chat_template(tmp_path, monkeypatch):
    long_tools = TOOLS_TEMPLATE + "{# " + "x" * 4000 + " #}"  # past the reader's 1 KiB string limit
    tools = tiny(tmp_path, "tools.gguf", extra={"tokenizer.chat_template": long_tools})
    plain = tiny(tmp_path, "plain.gguf", extra={"tokenizer.chat_template": PLAIN_TEMPLATE})
    f = facts(mc("-m", tools))
    assert f.tools and f.chat_template == long_tools
    assert capabilities_list(f) == ["completion", "tools"]
    assert not facts(mc("-m", plain)).tools
    assert not facts(mc("-m", tiny(tmp_path, "none.gguf"))).tools  # no template at all
    # what llama-server would use instead of the file's template
    assert not facts(mc("-m", tools, "--no-jinja")).tools
    assert not facts(mc("-m", tools, "--chat-template", "chatml")).tools  # a built-in template
    assert facts(mc("-m", plain, "--chat-template", TOOLS_TEMPLATE)).tools
    template_file = tmp_path / "t.jinja"
    template_file.write_text(TOOLS_TEMPLATE)
    f = facts(mc("-m", plain, "--chat-template-file", str(template_file)))
    assert f.tools and f.chat_template == TOOLS_TEMPLATE
    # a template file that cannot be read gives no template (and no tools), not its error text
    modelinfo.clear_cache()
    monkeypatch.setattr(modelinfo, "_read_text", lambda key: (_ for _ in ()).throw(PermissionError(13, "denied")))
    f = facts(mc("-m", plain, "--chat-template-file", str(template_file)))
    assert f.chat_template is None and not f.tools and f.error == ""
    # an embedding model does not call tools whatever its template says
    assert not facts(mc("-m", tools, "--embeddings")).tools


def test_embedding_and_reranker_from_flags_and_metadata(tmp_path):
    plain = tiny(tmp_path, "plain.gguf")
    assert facts(mc("-m", plain, "--embedding")).embedding
    assert facts(mc("-m", plain, env={"LLAMA_ARG_EMBEDDINGS": "1"})).embedding
    assert not facts(mc("-m", plain)).embedding
    for name, kw in {
        "bert": {"arch": "bert"},
        "nomic": {"arch": "nomic-bert"},
        "pooled": {"extra": {"{arch}.pooling_type": 1}},  # a decoder pooled into embeddings (Qwen3-Embedding)
        "encoder": {"extra": {"{arch}.attention.causal": False}},
    }.items():
        f = facts(mc("-m", tiny(tmp_path, f"{name}.gguf", **kw)))
        assert f.embedding and not f.reranker and capabilities_list(f) == ["embedding"], name
    rank = facts(mc("-m", tiny(tmp_path, "rank.gguf", arch="bert", extra={"{arch}.pooling_type": 4})))
    assert rank.reranker and not rank.embedding and capabilities_list(rank) == []
    f = facts(mc("-m", plain, "--reranking"))
    assert f.reranker and not f.embedding


def test_config_capabilities_win(tmp_path):
    tools = tiny(tmp_path, "tools.gguf", extra={"tokenizer.chat_template": TOOLS_TEMPLATE})
    derived = facts(mc("-m", tools, "--mmproj", str(tmp_path / "x.gguf"), "-c", "4096"))
    assert derived.vision and derived.tools and derived.context_length == 4096
    text_only = Capabilities(inputs=("text",), outputs=("text",), context=99)
    f = facts(mc("-m", tools, "--mmproj", str(tmp_path / "x.gguf"), "-c", "4096", caps=text_only))
    assert not f.vision and not f.tools and f.context_length == 99 and f.trained_context == 512
    plain = tiny(tmp_path, "plain.gguf")
    f = facts(mc("-m", plain, caps=Capabilities(inputs=("text", "image", "audio"), tools=True, reranker=False)))
    assert f.vision and f.audio and f.tools and f.context_length == 512  # no context stated: the file's
    assert facts(mc("-m", plain, caps=Capabilities(reranker=True))).reranker
    # an embedding file stays one unless the key says the model writes text
    bert = tiny(tmp_path, "bert.gguf", arch="bert")
    assert facts(mc("-m", bert, caps=Capabilities(context=512))).embedding
    assert not facts(mc("-m", bert, caps=Capabilities(inputs=("text",), outputs=("text",)))).embedding
    # without any file the key still speaks
    f = facts(mc(caps=Capabilities(inputs=("text", "image"), tools=True, context=8192)))
    assert f.vision and f.tools and f.context_length == 8192 and f.path is None and f.error == ""


def test_the_config_key_reaches_model_config():
    cfg = load_config_text(
        "models:\n"
        "  a:\n"
        "    cmd: llama-server --port ${PORT} -m /nowhere.gguf\n"
        "    capabilities:\n"
        "      in: [text, image]\n"
        "      out: [text]\n"
        "      tools: true\n"
        "      context: 32768\n"
        "  b:\n"
        "    cmd: llama-server --port ${PORT}\n"
    )
    a, b = cfg.models["a"].capabilities, cfg.models["b"].capabilities
    assert a == Capabilities(inputs=("text", "image"), outputs=("text",), tools=True, reranker=False, context=32768)
    assert not a.empty and b.empty and b == Capabilities()
    with pytest.raises(AttributeError):
        a.tools = False  # type: ignore[misc]  # immutable


# -- files that cannot be read ----------------------------------------------------------------


def test_unreadable_files_give_an_error_not_an_exception(tmp_path):
    missing = facts(mc("-m", str(tmp_path / "missing.gguf")))
    assert missing.path is None and "cannot read the model file" in missing.error
    assert missing.architecture == "" and missing.parameter_count is None and missing.context_length is None
    assert capabilities_list(missing) == ["completion"]
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf at all" * 10)
    assert "bad magic" in facts(mc("-m", str(garbage))).error
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf_bytes(llama_metadata(), ())[:40])
    assert "unreadable GGUF" in facts(mc("-m", str(truncated))).error
    assert "not a regular file" in facts(mc("-m", str(tmp_path))).error
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    done, out = threading.Event(), []
    threading.Thread(target=lambda: (out.append(facts(mc("-m", str(fifo)))), done.set()), daemon=True).start()
    assert done.wait(5), "blocked on a FIFO"
    assert "not a regular file" in out[0].error
    # no file at all is not an error; neither is a server that is not llama-server
    none = facts(mc())
    assert none.path is None and none.error == "" and none.context_length is None
    vllm = facts(mc("--model", str(garbage), "--max-model-len", "4096", cmd0="vllm"))
    assert vllm.path is None and vllm.error == ""
    module = facts(mc("-m", "swapd.fake_backend", "--port", "9", cmd0="/usr/bin/python3"))  # -m names a module
    assert module.path is None and module.error == ""


# -- the cache ------------------------------------------------------------------------------------


def test_repeated_calls_are_cached_until_the_file_changes(tmp_path):
    path = Path(tiny(tmp_path, context=512))
    model = mc("-m", str(path))
    first = facts(model)
    assert facts(model) is first  # the same answer, nothing read again
    st = path.stat()
    # same size, same mtime, other content: not read again (proves the cache, no mocking)
    write_gguf(path, llama_metadata(context=768))
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert facts(model).trained_context == 512
    # a new mtime: read again
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    again = facts(model)
    assert again.trained_context == 768 and again is not first
    assert again.modified == pytest.approx(st.st_mtime + 1)
    # another command on the same file reuses the read header but is its own answer
    other = facts(mc("-m", str(path), "-c", "100"))
    assert other.context_length == 100 and other.trained_context == 768
    # a file that disappears is noticed at once
    path.unlink()
    assert "cannot read" in facts(model).error


def test_safe_from_many_threads(tmp_path):
    paths = [tiny(tmp_path, f"m{i}.gguf", context=256 * (i + 1)) for i in range(4)]
    results: list = []
    errors: list = []

    def work(i: int) -> None:
        try:
            for _ in range(50):
                results.append((i, facts(mc("-m", paths[i % 4])).trained_context))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(ctx == 256 * (i % 4 + 1) for i, ctx in results) and len(results) == 400


# -- the reader's opt-in ----------------------------------------------------------------------------


def test_the_reader_keeps_only_the_long_strings_it_is_asked_for(tmp_path):
    template = "{# " + "y" * 5000 + " #}"
    path = tiny(tmp_path, extra={"tokenizer.chat_template": template, "general.description": "z" * 5000})
    plain = estimate.read_header(path)
    assert plain.metadata["tokenizer.chat_template"] is None  # the estimate's path: skipped
    kept = estimate.read_header(path, keep_long=("tokenizer.chat_template",))
    assert kept.metadata["tokenizer.chat_template"] == template
    assert kept.metadata["general.description"] is None  # not asked for
    huge = tiny(tmp_path, "huge.gguf", extra={"tokenizer.chat_template": "h" * (estimate.KEEP_LONG_STRING_BYTES + 1)})
    kept_huge = estimate.read_header(huge, keep_long=("tokenizer.chat_template",))
    assert kept_huge.metadata["tokenizer.chat_template"] is None  # past KEEP_LONG_STRING_BYTES: skipped
    assert facts(mc("-m", huge)).chat_template is None and facts(mc("-m", huge)).error == ""
