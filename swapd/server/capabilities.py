"""A model's capabilities in ``GET /v1/models``, rendered as llama-swap renders them.

llama-swap (internal/server/api.go, ``renderCapabilities``) turns a model's
``capabilities`` key into four top-level fields of its ``/v1/models`` record,
and copies the context into ``meta.n_ctx``:

* ``architecture``: ``input_modalities`` (``in``), ``output_modalities``
  (``out``), and ``modality`` (``"text+image->text"``) when both are given;
* ``capabilities``: ``vision`` (``image`` in ``in``), ``audio_transcriptions``
  (audio in, text out), ``audio_speech`` (text in, audio out),
  ``image_generation`` (text in, image out), ``image_to_image``,
  ``function_calling`` (``tools``), ``reranker``;
* ``supported_parameters``: ``["tools", "tool_choice"]`` with ``tools``;
* ``context_length`` (and ``meta.n_ctx``): ``context`` when above 0.

Empty maps and lists are left out (Go's ``omitempty``); maps are emitted with
sorted keys as Go's encoder does, and the fields in llama-swap's order. When
anything is rendered, the model's ``metadata`` keys that collide with these
four are dropped from ``meta.llamaswap``.

A key with all zero values counts as absent (llama-swap's ``Empty``). Then
swapd derives the same fields from the GGUF named in the model's ``cmd``
(:mod:`swapd.modelinfo`): ``in`` is text, plus image/audio with a projector;
``out`` is text unless it is an embedding or reranking model; ``tools`` from
the chat template; ``context`` from ``-c`` or the trained length. An
embedding model also gets ``"embeddings": true`` (swapd's addition; llama-swap
has no such key). Nothing is derived when there is no readable GGUF.

Pure: the caller gathers the facts off the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from swapd.config import Capabilities, ModelConfig
from swapd.modelinfo import ModelFacts

# top-level /v1/models fields the renderer owns; colliding metadata keys are dropped (cappedMetadataKeys)
RENDERED_KEYS = frozenset({"architecture", "capabilities", "supported_parameters", "context_length"})
TOOL_PARAMETERS = ("tools", "tool_choice")


def render(caps: Capabilities, *, embeddings: bool = False) -> dict[str, Any]:
    """The /v1/models fields for ``caps``, in llama-swap's order; {} when the key is empty."""
    if caps.empty:
        return {}
    fields: dict[str, Any] = {}
    inputs, outputs = list(caps.inputs), list(caps.outputs)
    arch: dict[str, Any] = {}
    if inputs:
        arch["input_modalities"] = inputs
    if inputs and outputs:
        arch["modality"] = "+".join(inputs) + "->" + "+".join(outputs)
    if outputs:
        arch["output_modalities"] = outputs
    if arch:
        fields["architecture"] = arch
    flags = set()
    if "image" in inputs:
        flags.add("vision")
    if inputs and outputs:
        pairs = (
            ("audio", "text", "audio_transcriptions"),
            ("text", "audio", "audio_speech"),
            ("text", "image", "image_generation"),
            ("image", "image", "image_to_image"),
        )
        flags.update(name for given, made, name in pairs if given in inputs and made in outputs)
    if caps.tools:
        flags.add("function_calling")
    if caps.reranker:
        flags.add("reranker")
    if embeddings:
        flags.add("embeddings")
    if flags:
        fields["capabilities"] = {name: True for name in sorted(flags)}
    if caps.tools:
        fields["supported_parameters"] = list(TOOL_PARAMETERS)
    if caps.context > 0:
        fields["context_length"] = caps.context
    return fields


def derived(facts: ModelFacts | None) -> Capabilities | None:
    """The capabilities read from a model's GGUF and command line; None without a readable GGUF."""
    if facts is None or facts.path is None or facts.error:
        return None
    inputs = ("text",) + (("image",) if facts.vision else ()) + (("audio",) if facts.audio else ())
    makes_text = not (facts.embedding or facts.reranker)
    return Capabilities(
        inputs=inputs,
        outputs=("text",) if makes_text else (),
        tools=facts.tools and makes_text,
        reranker=facts.reranker,
        context=facts.context_length or 0,
    )


def model_fields(model: ModelConfig, facts: ModelFacts | None) -> dict[str, Any]:
    """What a model's /v1/models record shows: its ``capabilities`` key, or else what its GGUF says."""
    if not model.capabilities.empty:
        return render(model.capabilities)
    found = derived(facts)
    if found is None:
        return {}
    return render(found, embeddings=bool(facts and facts.embedding))


def needs_facts(model: ModelConfig) -> bool:
    """Whether rendering ``model`` reads its GGUF (only without a ``capabilities`` key)."""
    return model.capabilities.empty


def filter_metadata(metadata: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """``metadata`` without the keys the rendered ``fields`` own (all kept when nothing is rendered)."""
    if not fields:
        return dict(metadata)
    return {k: v for k, v in metadata.items() if k not in RENDERED_KEYS}
