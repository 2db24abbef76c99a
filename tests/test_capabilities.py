"""Capabilities in GET /v1/models: the ``capabilities`` key as llama-swap renders it, else read from the GGUF.

Through a real swapd. The cases of llama-swap's
``TestServer_HandleListModels_Capabilities`` (internal/server/api_test.go) are
ported one model each; the expected text is what llama-swap's encoder writes
for those fields (compact, maps with sorted keys, its field order), compared
with swapd's record re-encoded compactly in the order swapd sent it. JSON
values and key order are identical; only whitespace and Go's HTML escaping
of ``>`` (``\\u003e``) differ in the raw bytes.
"""

from __future__ import annotations

import json

from gguf_writer import llama_metadata, write_gguf
from helpers import PY, model
from test_observe import Events

TOOLS_TEMPLATE = "{%- if tools %}{%- for tool in tools %}{{ tool | tojson }}{%- endfor %}{%- endif %}"

# llama-swap's cases: (model id, capabilities key, metadata, the rendered fields as llama-swap writes them)
LLAMA_SWAP_CASES = {
    "all_fields": (
        {"in": ["text", "image"], "out": ["text", "audio"], "tools": True, "context": 100000},
        None,
        '"architecture":{"input_modalities":["text","image"],"modality":"text+image->text+audio",'
        '"output_modalities":["text","audio"]},'
        '"capabilities":{"audio_speech":true,"function_calling":true,"vision":true},'
        '"supported_parameters":["tools","tool_choice"],"context_length":100000',
    ),
    "in_only": ({"in": ["text", "image"]}, None, '"architecture":{"input_modalities":["text","image"]},'
                '"capabilities":{"vision":true}'),
    "out_only": ({"out": ["audio"]}, None, '"architecture":{"output_modalities":["audio"]}'),
    "tools": ({"tools": True}, None, '"capabilities":{"function_calling":true},'
              '"supported_parameters":["tools","tool_choice"]'),
    "reranker": ({"reranker": True}, None, '"capabilities":{"reranker":true}'),
    "context": ({"context": 32768}, None, '"context_length":32768'),
    "audio_transcriptions": (
        {"in": ["audio"], "out": ["text"]},
        None,
        '"architecture":{"input_modalities":["audio"],"modality":"audio->text","output_modalities":["text"]},'
        '"capabilities":{"audio_transcriptions":true}',
    ),
    "image_generation": (
        {"in": ["text"], "out": ["image"]},
        None,
        '"architecture":{"input_modalities":["text"],"modality":"text->image","output_modalities":["image"]},'
        '"capabilities":{"image_generation":true}',
    ),
    "image_to_image": (
        {"in": ["image"], "out": ["image"]},
        None,
        '"architecture":{"input_modalities":["image"],"modality":"image->image","output_modalities":["image"]},'
        '"capabilities":{"image_to_image":true,"vision":true}',
    ),
    "empty_skip": (None, None, ""),
    "all_zero": ({"in": [], "out": [], "tools": False, "reranker": False, "context": 0}, None, ""),
    "metadata_precedence": (
        {"in": ["text"]},
        {"architecture": "should-be-dropped", "custom_field": "should-remain", "capabilities": "also-dropped",
         "other_metadata": "also-remain"},
        '"architecture":{"input_modalities":["text"]}',
    ),
    "metadata_passthrough_no_caps": (
        None,
        {"architecture": "preserved", "context_length": 4096, "capabilities": "preserved",
         "custom_field": "preserved"},
        "",
    ),
}
RENDERED = ("architecture", "capabilities", "supported_parameters", "context_length")
# modelRecord's field order in llama-swap
RECORD_ORDER = ("id", "object", "created", "owned_by", "name", "description", *RENDERED, "meta", "status")


def listing(s) -> dict[str, dict]:
    r = s.get("/v1/models")
    assert r.status == 200
    return {m["id"]: m for m in json.loads(r.body)["data"]}


def rendered_text(record: dict) -> str:
    """The capability fields of ``record``, compact, in the order swapd sent them."""
    parts = [json.dumps({k: record[k]}, separators=(",", ":"))[1:-1] for k in record if k in RENDERED]
    return ",".join(parts)


def test_the_capabilities_key_renders_like_llama_swap(swapd):
    models = {}
    for model_id, (caps, metadata, _) in LLAMA_SWAP_CASES.items():
        keys = {}
        if caps is not None:
            keys["capabilities"] = caps
        if metadata is not None:
            keys["metadata"] = metadata
        models[model_id] = model(**keys)
    models["aliased"] = model(capabilities={"in": ["text"], "out": ["text"], "context": 8192}, aliases=["al"])
    s = swapd(models, includeAliasesInList=True)
    data = listing(s)
    for model_id, (_, _, expected) in LLAMA_SWAP_CASES.items():
        record = data[model_id]
        assert rendered_text(record) == expected, model_id
        order = [k for k in RECORD_ORDER if k in record]
        assert list(record) == order, model_id
        ctx = record.get("context_length")
        assert record["meta"].get("n_ctx") == ctx, model_id  # meta.n_ctx mirrors context_length
        assert list(record["meta"]) == (["llamaswap", "n_ctx"] if ctx else ["llamaswap"]), model_id
    # colliding metadata is dropped only when something is rendered
    kept = data["metadata_precedence"]["meta"]["llamaswap"]
    assert "architecture" not in kept and "capabilities" not in kept
    assert kept["custom_field"] == "should-remain" and kept["other_metadata"] == "also-remain"
    passed = data["metadata_passthrough_no_caps"]["meta"]["llamaswap"]
    assert passed["architecture"] == "preserved" and passed["context_length"] == 4096
    assert passed["capabilities"] == "preserved" and "architecture" not in data["metadata_passthrough_no_caps"]
    # an alias record carries its model's capabilities and context
    for name in ("aliased", "al"):
        assert data[name]["context_length"] == 8192 and data[name]["meta"]["n_ctx"] == 8192
        assert data[name]["architecture"]["modality"] == "text->text"
    assert data["al"]["meta"]["llamaswap"] == {"type": "alias", "modelID": "aliased"}
    assert s.running() == {}, "listing starts nothing"
    # /api/events' modelStatus carries the key's capabilities and context, as llama-swap's does
    events = Events(s, path="/api/events?no-history")
    try:
        status = {m["id"]: m for m in events.next()["payload"]}
    finally:
        events.close()
    assert status["all_fields"]["capabilities"] == {"audio_speech": True, "function_calling": True, "vision": True}
    assert status["all_fields"]["context_length"] == 100000
    assert "capabilities" not in status["empty_skip"] and "context_length" not in status["empty_skip"]
    assert "capabilities" not in status["context"] and status["context"]["context_length"] == 32768


