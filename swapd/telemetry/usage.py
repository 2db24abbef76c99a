"""Token counts from a response, read after it went out and never from more than its ends.

A streamed answer keeps its first and its last four pieces (``_Exchange``
keeps them for the splice path, the relay loop for the others); a whole JSON
answer is already in memory. Either way the search starts at the end: the
last ``"usage"`` object that is not null, llama-server's last ``"timings"``,
the last ``finish_reason`` and ``model``. Each object is decoded on its own
with ``json.JSONDecoder.raw_decode`` from where its key was found, so a
10 MB embeddings answer costs the same as a short chat reply.

Keys are found as ``"usage"`` followed by ``:``. Inside a JSON string a quote
is escaped, so a model's own text cannot fake a key; a partial event at the
start of the kept tail simply fails to decode and is skipped.

Usage shapes read, as llama-swap reads them: OpenAI chat and completions
(``prompt_tokens``, ``completion_tokens``, ``prompt_tokens_details.cached_tokens``),
the Responses API (``response.usage`` with ``input_tokens``/``output_tokens``,
``input_tokens_details.cached_tokens``), Anthropic messages
(``message.usage`` in ``message_start``, ``usage.output_tokens`` in
``message_delta``, ``cache_read_input_tokens``), llama-server ``timings``
(``prompt_n``, ``predicted_n``, ``cache_n``, the rates; these win, as in
llama-swap) and vLLM's per-request ``metrics``.
"""

from __future__ import annotations

import json
import re

from swapd.telemetry.record import RequestRecord, Tokens

_DECODER = json.JSONDecoder()
_FINISH_RE = re.compile(rb'"(?:finish_reason|stop_reason)"\s*:\s*"([A-Za-z0-9_\-]{1,64})"')
_MODEL_RE = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,256})"')
_WS = b" \t\r\n"


def _objects(buf: bytes, key: bytes, limit: int = 8):
    """Decoded JSON objects that follow ``"key":`` in ``buf``, the last one first."""
    needle = b'"' + key + b'"'
    end = len(buf)
    found = 0
    while found < limit:
        at = buf.rfind(needle, 0, end)
        if at < 0:
            return
        end = at
        pos = at + len(needle)
        while pos < len(buf) and buf[pos] in _WS:
            pos += 1
        if pos >= len(buf) or buf[pos] != 0x3A:  # ":"
            continue
        pos += 1
        while pos < len(buf) and buf[pos] in _WS:
            pos += 1
        if pos >= len(buf) or buf[pos] != 0x7B:  # "{": null and other values are skipped
            continue
        try:
            value, _ = _DECODER.raw_decode(buf[pos:].decode("utf-8", "replace"))
        except ValueError:
            continue
        if isinstance(value, dict):
            found += 1
            yield value


def _int(obj: dict, *names: str) -> int | None:
    for name in names:
        node: object = obj
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, bool):
            continue
        if isinstance(node, (int, float)):
            return int(node)
    return None


def _float(obj: dict, name: str) -> float | None:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def read_tokens(tail: bytes, head: bytes = b"", *, stream: bool = False) -> Tokens | None:
    """Tokens from the end of a response (and its start, for Anthropic's input count); None if none reported."""
    tokens = Tokens()
    seen = False
    input_from_usage = False
    for usage in _objects(tail, b"usage"):
        inp = _int(usage, "prompt_tokens", "input_tokens")
        out = _int(usage, "completion_tokens", "output_tokens")
        cached = _int(
            usage,
            "cache_read_input_tokens",
            "input_tokens_details.cached_tokens",
            "prompt_tokens_details.cached_tokens",
        )
        if inp is None and out is None and cached is None:
            continue
        seen = True
        if inp is not None and inp > 0:
            tokens.input = inp
            input_from_usage = True
        if out is not None and out > 0:
            tokens.output = out
        if cached is not None and cached >= 0:
            tokens.cache = cached
        break
    if stream and not input_from_usage and head:
        for usage in _objects(head, b"usage", limit=2):  # Anthropic: message_start carries the input count
            inp = _int(usage, "input_tokens", "prompt_tokens")
            if inp is not None and inp > 0:
                tokens.input = inp
                seen = True
                cached = _int(usage, "cache_read_input_tokens")
                if cached is not None and tokens.cache < 0:
                    tokens.cache = cached
                break
    for timings in _objects(tail, b"timings", limit=1):
        seen = True
        prompt_n = _int(timings, "prompt_n")
        predicted_n = _int(timings, "predicted_n")
        if prompt_n is not None:
            tokens.input = prompt_n
        if predicted_n is not None:
            tokens.output = predicted_n
        cache_n = _int(timings, "cache_n")
        if cache_n is not None:
            tokens.cache = cache_n
        pps = _float(timings, "prompt_per_second")
        tps = _float(timings, "predicted_per_second")
        if pps is not None:
            tokens.prompt_per_second = pps
        if tps is not None:
            tokens.tokens_per_second = tps
        tokens.timings_ms = (_float(timings, "prompt_ms") or 0.0) + (_float(timings, "predicted_ms") or 0.0)
        draft_n = _int(timings, "draft_n")
        accepted = _int(timings, "draft_n_accepted")
        if draft_n is not None and accepted is not None:
            tokens.draft, tokens.draft_accepted = draft_n, accepted
    for metrics in _objects(tail, b"metrics", limit=1):  # vLLM --per-request metrics
        spec = metrics.get("speculative_decoding")
        if isinstance(spec, dict):
            drafted = _int(spec, "num_draft_tokens")
            accepted = _int(spec, "num_accepted_draft_tokens")
            if drafted is not None and accepted is not None:
                tokens.draft, tokens.draft_accepted = drafted, accepted
                seen = True
        itl = _float(metrics, "mean_itl_ms")
        if itl and itl > 0:
            tokens.tokens_per_second = 1000.0 / itl
            seen = True
        ttft = _float(metrics, "time_to_first_token_ms")
        if ttft and ttft > 0:
            tokens.prompt_per_second = (tokens.input - max(tokens.cache, 0)) / (ttft / 1000.0)
            seen = True
    return tokens if seen else None


def finish_reasons(tail: bytes, *, stream: bool) -> tuple[str, ...]:
    """The finish reasons: every choice's in a whole answer, the last one reported in a stream."""
    found = [m.decode("ascii") for m in _FINISH_RE.findall(tail)]
    if not found:
        return ()
    if stream:
        return (found[-1],)
    return tuple(dict.fromkeys(found))


def response_model(tail: bytes) -> str:
    """The last ``"model"`` string in the response ("" when there is none)."""
    end = len(tail)
    while True:
        at = tail.rfind(b'"model"', 0, end)
        if at < 0:
            return ""
        match = _MODEL_RE.match(tail, at)
        if match is not None:
            try:
                return json.loads(b'"' + match.group(1) + b'"')
            except ValueError:
                return ""
        end = at


def account(record: RequestRecord) -> None:
    """Fill the record's tokens, finish reasons and model from the body ends the relay kept."""
    ends = record.body_ends
    if ends is None:
        return
    record.body_ends = None
    head, tail = ends
    stream = record.stream
    record.tokens = read_tokens(tail, head, stream=stream)
    record.finish_reasons = finish_reasons(tail, stream=stream)
    record.response_model = response_model(tail)
