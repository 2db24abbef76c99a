"""Token counts read from the ends of a response (swapd.telemetry.usage), on the shapes real servers send."""

from __future__ import annotations

import json

from swapd.telemetry.usage import finish_reasons, read_tokens, response_model


def sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def test_openai_stream_with_include_usage_reads_the_last_non_null_usage():
    tail = sse(
        {"choices": [{"delta": {"content": "hi"}, "finish_reason": None}], "usage": None},
        {"choices": [{"delta": {}, "finish_reason": "length"}], "usage": None, "model": "served-name"},
        {
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 16, "prompt_tokens_details": {"cached_tokens": 4}},
        },
        b"[DONE]",
    )
    tokens = read_tokens(tail, stream=True)
    assert (tokens.input, tokens.output, tokens.cache) == (9, 16, 4)
    assert tokens.tokens_per_second == -1.0  # not reported: llama-swap's -1
    assert finish_reasons(tail, stream=True) == ("length",)
    assert response_model(tail) == "served-name"


def test_llama_server_timings_win_over_usage():
    final = {
        "choices": [{"delta": {}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5},
        "timings": {
            "prompt_n": 7,
            "predicted_n": 11,
            "cache_n": 2,
            "prompt_per_second": 812.5,
            "predicted_per_second": 61.25,
            "prompt_ms": 8.6,
            "predicted_ms": 179.6,
        },
    }
    tokens = read_tokens(sse(final, b"[DONE]"), stream=True)
    assert (tokens.input, tokens.output, tokens.cache) == (7, 11, 2)
    assert (tokens.prompt_per_second, tokens.tokens_per_second) == (812.5, 61.25)
    assert abs(tokens.timings_ms - 188.2) < 1e-9


def test_a_stream_without_usage_reports_none():
    tail = sse({"choices": [{"delta": {"content": "x"}, "finish_reason": "stop"}]}, b"[DONE]")
    assert read_tokens(tail, stream=True) is None
    assert finish_reasons(tail, stream=True) == ("stop",)


def test_text_that_mentions_usage_cannot_fake_a_count():
    # the model wrote '"usage": {"prompt_tokens": 999}' in its answer: inside a JSON string, so escaped
    content = {"choices": [{"delta": {"content": '"usage": {"prompt_tokens": 999}'}}]}
    assert read_tokens(sse(content, b"[DONE]"), stream=True) is None


def test_a_partial_event_at_the_start_of_the_tail_is_skipped():
    whole = sse({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3}}, b"[DONE]")
    cut = b'{"prompt_tokens": 100, "compl' + whole  # what is left of an earlier event
    tokens = read_tokens(b'"usage": ' + cut, stream=True)
    assert (tokens.input, tokens.output) == (2, 3)


def test_anthropic_messages_stream_takes_the_input_count_from_the_head():
    head = b"event: message_start\n" + sse(
        {
            "type": "message_start",
            "message": {"model": "claude-local", "usage": {"input_tokens": 25, "output_tokens": 1}},
        }
    )
    tail = (
        b"event: message_delta\n"
        + sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}})
        + b"event: message_stop\n"
        + sse({"type": "message_stop"})
    )
    tokens = read_tokens(tail, head, stream=True)
    assert (tokens.input, tokens.output) == (25, 15)
    assert finish_reasons(tail, stream=True) == ("end_turn",)


def test_responses_api_completed_event():
    tail = sse(
        {
            "type": "response.completed",
            "response": {
                "model": "m",
                "usage": {"input_tokens": 30, "output_tokens": 12, "input_tokens_details": {"cached_tokens": 10}},
            },
        }
    )
    tokens = read_tokens(tail, stream=True)
    assert (tokens.input, tokens.output, tokens.cache) == (30, 12, 10)


def test_whole_answers_chat_embeddings_and_several_choices():
    chat = json.dumps(
        {
            "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop"}, {"index": 1, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 8},
        }
    ).encode()
    tokens = read_tokens(chat)
    assert (tokens.input, tokens.output) == (5, 8)
    assert finish_reasons(chat, stream=False) == ("stop", "length")
    big = json.dumps(
        {
            "object": "list",
            "data": [{"embedding": [0.1] * 20000}],
            "model": "e",
            "usage": {"prompt_tokens": 6, "total_tokens": 6},
        }
    ).encode()
    tokens = read_tokens(big)
    assert (tokens.input, tokens.output) == (6, 0)
    assert response_model(big) == "e"


def test_vllm_per_request_metrics():
    tail = sse(
        {
            "choices": [],
            "usage": {"prompt_tokens": 40, "completion_tokens": 20},
            "metrics": {
                "mean_itl_ms": 20.0,
                "time_to_first_token_ms": 50.0,
                "speculative_decoding": {"num_draft_tokens": 12, "num_accepted_draft_tokens": 9},
            },
        }
    )
    tokens = read_tokens(tail, stream=True)
    assert tokens.tokens_per_second == 50.0
    assert tokens.prompt_per_second == 800.0  # 40 prompt tokens in 50 ms
    assert (tokens.draft, tokens.draft_accepted) == (12, 9)