def fake_llama_server(tmp_path) -> str:
    """An executable named like a server that runs the fake backend on the port it is given ($2)."""
    script = tmp_path / "fake-llama-server"
    script.write_text(f'#!/bin/sh\nexec {PY} -m swapd.fake_backend --port "$2" --quiet\n')
    script.chmod(0o755)
    return str(script)


def test_capabilities_derived_from_the_gguf(swapd, tmp_path):
    chat = write_gguf(tmp_path / "chat.gguf", llama_metadata(context=8192, extra={
        "tokenizer.chat_template": TOOLS_TEMPLATE + "{# " + "x" * 3000 + " #}"}))
    plain = write_gguf(tmp_path / "plain.gguf", llama_metadata(context=4096))
    bert = write_gguf(tmp_path / "bert.gguf", llama_metadata("bert", context=512))
    mmproj = write_gguf(tmp_path / "mmproj.gguf", {"general.architecture": "clip", "clip.has_vision_encoder": True},
                        ())
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"definitely not a gguf" * 4)
    never = "llama-server --port ${PORT} -m"  # these are listed, never started
    models = {
        # a llama-server stand-in: runs the fake backend, which never sees the -m
        "served": {"cmd": f"{fake_llama_server(tmp_path)} --port ${{PORT}} -m {chat}"},
        "vision": {"cmd": f"{never} {plain} --mmproj {mmproj} -c 2048"},
        "embed": {"cmd": f"{never} {bert}"},
        "embed-flag": {"cmd": f"{never} {plain} --embeddings"},
        "keyed": {"cmd": f"{never} {chat} --mmproj {mmproj}", "capabilities": {"in": ["text"], "context": 1000}},
        "unreadable": {"cmd": f"{never} {garbage}", "metadata": {"architecture": "kept"}},
        "missing": {"cmd": f"{never} {tmp_path / 'absent.gguf'}"},
        "nofile": model(),
    }
    s = swapd(models)
    data = listing(s)
    assert rendered_text(data["served"]) == (
        '"architecture":{"input_modalities":["text"],"modality":"text->text","output_modalities":["text"]},'
        '"capabilities":{"function_calling":true},"supported_parameters":["tools","tool_choice"],'
        '"context_length":8192'
    )
    assert data["served"]["meta"]["n_ctx"] == 8192
    assert rendered_text(data["vision"]) == (
        '"architecture":{"input_modalities":["text","image"],"modality":"text+image->text",'
        '"output_modalities":["text"]},"capabilities":{"vision":true},"context_length":2048'
    )
    for name in ("embed", "embed-flag"):
        record = data[name]
        assert record["architecture"] == {"input_modalities": ["text"]}, name
        assert record["capabilities"] == {"embeddings": True}, name
        assert "supported_parameters" not in record
    assert data["embed"]["context_length"] == 512 and data["embed-flag"]["context_length"] == 4096
    # the key wins: nothing of the file (no vision, no tools, not its context)
    assert rendered_text(data["keyed"]) == '"architecture":{"input_modalities":["text"]},"context_length":1000'
    # no readable GGUF: nothing rendered, no error, metadata untouched
    for name in ("unreadable", "missing", "nofile"):
        assert not any(k in data[name] for k in RENDERED), name
        assert "n_ctx" not in data[name]["meta"]
    assert data["unreadable"]["meta"]["llamaswap"]["architecture"] == "kept"
    assert s.running() == {}, "listing starts nothing"
    # swapd serves: the model whose file was read answers, and the listing is unchanged after
    r = s.chat("served")
    assert r.status == 200, r.body
    assert list(s.running()) == ["served"]
    again = listing(s)
    assert again["served"]["status"]["value"] == "loaded"
    assert rendered_text(again["served"]) == rendered_text(data["served"])
    # a file replaced in place is seen by the next listing (no restart, no reload)
    write_gguf(tmp_path / "plain.gguf", llama_metadata(context=16384))
    assert listing(s)["embed-flag"]["context_length"] == 16384
    assert listing(s)["vision"]["context_length"] == 2048  # -c still wins over the file


def test_many_models_read_in_one_listing(swapd, tmp_path):
    """One listing reads every model's GGUF (in one thread); each gets its own context."""
    paths = [write_gguf(tmp_path / f"m{i}.gguf", llama_metadata(context=1024 + i)) for i in range(20)]
    s = swapd({f"m{i}": {"cmd": f"llama-server --port ${{PORT}} -m {p}"} for i, p in enumerate(paths)})
    data = listing(s)
    assert [data[f"m{i}"]["context_length"] for i in range(20)] == [1024 + i for i in range(20)]
    assert s.get("/health").status == 200
    assert s.running() == {}
