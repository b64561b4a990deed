"""Request validation and stream folding, with no I/O."""

from __future__ import annotations

import json
from typing import Any
from unittest.mock import patch

import pytest

from quorum.errors import InvalidRequest
from quorum.sse import SSEParser
from quorum.wire import (
    MAX_JSON_DEPTH,
    ChatChunkEncoder,
    aggregate_chat,
    parse_chat_request,
    parse_completion_request,
    parse_json_body,
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


# --- hostile bodies (issue "Hostile input never hurts a node", issue 11) -------------------


def _refused(body: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_json_body(body)
    validate("ErrorResponse", info.value.body())
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    return info.value


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literals_are_refused_by_name(literal: str) -> None:
    error = _refused(b'{"model": "m", "top_k": ' + literal.encode() + b"}")
    assert literal in error.message


@pytest.mark.parametrize("number", ["1e999", "-1e999", "1" * 400 + ".0"])
def test_numbers_that_overflow_a_float_are_refused(number: str) -> None:
    error = _refused(b'{"model": "m", "temperature": ' + number.encode() + b"}")
    assert "finite" in error.message


@pytest.mark.parametrize(
    "extra", [{"temperature": float("nan")}, {"top_p": float("inf")}, {"top_p": -float("inf")}]
)
def test_non_finite_numbers_built_in_python_are_refused(extra: dict) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request({**OK, **extra})
    assert info.value.param in extra and "finite" in info.value.message


def test_integers_over_the_int_string_limit_are_a_400() -> None:
    error = _refused(b'{"model": "m", "seed": ' + b"9" * 5000 + b"}")
    assert "digits" in error.message


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, 1000, 100_000])
def test_nesting_deeper_than_the_limit_is_refused(depth: int) -> None:
    # ``depth`` levels inside the body object: one level more than that.
    arrays = b'{"model": "m", "x": ' + b"[" * depth + b"]" * depth + b"}"
    objects = b'{"model": "m", "x": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"
    for body in (arrays, objects):
        error = _refused(body)
        assert f"more than {MAX_JSON_DEPTH} levels" in error.message
    _refused(b"[" * (depth + 1))  # never closed: too deep, or not JSON


def test_a_body_of_100000_brackets_is_refused_without_recursion() -> None:
    with patch("json.loads", side_effect=AssertionError("decoded a body that is too deep")):
        _refused(b"[" * 100_000)


def test_nesting_up_to_the_limit_and_brackets_inside_strings_are_fine() -> None:
    depth = MAX_JSON_DEPTH - 1  # the body object itself is the first level
    body = b'{"x": ' + b"[" * depth + b"]" * depth + b', "s": "' + b"[{" * 500 + b'\\"["}'
    assert parse_json_body(body)["s"] == "[{" * 500 + '"['


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "a\\ud800"}]}',
            "messages[0].content",
        ),
        (b'{"model": "m", "stop": ["ok", "\\udfff"]}', "stop[1]"),
        (b'{"\\udbff": 1, "model": "m"}', "\\udbff"),
        (b'{"model": "m", "metadata": {"k\\udc00": "v"}}', "metadata.k\\udc00"),
        (b'{"model": "m", "x": "\\ud83d\\ud83d\\ude00"}', "x"),
    ],
)
def test_lone_surrogates_are_refused_naming_where(body: bytes, param: str) -> None:
    error = _refused(body)
    assert error.param == param and "surrogate" in error.message


def test_surrogate_pairs_and_escaped_backslashes_are_fine() -> None:
    body = b'{"a": "\\ud83d\\ude00", "b": "\\\\ud800"}'
    assert parse_json_body(body) == {"a": "\U0001f600", "b": "\\ud800"}


@pytest.mark.parametrize(
    "body",
    [b'{"m": "\xed\xa0\x80"}', b"\xff{}", '{"m": 1}'.encode("utf-16")],
)
def test_bodies_that_are_not_utf8_are_refused(body: bytes) -> None:
    assert "UTF-8" in _refused(body).message


