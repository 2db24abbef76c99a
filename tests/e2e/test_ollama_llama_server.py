"""The official ``ollama`` client against swapd in front of a real llama-server running SmolLM2.

What the fake backend cannot show: details read from a real GGUF, a real
model's streamed tokens with llama.cpp's own timings turned into Ollama's
counts and durations, real embeddings, and ``/api/ps`` of a real process.
"""

from __future__ import annotations

import time

import pytest
from test_llama_server import LOAD_TIMEOUT, llama_entry

ollama = pytest.importorskip("ollama", reason="the ollama client is a test dependency (pip install -e '.[test]')")


@pytest.fixture
def smol(swapd, llama):
    s = swapd({"smol": llama_entry(llama, ttl=120)}, healthCheckTimeout=LOAD_TIMEOUT)
    return s, ollama.Client(host=s.base, timeout=LOAD_TIMEOUT)


def test_tags_and_show_come_from_the_gguf(smol):
    s, c = smol
    (entry,) = c.list().models
    assert entry.model == "smol"
    assert entry.details.format == "gguf" and entry.details.family == "llama"
    assert entry.details.parameter_size == "134.52M"  # as Ollama itself shows smollm2:135m
    assert entry.details.quantization_level  # SmolLM2's file type, e.g. Q8_0
    assert entry.size > 50 * 1024 * 1024
    shown = c.show("smol")
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 8192  # trained context
    assert "completion" in shown.capabilities
    assert shown.template  # the GGUF's chat template
    assert "smol" not in s.running()  # describing a model never starts it


def test_streamed_chat_with_real_counts(smol):
    s, c = smol
    parts = []
    for part in c.chat(model="smol", messages=[{"role": "user", "content": "Count to five."}], stream=True,
                       options={"num_predict": 16, "temperature": 0, "seed": 1}):
        parts.append((time.monotonic(), part))
    text = "".join(p.message.content for _, p in parts if not p.done)
    final = parts[-1][1]
    assert final.done and final.done_reason in ("stop", "length")
    assert text.strip()
    assert 1 <= final.eval_count <= 16
    assert final.prompt_eval_count > 5
    assert final.eval_duration > 0 and final.prompt_eval_duration > 0  # llama.cpp's own timings
    assert final.load_duration > 0  # the cold start this request waited on
    pieces = [t for t, p in parts if not p.done and p.message.content]
    assert len(pieces) >= 3 and pieces[-1] > pieces[0]
    ps = c.ps().models
    assert [m.model for m in ps] == ["smol"] and ps[0].context_length == 1024  # -c 1024 in the cmd


def test_generate_raw_and_embed(smol, swapd, llama):
    s, c = smol
    out = c.generate(model="smol", prompt="The capital of France is", raw=True, options={"num_predict": 4})
    assert out.done and out.response
    embedder = llama_entry(llama, ttl=120)
    embedder["cmd"] += " --embeddings --pooling mean"
    s2 = swapd({"smol-emb": embedder}, healthCheckTimeout=LOAD_TIMEOUT)
    emb = ollama.Client(host=s2.base, timeout=LOAD_TIMEOUT).embed(model="smol-emb", input=["hello", "world"])
    assert len(emb.embeddings) == 2 and len(emb.embeddings[0]) == 576  # SmolLM2-135M's embedding width
