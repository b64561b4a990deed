"""Request validation and stream folding, with no I/O."""

from __future__ import annotations

import json

import pytest

from quorum.errors import InvalidRequest
from quorum.sse import SSEParser
from quorum.wire import (
    ChatChunkEncoder,
    aggregate_chat,
    parse_chat_request,
    parse_completion_request,
)
from tests.openai_spec import validate

OK = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_a_minimal_request_parses_with_defaults() -> None:
    request = parse_chat_request(dict(OK))
    assert request.model == "m" and not request.stream and request.max_tokens is None
    assert request.tool_choice == "none" and request.raw == OK


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    request = parse_chat_request({**OK, "max_tokens": 5, "max_completion_tokens": 9})
    assert request.max_tokens == 9


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [1]}, "stop[0]"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice.function.name",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"seed": "1"}, "seed"),
        ({"max_tokens": True}, "max_tokens"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
            "messages[0].content[0].text",
        ),
    ],
)
def test_invalid_fields_name_their_param(extra: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request({**OK, **extra})
    assert info.value.param == param
    validate("ErrorResponse", info.value.body())


def test_completion_prompt_forms() -> None:
    assert parse_completion_request({"model": "m", "prompt": ["one"]}).prompt == "one"
    assert parse_completion_request({"model": "m", "prompt": [1, 2]}).prompt == "1 2"
    assert parse_completion_request({"model": "m", "prompt": "x"}).max_tokens == 16
    with pytest.raises(InvalidRequest) as info:
        parse_completion_request({"model": "m", "prompt": ["a", "b"]})
    assert info.value.param == "prompt"


def test_chunks_validate_and_fold_into_a_valid_response() -> None:
    enc = ChatChunkEncoder("chatcmpl-1", "m", 1700000000)
    stream = b"".join(
        [
            enc.role(),
            enc.reasoning("reasoning_content", "think"),
            enc.content("Hel"),
            enc.content("lo"),
            enc.tool_call_start(0, "call_1", "f"),
            enc.tool_call_arguments(0, '{"a":'),
            enc.tool_call_arguments(0, "1}"),
            enc.finish("tool_calls"),
            enc.usage(3, 6),
        ]
    )
    chunks = [json.loads(e.data) for e in SSEParser().feed(stream)]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    folded = aggregate_chat(chunks)
    validate("CreateChatCompletionResponse", folded)
    message = folded["choices"][0]["message"]
    assert message["content"] == "Hello" and message["reasoning_content"] == "think"
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    ]
    assert folded["choices"][0]["finish_reason"] == "tool_calls"
    assert folded["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