def test_a_utf8_byte_order_mark_is_ignored() -> None:
    assert parse_json_body(b'\xef\xbb\xbf{"model": "m"}') == {"model": "m"}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"echo": True}, "echo"),
        ({"echo": "yes"}, "echo"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"model": "m" * 300}, "model"),
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": "1"}, "top_logprobs"),
        ({"logit_bias": {"1": 101}}, "logit_bias.1"),
        ({"logit_bias": {"1": "x"}}, "logit_bias.1"),
        ({"logit_bias": []}, "logit_bias"),
        ({"user": 5}, "user"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"store": 1}, "store"),
        ({"metadata": {"k": 1}}, "metadata.k"),
        ({"reasoning_effort": 3}, "reasoning_effort"),
        ({"top_k": 1.5}, "top_k"),
        ({"messages": [{"role": "user", "content": "x", "name": 5}]}, "messages[0].name"),
        ({"messages": [{"role": "assistant", "tool_calls": 5}]}, "messages[0].tool_calls"),
        ({"messages": [{"role": "assistant", "tool_calls": [5]}]}, "messages[0].tool_calls[0]"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {}}]}]},
            "messages[0].tool_calls[0].function.name",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {}}}],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 1}]}]},
            "messages[0].content[0].image_url",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "description": 1}}]},
            "tools[0].function.description",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "strict": "no"}}]},
            "tools[0].function.strict",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "o", "schema": {}, "strict": 1},
                }
            },
            "response_format.json_schema.strict",
        ),
    ],
)
def test_more_invalid_fields_name_their_param(extra: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request({**OK, **extra})
    assert info.value.param == param
    validate("ErrorResponse", info.value.body())


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"echo": True}, "echo"),
        ({"echo": []}, "echo"),
        ({"best_of": "2"}, "best_of"),
        ({"logprobs": 6}, "logprobs"),
        ({"suffix": 1}, "suffix"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_invalid_completion_fields_name_their_param(extra: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_completion_request({"model": "m", "prompt": "x", **extra})
    assert info.value.param == param


def test_valid_optional_fields_still_parse() -> None:
    chat = parse_chat_request(
        {
            **OK,
            "echo": False,
            "seed": -(2**63),
            "logprobs": True,
            "top_logprobs": 3,
            "logit_bias": {"50256": -100, "1": 2.5},
            "user": "u",
            "parallel_tool_calls": False,
            "store": False,
            "metadata": {"k": "v"},
            "reasoning_effort": "low",
            "top_k": -1,
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}
                    ],
                },
                {"role": "tool", "content": "r", "tool_call_id": "c", "name": "f"},
            ],
        }
    )
    assert chat.seed == -(2**63)
    completion = parse_completion_request(
        {"model": "m", "prompt": "x", "echo": False, "best_of": 1, "logprobs": 2, "suffix": "s"}
    )
    assert completion.prompt == "x"


# Each field's accepted JSON types (None: the field may be null or absent). A value of any
# other type must be a 400 whose param names the field (or a part of it).
_NUMBER = (int, float)
CHAT_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "messages": (list,),
    "messages.0": (dict,),
    "messages.0.role": (str,),
    "messages.0.content": (str, list),
    "messages.0.name": (str, type(None)),
    "messages.0.tool_calls": (list, type(None)),
    "stream": (bool, type(None)),
    "stream_options": (dict, type(None)),
    "temperature": (*_NUMBER, type(None)),
    "top_p": (*_NUMBER, type(None)),
    "presence_penalty": (*_NUMBER, type(None)),
    "frequency_penalty": (*_NUMBER, type(None)),
    "n": (int, type(None)),
    "max_tokens": (int, type(None)),
    "max_completion_tokens": (int, type(None)),
    "seed": (int, type(None)),
    "top_k": (int, type(None)),
    "top_logprobs": (int, type(None)),
    "logprobs": (bool, type(None)),
    "echo": (bool, type(None)),
    "parallel_tool_calls": (bool, type(None)),
    "store": (bool, type(None)),
    "user": (str, type(None)),
    "reasoning_effort": (str, type(None)),
    "logit_bias": (dict, type(None)),
    "metadata": (dict, type(None)),
    "stop": (str, list, type(None)),
    "tools": (list, type(None)),
    "tool_choice": (str, dict, type(None)),
    "response_format": (dict, type(None)),
}
WRONG_TYPES = (None, True, 0, -1, 2.5, "x", "", [], {}, [1], {"a": 1})


def _with(body: dict, path: str, value: object) -> dict:
    out = json.loads(json.dumps(body))
    node = out
    *parents, last = path.split(".")
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[int(last) if last.isdigit() else last] = value
    return out


def _param_root(param: str) -> str:
    return param.replace("[", ".").replace("]", "")


COMPLETION_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "prompt": (str, list),
    "stream": (bool, type(None)),
    "stream_options": (dict, type(None)),
    "temperature": (*_NUMBER, type(None)),
    "top_p": (*_NUMBER, type(None)),
    "presence_penalty": (*_NUMBER, type(None)),
    "n": (int, type(None)),
    "max_tokens": (int, type(None)),
    "seed": (int, type(None)),
    "top_k": (int, type(None)),
    "logprobs": (int, type(None)),
    "best_of": (int, type(None)),
    "echo": (bool, type(None)),
    "suffix": (str, type(None)),
    "user": (str, type(None)),
    "logit_bias": (dict, type(None)),
    "stop": (str, list, type(None)),
}


@pytest.mark.parametrize(
    ("parse", "base", "fields"),
    [
        (parse_chat_request, OK, CHAT_FIELD_TYPES),
        (parse_completion_request, {"model": "m", "prompt": "x"}, COMPLETION_FIELD_TYPES),
    ],
    ids=["chat", "completion"],
)
def test_every_field_of_the_wrong_type_is_a_400_naming_it(
    parse: Any, base: dict, fields: dict[str, tuple[type, ...]]
) -> None:
    for path, accepted in fields.items():
        for value in WRONG_TYPES:
            body = _with(base, path, value)
            wrong = not isinstance(value, accepted) or (
                isinstance(value, bool) and bool not in accepted
            )
            try:
                parse(body)
            except InvalidRequest as exc:
                assert exc.param is not None, (path, value, exc.message)
                root = path.split(".")[0]
                assert _param_root(exc.param).split(".")[0] == root, (path, value, exc.param)
                validate("ErrorResponse", exc.body())
                continue
            assert not wrong, f"{path} = {value!r} was accepted"
